"""The Matryoshka options: resolution of nested sizes, sampling invariants, validation."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from matryoshka_plugin.core import (
    BUSSMANN_GROUP_FRACTIONS,
    MatryoshkaConfig,
    MatryoshkaConfigError,
    PrefixActivation,
    PrefixSampler,
    check_prefix_len,
)


def test_default_sizes_are_bussmanns_groups():
    sizes = MatryoshkaConfig(matryoshka=True).resolve_nested_sizes(1024, 32)
    expected, total = [], 0.0
    for f in BUSSMANN_GROUP_FRACTIONS:
        total += f
        expected.append(round(total * 1024))
    assert sizes == expected and sizes[-1] == 1024


def test_explicit_sizes_imply_the_full_width():
    cfg = MatryoshkaConfig(matryoshka=True, nested_sizes=[4, 16])
    assert cfg.resolve_nested_sizes(64, 8) == [4, 16, 64]
    assert MatryoshkaConfig(nested_sizes=[4, 64]).resolve_nested_sizes(64, 8) == [4, 64]


@settings(max_examples=100, deadline=None)
@given(
    schedule=st.sampled_from(["pareto", "uniform"]),
    width=st.integers(2, 5000),
    num_prefixes=st.integers(1, 20),
    min_frac=st.floats(0, 0.99),
    shape=st.floats(0.05, 5),
    seed=st.integers(0, 2**31 - 1),
)
def test_sampled_prefixes_increase_stay_in_range_and_end_at_width(
    schedule, width, num_prefixes, min_frac, shape, seed
):
    min_prefix = max(1, min(int(min_frac * width), width - 1))
    cfg = MatryoshkaConfig(
        matryoshka=True, prefix_schedule=schedule, num_prefixes=num_prefixes,
        min_prefix=min_prefix, pareto_shape=shape, prefix_seed=seed,
    )
    sampler = PrefixSampler(cfg, width, 1)
    for _ in range(3):
        sizes = sampler()
        assert sizes[-1] == width
        assert all(b > a for a, b in zip(sizes, sizes[1:]))
        assert all(min_prefix <= s for s in sizes)
        assert len(sizes) <= num_prefixes + 1


def test_sampler_state_round_trip_replays_the_same_prefixes():
    cfg = MatryoshkaConfig(matryoshka=True, prefix_schedule="pareto", prefix_seed=3)
    sampler = PrefixSampler(cfg, 4096, 32)
    sampler()
    state = sampler.state_dict()
    ahead = [sampler() for _ in range(5)]
    replay = PrefixSampler(cfg, 4096, 32)
    replay.load_state_dict(state)
    assert [replay() for _ in range(5)] == ahead


def test_pareto_puts_more_mass_on_short_prefixes():
    cfg = MatryoshkaConfig(prefix_schedule="pareto", num_prefixes=50, pareto_shape=0.5)
    draws = torch.tensor(sum((PrefixSampler(cfg, 1000, 1)()[:-1] for _ in range(20)), []))
    assert (draws < 500).float().mean() > 0.6


BAD_CONFIGS = [
    (dict(prefix_schedule="geometric"), "prefix_schedule='geometric'"),
    (dict(nested_sizes=[8, 4]), "strictly increasing"),
    (dict(nested_sizes=[0, 4]), "positive integers"),
    (dict(nested_sizes=[4], group_fractions=[0.5, 0.5]), "contradict"),
    (dict(group_fractions=[0.5, 0.2]), "sum to 1"),
    (dict(prefix_schedule="pareto", nested_sizes=[4]), "apply to prefix_schedule='fixed'"),
    (dict(num_prefixes=0), "num_prefixes=0"),
    (dict(min_prefix=0), "min_prefix=0"),
    (dict(pareto_shape=0.0), "pareto_shape=0.0"),
    (dict(level_weights=[1, -1]), "non-negative"),
    (dict(prefix_schedule="uniform", level_weights=[1.0]), "need prefix_schedule='fixed'"),
    (dict(prefix_schedule="pareto", nested_decoders=True), "nested_decoders=True"),
    (dict(batch_topk_momentum=1.0), "batch_topk_momentum=1.0"),
]


@pytest.mark.parametrize("kwargs,message", BAD_CONFIGS)
def test_bad_options_fail_at_load_with_the_value_named(kwargs, message):
    with pytest.raises(MatryoshkaConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        MatryoshkaConfig(matryoshka=True, **kwargs)


@pytest.mark.parametrize(
    "kwargs,width,k,message",
    [
        (dict(nested_sizes=[4, 128]), 64, 8, "exceed the width"),
        (dict(), 64, 128, "k=128 exceeds"),
        (dict(group_fractions=[0.01, 0.99]), 32, 4, "empty groups"),
        (dict(level_weights=[1.0, 1.0]), 64, 8, "level_weights has 2 entries"),
        (dict(prefix_schedule="pareto", min_prefix=64), 64, 8, "min_prefix=64"),
    ],
)
def test_width_dependent_checks(kwargs, width, k, message):
    with pytest.raises(MatryoshkaConfigError, match=message):
        MatryoshkaConfig(matryoshka=True, **kwargs).resolve_nested_sizes(width, k)


def test_prefix_activation_zeroes_only_latents_at_or_beyond_p():
    base = torch.nn.ReLU()
    x = torch.randn(3, 5, 10)
    for p in range(1, 11):
        out = PrefixActivation(base, p)(x)
        assert torch.equal(out[..., :p], base(x)[..., :p])
        assert (out[..., p:] == 0).all()
    assert torch.equal(PrefixActivation(base, None)(x), base(x))


@pytest.mark.parametrize("bad", [0, -1, 11, 2.5, True])
def test_check_prefix_len_rejects_out_of_range(bad):
    with pytest.raises(ValueError, match="1..10"):
        check_prefix_len(bad, 10)
