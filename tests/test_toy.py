"""The hierarchical toy and its ground-truth metrics, and a direction-only regression check."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sparsify import SparseCoder, SparseCoderConfig

from matryoshka_plugin import MatryoshkaSparseCoderConfig
from matryoshka_plugin.fit import fit_activations
from matryoshka_plugin.toy import (
    ToyConfig,
    ToyModel,
    absorption,
    best_match_cosine,
    ground_truth_metrics,
    splitting,
)

toy_configs = st.builds(
    ToyConfig,
    d_model=st.integers(24, 40),
    n_parents=st.integers(1, 4),
    children_per_parent=st.integers(1, 4),
    n_independent=st.integers(0, 4),
    parent_prob=st.floats(0.3, 0.9),
    child_prob=st.floats(0.5, 1.0),
    independent_prob=st.floats(0.0, 0.5),
    magnitude_std=st.just(0.0),
    seed=st.integers(0, 1000),
)


def hand_built_coder(toy: ToyModel, enc: torch.Tensor, dec: torch.Tensor) -> SparseCoder:
    """A sparsify coder with one latent per row of ``enc``/``dec`` and no TopK limit."""
    n = enc.shape[0]
    coder = SparseCoder(toy.cfg.d_model, SparseCoderConfig(num_latents=n, k=n))
    with torch.no_grad():
        coder.encoder.weight.copy_(enc)
        coder.encoder.bias.zero_()
        coder.W_dec.copy_(dec / dec.norm(dim=1, keepdim=True))
        coder.b_dec.zero_()
    return coder.eval()


def ideal_coder(toy: ToyModel) -> SparseCoder:
    return hand_built_coder(toy, toy.directions, toy.directions)


def absorbing_coder(toy: ToyModel) -> SparseCoder:
    """Each child latent carries its parent's direction; the parent latent is silenced
    whenever a child fires (its encoder subtracts the children)."""
    enc, dec = toy.directions.clone(), toy.directions.clone()
    for p in toy.parents.tolist():
        kids = toy.children[p]
        enc[p] = toy.directions[p] - 2 * toy.directions[kids].sum(0)
        dec[kids] = toy.directions[kids] + toy.directions[p]
    return hand_built_coder(toy, enc, dec)


@settings(max_examples=25, deadline=None)
@given(cfg=toy_configs, sample_seed=st.integers(0, 100))
def test_samples_respect_the_hierarchy(cfg, sample_seed):
    toy = ToyModel(cfg)
    x, feats = toy.sample(300, seed=sample_seed)
    on = feats > 0
    kids_on = on[:, toy.children]  # [n, parents, children]
    assert not (kids_on.any(-1) & ~on[:, toy.parents]).any(), "a child fired without its parent"
    assert (kids_on.sum(-1) <= 1).all(), "two children of one parent fired together"
    torch.testing.assert_close(x, feats @ toy.directions)
    torch.testing.assert_close(toy.directions.norm(dim=1), torch.ones(cfg.n_features))
    gram = toy.directions @ toy.directions.T
    torch.testing.assert_close(gram, torch.eye(cfg.n_features), atol=1e-5, rtol=0)


@settings(max_examples=25, deadline=None)
@given(cfg=toy_configs, sample_seed=st.integers(0, 100))
def test_ideal_dictionary_has_no_absorption_and_perfect_matches(cfg, sample_seed):
    toy = ToyModel(cfg)
    x, feats = toy.sample(400, seed=sample_seed)
    coder = ideal_coder(toy)
    result = absorption(coder, toy, x, feats)
    if math.isnan(result["absorption_rate"]):  # no child fired in this sample
        assert sum(result["child_active_samples"]) == 0
    else:
        assert result["absorption_rate"] == 0
        assert result["parent_miss_rate"] == 0
    split = splitting(coder, toy)
    assert split["split_fraction"] == 0 and split["unmatched_fraction"] == 0
    assert split["mean_latents_per_feature"] == 1
    assert best_match_cosine(coder, toy)["mean"] == pytest.approx(1, abs=1e-5)


@settings(max_examples=25, deadline=None)
@given(cfg=toy_configs, sample_seed=st.integers(0, 100))
def test_absorbing_dictionary_absorbs_every_time(cfg, sample_seed):
    toy = ToyModel(cfg)
    x, feats = toy.sample(400, seed=sample_seed)
    result = absorption(absorbing_coder(toy), toy, x, feats)
    for rate, n in zip(result["per_parent"], result["child_active_samples"]):
        assert (math.isnan(rate) and n == 0) or rate == 1


def test_absorption_needs_a_compensating_latent():
    """Deleting the child latents' parent component turns absorption into a plain miss."""
    toy = ToyModel(ToyConfig(n_parents=3, children_per_parent=2, n_independent=2,
                             parent_prob=0.8, child_prob=0.9, magnitude_std=0.0))
    x, feats = toy.sample(500, seed=3)
    enc = toy.directions.clone()
    for p in toy.parents.tolist():
        enc[p] = toy.directions[p] - 2 * toy.directions[toy.children[p]].sum(0)
    coder = hand_built_coder(toy, enc, toy.directions)
    result = absorption(coder, toy, x, feats)
    assert result["absorption_rate"] == 0
    assert result["parent_miss_rate"] == 1


def test_split_feature_is_counted():
    toy = ToyModel(ToyConfig(n_parents=2, children_per_parent=2, n_independent=2))
    d = toy.directions
    extra = (d[0] + 0.3 * d[5])[None]  # a second latent close to feature 0
    coder = hand_built_coder(toy, torch.cat([d, extra]), torch.cat([d, extra]))
    split = splitting(coder, toy)
    assert split["latents_per_feature"][0] == 2
    assert split["split_fraction"] == pytest.approx(1 / toy.cfg.n_features)


def _train(x, seed, **matryoshka):
    cfg = MatryoshkaSparseCoderConfig(num_latents=48, k=4, **matryoshka)
    return fit_activations(x, cfg, batch_size=512, epochs=8, seed=seed,
                           optimizer="adam", lr=3e-3, lr_warmup_steps=10)


def test_matryoshka_absorbs_less_than_topk_on_the_toy():
    """Direction only: Matryoshka's mean absorption over two seeds is below plain TopK's."""
    # One thread: the suite shares a small CPU, where torch's thread pool only contends.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rates = _toy_absorption_rates()
    finally:
        torch.set_num_threads(threads)
    mean = {k: sum(v) / len(v) for k, v in rates.items()}
    assert mean["matryoshka"] < mean["topk"], rates


def _toy_absorption_rates() -> dict[str, list[float]]:
    toy = ToyModel(ToyConfig())  # 48 features: 8 parents x 3 children + 16 independent
    x, _ = toy.sample(16384, seed=1)
    x_test, f_test = toy.sample(4000, seed=2)
    rates = {"topk": [], "matryoshka": []}
    for seed in (0, 1):
        for name, kw in (("topk", {"matryoshka": False}),
                         ("matryoshka", {"matryoshka": True, "prefix_schedule": "fixed"})):
            coder = _train(x, seed, **kw)
            m = ground_truth_metrics(coder, toy, x_test, f_test)
            rates[name].append(m["absorption"]["absorption_rate"])
    return rates
