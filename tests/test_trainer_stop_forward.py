"""The trainer's forward stops after the last hookpoint with loss_fn fvu (issue #21).

Same checkpoints as the full forward, bit for bit; the later layers do not run; the
end-to-end losses keep the whole model; the model object is left as it was.
"""

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from matryoshka_plugin.adapters.sparsify import MatryoshkaSparseCoderConfig
from matryoshka_plugin.adapters.sparsify.trainer import MatryoshkaTrainConfig, MatryoshkaTrainer


def run(model_dir, save_dir, *, stop, loss_fn="fvu", hookpoints=("layers.0",), **sae):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    data = Dataset.from_dict({"input_ids": torch.randint(2, 90, (12, 16))}).with_format("torch")
    cfg = MatryoshkaTrainConfig(
        sae=MatryoshkaSparseCoderConfig(num_latents=32, k=4, **sae), batch_size=4,
        hookpoints=list(hookpoints), loss_fn=loss_fn, log_to_wandb=False,
        save_dir=str(save_dir), save_every=2, run_name="r",
    )
    trainer = MatryoshkaTrainer(cfg, data, model)
    trainer.stop_after_last_hookpoint = stop
    last = model.base_model.layers[-1]
    calls = []
    handle = last.register_forward_hook(lambda *_: calls.append(1))
    trainer.fit()
    handle.remove()
    assert "forward" not in model.__dict__  # the instance is as before fit()
    return len(calls), {
        h: load_file(save_dir / "r" / h / "sae.safetensors") for h in hookpoints
    }


@pytest.mark.parametrize("sae", [{}, dict(matryoshka=True, nested_sizes=[8, 32], batch_topk=True)])
def test_fvu_checkpoints_equal_the_full_forward_without_the_later_layers(tiny_llama_dir, tmp_path, sae):
    full_calls, full = run(tiny_llama_dir, tmp_path / "full", stop=False, **sae)
    cut_calls, cut = run(tiny_llama_dir, tmp_path / "cut", stop=True, **sae)
    assert full_calls == 3 and cut_calls == 0  # 12 rows / batch 4
    for h in full:
        for name, t in full[h].items():
            assert torch.equal(t, cut[h][name]), (h, name)


def test_every_hookpoint_trains_whatever_the_order_given(tiny_llama_dir, tmp_path):
    hooks = ("layers.1.mlp", "layers.0.mlp")  # the deepest first
    _, full = run(tiny_llama_dir, tmp_path / "full", stop=False, hookpoints=hooks)
    _, cut = run(tiny_llama_dir, tmp_path / "cut", stop=True, hookpoints=hooks)
    for h in hooks:
        for name, t in full[h].items():
            assert torch.equal(t, cut[h][name]), (h, name)


def test_end_to_end_loss_runs_the_whole_model(tiny_llama_dir, tmp_path):
    calls, _ = run(tiny_llama_dir, tmp_path, stop=True, loss_fn="kl")
    assert calls == 6  # clean and patched forward, 3 batches
