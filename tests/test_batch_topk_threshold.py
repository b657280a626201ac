"""The BatchTopK inference threshold and eval output (issue #20).

The threshold is an EMA of each training batch's smallest kept activation whose window
grows with the number of batches seen (``core.batch_topk.update_threshold``); a fixed
0.99 momentum from the first batch left held-out L0 far from k early in training.
In eval mode a token's output depends on that token alone; the column count is the
batch's largest per-token count.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from matryoshka_plugin import MatryoshkaSparseCoder, MatryoshkaSparseCoderConfig, MatryoshkaTrainConfig
from matryoshka_plugin.adapters.sparsify import MatryoshkaTrainer
from matryoshka_plugin.adapters.sparsify.coder import UPDATES_KEY
from matryoshka_plugin.core.batch_topk import THRESHOLD_WINDOW, update_threshold
from matryoshka_plugin.fit import ActivationReplay, fit_activations

D_IN = 16


def _stream_thresholds(values, momentum):
    t, n = torch.tensor(-1.0), torch.zeros((), dtype=torch.long)
    out = []
    for v in values:
        update_threshold(t, n, torch.tensor(v), momentum)
        out.append(float(t))
    return out, int(n)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.floats(0.01, 100.0), min_size=1, max_size=60),
    st.floats(0.0, 0.999),
)
def test_threshold_starts_at_the_first_batch_and_stays_within_the_values_seen(values, momentum):
    out, n = _stream_thresholds(values, momentum)
    assert n == len(values)
    assert out[0] == pytest.approx(values[0])
    for i, t in enumerate(out):
        seen = values[: i + 1]
        assert min(seen) * (1 - 1e-5) <= t <= max(seen) * (1 + 1e-5)


@settings(max_examples=50, deadline=None)
@given(st.floats(0.5, 0.995), st.floats(0.01, 10.0), st.floats(0.01, 10.0))
def test_a_long_run_updates_as_the_plain_ema(momentum, threshold, value):
    """Once the window reaches 1 / (1 - momentum), the update is the old rule's EMA."""
    mature = math.ceil(1 / ((1 - momentum) * THRESHOLD_WINDOW))
    t, n = torch.tensor(threshold, dtype=torch.float64), torch.tensor(mature)
    update_threshold(t, n, torch.tensor(value, dtype=torch.float64), momentum)
    assert float(t) == pytest.approx(momentum * threshold + (1 - momentum) * value, rel=1e-9)


def _coder(width=64, k=4, seed=0, **fields):
    cfg = MatryoshkaSparseCoderConfig(num_latents=width, k=k, batch_topk=True, **fields)
    torch.manual_seed(seed)
    coder = MatryoshkaSparseCoder(D_IN, cfg)
    with torch.no_grad():
        coder.encoder.bias.normal_(std=0.1)
    return coder


def _eval_l0(coder, x):
    coder.eval()
    acts = coder.encode(x).top_acts
    coder.train()
    return float((acts > 0).sum(1).float().mean())


def _batches(n, rows, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, D_IN, generator=g) for _ in range(n)]


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 12), st.sampled_from([32, 96]), st.integers(0, 2**16))
def test_eval_l0_is_k_on_stationary_data(k, width, seed):
    coder = _coder(width, k, seed)
    for xb in _batches(40, 256, seed):
        coder(xb)
    held_out = _batches(1, 4096, seed + 1)[0]
    assert _eval_l0(coder, held_out) == pytest.approx(k, rel=0.1)


def test_eval_l0_tracks_k_while_activations_grow():
    """Pre-activations growing fivefold, fast at first and then settling, as early training
    moves them: after 200 steps the threshold holds held-out L0 near k, where a 0.99 EMA
    from the first batch (the old rule, replayed on the same stream of kept minima)
    still lags far behind."""
    k, coder = 4, _coder(64, 4)
    old = None
    held_out = _batches(1, 4096, 7)[0]
    with torch.no_grad():
        W0, b0 = coder.encoder.weight.clone(), coder.encoder.bias.clone()
    for step, xb in enumerate(_batches(200, 256, 3)):
        with torch.no_grad():
            scale = 1 + 4 * (1 - math.exp(-step / 40))
            coder.encoder.weight.copy_(W0 * scale)
            coder.encoder.bias.copy_(b0 * scale)
        out = coder(xb)
        kept = float(out.latent_acts.detach()[out.latent_acts > 0].min())
        old = kept if old is None else 0.99 * old + 0.01 * kept
    assert _eval_l0(coder, held_out) == pytest.approx(k, rel=0.1)
    coder.batch_topk_threshold.fill_(old)
    assert _eval_l0(coder, held_out) > 1.3 * k


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 64), st.integers(1, 6), st.integers(0, 2**16))
def test_eval_rows_do_not_depend_on_the_rest_of_the_batch(rows, k, seed):
    coder = _coder(48, k, seed)
    for xb in _batches(3, 128, seed):
        coder(xb)
    coder.eval()
    x = _batches(1, rows, seed + 1)[0]
    pick = torch.randperm(rows, generator=torch.Generator().manual_seed(seed))[: max(1, rows // 2)]

    def dense(inputs):
        acts, idx, pre = coder.encode(inputs)
        counts = (pre > coder.batch_topk_threshold).sum(1)
        assert acts.shape[1] == max(int(counts.max()), 1)  # the documented column count
        return torch.zeros(len(inputs), 48).scatter_add_(1, idx, acts.detach())

    # Close, not equal: a sub-batch's matmul may round differently in the last bits.
    torch.testing.assert_close(dense(x)[pick], dense(x[pick]))
    # And the eval forward reconstructs from exactly those codes.
    with torch.no_grad():
        torch.testing.assert_close(coder(x).sae_out, dense(x) @ coder.W_dec + coder.b_dec)


def test_threshold_and_its_count_survive_a_checkpoint_and_resume(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1024, D_IN, generator=g)
    cfg = MatryoshkaSparseCoderConfig(num_latents=32, k=4, batch_topk=True, matryoshka=True)
    coder = fit_activations(x, cfg, batch_size=64, seq_len=16, save_dir=tmp_path,
                            optimizer="adam", lr=1e-3)
    assert int(coder.batch_topk_updates) == 1024 // 64
    assert coder.matryoshka_state()[UPDATES_KEY] == 1024 // 64
    train_cfg = MatryoshkaTrainConfig(sae=cfg, batch_size=4, hookpoints=["site"],
                                      log_to_wandb=False, optimizer="adam")
    data = torch.zeros(8, 16, dtype=torch.long).tolist()
    from datasets import Dataset

    trainer = MatryoshkaTrainer(train_cfg, Dataset.from_dict({"input_ids": data}).with_format("torch"),
                                ActivationReplay(x, None))
    trainer.load_state(str(tmp_path / "fit"))
    resumed = trainer.saes["site"]
    assert int(resumed.batch_topk_updates) == 1024 // 64
    assert torch.equal(resumed.batch_topk_threshold, coder.batch_topk_threshold)


def test_a_state_without_the_count_restarts_the_window():
    coder = _coder()
    coder(torch.randn(64, D_IN))
    state = coder.matryoshka_state()
    del state[UPDATES_KEY]
    coder.load_matryoshka_state(state)
    assert int(coder.batch_topk_updates) == 0
