"""Shared fixtures: tiny random models saved as local HF folders, with local tokenizers."""

from pathlib import Path

import pytest
import torch

CORPUS = (
    "It is a truth universally acknowledged, that a single man in possession of a good "
    "fortune, must be in want of a wife. However little known the feelings or views of "
    "such a man may be on his first entering a neighbourhood, this truth is so well fixed "
    "in the minds of the surrounding families, that he is considered the rightful property "
    "of some one or other of their daughters. "
) * 40


def build_tokenizer(
    text: str = CORPUS,
    vocab_size: int = 96,
    *,
    bos: str = "<|endoftext|>",
    eos: str = "<|endoftext|>",
    pad: str | None = "<pad>",
):
    """A byte-level BPE tokenizer trained on ``text``, as a transformers tokenizer.

    Special tokens take the first ids in the order pad, bos, eos; with the defaults the
    BOS/EOS id is 1, as circuit-tracer needs a non-zero BOS id.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(dict.fromkeys(t for t in (pad, bos, eos) if t)),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([text], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad, model_max_length=512
    )


def tiny_config(arch: str, vocab_size: int):
    from transformers import GPT2Config, LlamaConfig

    if arch == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size, n_positions=128, n_embd=16, n_layer=2, n_head=2,
            bos_token_id=1, eos_token_id=1,
        )
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
        bos_token_id=1, eos_token_id=1,
    )


def save_tiny_model(root: Path, arch: str) -> Path:
    from transformers import AutoModelForCausalLM

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, len(tokenizer)))
    path = root / f"tiny-{arch}"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session", params=["gpt2", "llama"])
def tiny_model_dir(request, tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("models"), request.param)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="session")
def text_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("texts")
    for i in range(3):
        (root / f"part{i}.txt").write_text(CORPUS)
    return root
