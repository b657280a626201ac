"""Issue #13 on the plugin's CLT: AuxK trains only decoders; resume files are data, not code."""

import os

import pytest
import torch

from matryoshka_plugin.clt import CLTConfig, MatryoshkaCLT


@pytest.mark.parametrize("batch_topk", [False, True])
def test_auxk_trains_only_the_decoder(batch_topk):
    """AuxK's gradient w.r.t. every encoder is exactly zero, its decoder gradient is not."""
    torch.manual_seed(0)
    cfg = CLTConfig(matryoshka=True, num_latents=32, k=4, nested_sizes=[8, 16], batch_topk=batch_topk)
    clt = MatryoshkaCLT(8, [0, 1], cfg).train()
    with torch.no_grad():
        for W in clt.W_dec:
            W.normal_()
    x, y = torch.randn(16, 2, 8), torch.randn(16, 2, 8)
    codes = clt.encode(x)
    dead = torch.ones(2, 32, dtype=torch.bool)
    # forward() returns AuxK detached; its own term is what the gradient check needs.
    auxk = clt._auxk_loss(codes, y, torch.ones(2), dead)
    assert float(auxk.detach()) > 0
    auxk.backward()
    for s in range(2):
        assert clt.W_enc[s].grad is None or not clt.W_enc[s].grad.any(), s
        assert clt.b_enc[s].grad is None or not clt.b_enc[s].grad.any(), s
    assert clt.W_dec[0].grad.abs().sum() > 0


# -- resume reads data, never code ---------------------------------------------------


class RunsCode:
    """Unpickling this runs a shell command that writes ``marker``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    from matryoshka_plugin.clt import cache_activations
    from tiny import random_model, tiny_config

    root = tmp_path_factory.mktemp("clt-cache")
    model = random_model(tiny_config("llama", 64, d_model=16, n_layers=2))
    g = torch.Generator().manual_seed(0)
    batches = (torch.randint(4, 64, (8, 17), generator=g) for _ in range(8))
    return cache_activations(model, batches, [0, 1], root / "cache", n_tokens=1024, show_progress=False)


def _cfg(cache, save_dir, **kw):
    from matryoshka_plugin.clt import CLTTrainConfig

    clt = CLTConfig(matryoshka=True, num_latents=32, k=4, nested_sizes=[8, 16], prefix_schedule="fixed")
    return CLTTrainConfig(
        cache=str(cache), save_dir=str(save_dir), clt=clt, batch_size=64, lr=1e-3,
        lr_warmup_steps=2, holdout_fraction=0.0, **kw,
    )


def _losses(save_dir):
    import json

    return [h["loss"] for h in json.loads((save_dir / "clt" / "metrics.json").read_text())["history"]]


def test_resume_gives_bit_identical_losses(cache, tmp_path):
    from matryoshka_plugin.clt import train_clt

    train_clt(_cfg(cache, tmp_path / "straight", max_steps=8), show_progress=False)
    train_clt(_cfg(cache, tmp_path / "resumed", max_steps=4), show_progress=False)
    train_clt(_cfg(cache, tmp_path / "resumed", max_steps=8, resume=True), show_progress=False)
    assert _losses(tmp_path / "resumed") == _losses(tmp_path / "straight")


@pytest.mark.parametrize("how", ["torch.save", "pickle.dump"])
def test_resume_refuses_a_state_file_that_would_run_code(cache, tmp_path, how):
    import pickle

    from matryoshka_plugin.clt import train_clt
    from matryoshka_plugin.core.errors import CLTError

    train_clt(_cfg(cache, tmp_path / "run", max_steps=2), show_progress=False)
    marker = tmp_path / "MARKER"
    state = tmp_path / "run" / "checkpoint" / "state.pt"
    payload = {"optimizer": RunsCode(marker)}
    if how == "torch.save":
        torch.save(payload, state)
    else:
        state.write_bytes(pickle.dumps(payload))
    with pytest.raises(CLTError, match="state.pt holds more than tensors and plain data") as e:
        train_clt(_cfg(cache, tmp_path / "run", max_steps=4, resume=True), show_progress=False)
    assert "\n" not in str(e.value)
    assert not marker.exists()
