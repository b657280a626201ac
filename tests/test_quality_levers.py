"""The training-quality levers of issue #20 and the harder toy hierarchies.

Each lever has a property test of what it promises and a one-line error for bad values;
benchmarks/quality measures what each does to absorption and FVU.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sparsify import SparseCoder

from matryoshka_plugin import MatryoshkaSparseCoderConfig
from matryoshka_plugin.adapters.sparsify import MatryoshkaSparseCoder
from matryoshka_plugin.core import MatryoshkaConfig, MatryoshkaConfigError, UsageError
from matryoshka_plugin.fit import as_prefix_coder, epoch_row_order, fit_activations, run_defaults
from matryoshka_plugin.toy import ToyModel, hard_toy_config, oracle_fvu

# -- harder toys -----------------------------------------------------------------------


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10**6), cosine=st.floats(0, 0.9), corr=st.floats(0, 1))
def test_hard_toy_keeps_the_tree_and_plants_the_cosines(seed, cosine, corr):
    toy = ToyModel(hard_toy_config(seed, descendant_cosine=cosine, parent_correlation=corr,
                                   n_parents=4, n_independent=2))
    _, feats = toy.sample(2000, seed=seed)
    on = feats > 0
    kids, grandkids = toy.children, toy.grandchildren
    assert not (on[:, kids].any(-1) & ~on[:, toy.parents]).any(), "a child fired without its parent"
    flat_kids = kids.flatten()
    assert not (on[:, grandkids].any(-1) & ~on[:, flat_kids]).any(), "a grandchild without its child"
    assert (on[:, grandkids].sum(-1) <= 1).all(), "two grandchildren of one child fired together"
    d = toy.directions
    torch.testing.assert_close(d.norm(dim=1), torch.ones(len(d)))
    child_cos = (d[kids] * d[toy.parents][:, None]).sum(-1)
    grand_cos = (d[grandkids] * d[flat_kids][:, None]).sum(-1)
    if cosine:
        torch.testing.assert_close(child_cos, torch.full_like(child_cos, cosine))
        torch.testing.assert_close(grand_cos, torch.full_like(grand_cos, cosine))


def test_parent_correlation_couples_pairs_and_keeps_their_rate():
    toy = ToyModel(hard_toy_config(parent_correlation=0.5))
    _, feats = toy.sample(40000, seed=3)
    on = (feats[:, :2] > 0).float()
    assert on.mean(0).sub(toy.cfg.parent_prob).abs().max() < 0.01
    assert 0.4 < torch.corrcoef(on.T)[0, 1] < 0.6


@settings(max_examples=20, deadline=None)
@given(k=st.integers(1, 12), seed=st.integers(0, 1000))
def test_oracle_absorbing_coder_loses_less_at_fixed_k(k, seed):
    toy = ToyModel(hard_toy_config(seed))
    _, feats = toy.sample(500, seed=seed)
    kept, absorbed = (oracle_fvu(toy, feats, k, absorb=a) for a in (False, True))
    assert absorbed <= kept + 1e-6
    max_l0 = int((feats > 0).sum(1).max())
    if k >= max_l0:
        assert kept < 1e-10, "keeping every feature must reconstruct exactly"


@pytest.mark.parametrize("field, value", [
    ("grandchildren_per_child", -1), ("grandchild_prob", 1.5),
    ("descendant_cosine", 1.0), ("parent_correlation", -0.1),
])
def test_hard_toy_bad_values_are_one_line_errors(field, value):
    with pytest.raises(UsageError, match=f"{field}={value}") as e:
        hard_toy_config(**{field: value})
    assert "\n" not in str(e.value)


# -- per-epoch shuffling -------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 300), epochs=st.integers(1, 4), seed=st.integers(0, 10**6))
def test_every_epoch_is_a_permutation_and_the_first_one_is_fixed(n, epochs, seed):
    shuffled = epoch_row_order(n, epochs, seed, shuffle=True).view(epochs, n)
    repeated = epoch_row_order(n, epochs, seed, shuffle=False).view(epochs, n)
    for order in (*shuffled, *repeated):
        assert torch.equal(order.sort().values, torch.arange(n))
    assert torch.equal(shuffled[0], repeated[0])
    assert all(torch.equal(r, repeated[0]) for r in repeated)
    if n >= 8 and epochs > 1:  # 8! orders: two equal draws are all but impossible
        assert not torch.equal(shuffled[1], shuffled[0])


# -- defaults sized to the run ------------------------------------------------------


def test_warmup_is_a_tenth_of_the_run_with_a_notice(capsys):
    kwargs = {"optimizer": "adam"}
    run_defaults(kwargs, steps=80, rows_per_epoch=1000)
    assert kwargs["lr_warmup_steps"] == 8
    assert "lr_warmup_steps=8" in capsys.readouterr().err
    given_kwargs = {"optimizer": "adam", "lr_warmup_steps": 3}
    run_defaults(given_kwargs, steps=80, rows_per_epoch=1000)
    assert given_kwargs["lr_warmup_steps"] == 3
    signum = {}
    run_defaults(signum, steps=80, rows_per_epoch=1000)
    assert "lr_warmup_steps" not in signum  # sparsify's signum has no warm-up


def test_auxk_counts_dead_latents_within_the_run():
    kwargs = {"auxk_alpha": 0.1}
    run_defaults(kwargs, steps=80, rows_per_epoch=1000)
    assert kwargs["dead_feature_threshold"] == 100
    off = {}
    run_defaults(off, steps=80, rows_per_epoch=1000)
    assert "dead_feature_threshold" not in off


@pytest.mark.parametrize("epochs", [0, -1, 1.5])
def test_bad_epochs_is_a_one_line_error(epochs):
    cfg = MatryoshkaSparseCoderConfig(num_latents=8, k=2)
    with pytest.raises(UsageError, match=f"epochs={epochs}") as e:
        fit_activations(torch.randn(256, 4), cfg, batch_size=64, epochs=epochs)
    assert "\n" not in str(e.value)


# -- every entry point's coder evaluates the same way -------------------------------------


def test_plain_fit_returns_a_prefix_coder_with_sparsify_outputs():
    x = torch.randn(512, 8)
    cfg = MatryoshkaSparseCoderConfig(num_latents=16, k=3)
    coder = fit_activations(x, cfg, batch_size=128, seq_len=16, optimizer="adam", lr_warmup_steps=1)
    assert isinstance(coder, MatryoshkaSparseCoder) and not coder.training
    assert coder.nested_sizes == [16]
    fvu = coder.prefix_fvu(x, prefix_lens=[4, 16])
    assert set(fvu) == {4, 16} and fvu[4] >= fvu[16]
    # The same weights in stock sparsify give the same outputs.
    plain = SparseCoder(8, cfg)
    plain.load_state_dict(coder.state_dict())
    torch.testing.assert_close(plain.eval()(x).sae_out, coder(x).sae_out)


def test_as_prefix_coder_keeps_a_transcoder_with_skip():
    cfg = MatryoshkaSparseCoderConfig(num_latents=12, k=2, transcode=True, skip_connection=True)
    plain = SparseCoder(6, cfg, decoder=True)
    twin = as_prefix_coder(plain)
    x = torch.randn(20, 6)
    torch.testing.assert_close(twin(x).sae_out, plain(x).sae_out)
    assert as_prefix_coder(twin) is twin


# -- level-weight schedule -----------------------------------------------------------


def test_fit_without_a_warmup_warms_up_over_a_tenth_of_its_steps(capsys):
    cfg = MatryoshkaSparseCoderConfig(num_latents=16, k=2)
    # 1024 rows x 2 epochs in batches of 128: 16 steps, so 2 of warm-up (not 1000).
    fit_activations(torch.randn(1024, 8), cfg, batch_size=128, seq_len=16, epochs=2, optimizer="adam")
    assert "lr_warmup_steps=2 (10% of the 16 steps" in capsys.readouterr().err
