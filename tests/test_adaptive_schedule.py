"""prefix_schedule='adaptive': nested sizes placed by the running activation mass."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from matryoshka_plugin.adapters.sparsify import MatryoshkaSparseCoder, MatryoshkaSparseCoderConfig
from matryoshka_plugin.clt import CLTConfig, CLTTrainConfig, load_clt, train_clt
from matryoshka_plugin.core import MatryoshkaConfig, MatryoshkaConfigError, PrefixSampler
from matryoshka_plugin.core.errors import CLTError
from matryoshka_plugin.core.schedules import adaptive_sizes
from matryoshka_plugin.fit import fit_activations

from test_clt_pipeline import _random_batches, _tiny_llama


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_sizes_are_increasing_below_the_width_and_hold_their_share(data):
    width = data.draw(st.integers(3, 64))
    shares = sorted(data.draw(st.sets(st.integers(1, width - 1), min_size=1, max_size=min(5, width - 1))))
    mass = torch.tensor(data.draw(st.lists(st.integers(0, 50), min_size=width, max_size=width)),
                        dtype=torch.float64)
    sizes = adaptive_sizes(mass, shares, width)
    assert len(sizes) == len(shares) + 1 and sizes[-1] == width
    assert all(a < b for a, b in zip(sizes, sizes[1:])) and sizes[0] >= 1
    total, n = mass.sum(), len(shares)
    for level, (size, share) in enumerate(zip(sizes, shares)):
        low, high = (sizes[level - 1] + 1 if level else 1), width - (n - level)
        # Not pushed by the neighbouring levels' room; no mass at all keeps the
        # configured sizes (the next test).
        if low < size < high and total > 0:
            assert mass[:size].sum() * width >= share * total, "holds its share"
            assert mass[: size - 1].sum() * width < share * total, "and is the shortest that does"


@settings(max_examples=30, deadline=None)
@given(width=st.integers(2, 64), data=st.data(), m=st.integers(1, 9))
def test_equal_mass_gives_back_the_configured_sizes(width, data, m):
    shares = sorted(data.draw(st.sets(st.integers(1, width - 1), min_size=1, max_size=width - 1)))
    assert adaptive_sizes(torch.full((width,), float(m), dtype=torch.float64), shares, width) == [*shares, width]
    assert adaptive_sizes(torch.zeros(width, dtype=torch.float64), shares, width) == [*shares, width]


def test_mass_on_the_first_latents_shrinks_the_levels():
    mass = torch.zeros(64, dtype=torch.float64)
    mass[:8] = 1.0
    # Shares 4/64, 16/64, 32/64 of the mass: 1/2, 2 and 4 of the 8 latents holding it.
    assert adaptive_sizes(mass, [4, 16, 32], 64) == [1, 2, 4, 64]


def test_sampler_moves_the_sizes_every_adaptive_every_steps_and_restores_them():
    cfg = MatryoshkaConfig(matryoshka=True, prefix_schedule="adaptive", nested_sizes=[4, 8],
                           adaptive_every=2)
    sampler = PrefixSampler(cfg, 16, 2)
    acts, idx = torch.ones(1, 2), torch.tensor([[0, 1]])
    assert sampler() == [4, 8, 16]
    sampler.observe(acts, idx)
    assert sampler() == [4, 8, 16]
    sampler.observe(acts, idx)
    saved = sampler.state_dict()
    assert sampler() == [1, 2, 16]  # all the mass on latents 0 and 1
    again = PrefixSampler(cfg, 16, 2)
    again.load_state_dict(saved)
    assert again() == [1, 2, 16]
    assert not again.mass.mass.any(), "each move starts a new window"


@pytest.mark.parametrize("fields, message", [
    (dict(prefix_schedule="adaptive", nested_decoders=True), "nested_decoders=True gives each level"),
    (dict(prefix_schedule="adaptive", level_weights=[1, 1, 1, 1, 1]), "level_weights=.* weight levels whose sizes"),
    (dict(prefix_schedule="adaptive", adaptive_every=0), r"adaptive_every=0 is not allowed; expected an integer >= 1"),
    (dict(prefix_schedule="adaptive", adaptive_every=1.5), r"adaptive_every=1.5 is not allowed"),
    (dict(permute_every=-1), r"permute_every=-1 is not allowed; expected an integer >= 0"),
    (dict(permute_every=True), r"permute_every=True is not allowed"),
    (dict(permute_every=5, nested_decoders=True), "permute_every=5 would move latents across the levels"),
    (dict(prefix_schedule="adaptive", activation="groupmax", num_latents=64, k=4),
     "prefix_schedule='adaptive' needs activation='topk'"),
    (dict(permute_every=2, activation="groupmax", num_latents=64, k=4), "permute_every=2 needs activation='topk'"),
])
def test_bad_options_are_refused_in_one_line(fields, message):
    with pytest.raises(MatryoshkaConfigError, match=message) as e:
        cfg = MatryoshkaSparseCoderConfig(matryoshka=True, **fields)
        MatryoshkaSparseCoder(8, cfg)
    assert "\n" not in str(e.value)


def test_permute_every_needs_matryoshka():
    with pytest.raises(MatryoshkaConfigError, match="permute_every=3 orders latents .* needs matryoshka=true"):
        MatryoshkaSparseCoderConfig(matryoshka=False, permute_every=3)


def test_clt_refuses_adaptive_with_permutation():
    with pytest.raises(MatryoshkaConfigError, match="a CLT takes one of them"):
        CLTConfig(matryoshka=True, prefix_schedule="adaptive", permute_every=2)


def test_fit_activations_moves_the_sizes_towards_the_mass():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 4, generator=g) @ torch.randn(4, 16, generator=g)
    cfg = MatryoshkaSparseCoderConfig(matryoshka=True, num_latents=64, k=4,
                                      prefix_schedule="adaptive", adaptive_every=8)
    coder = fit_activations(x, cfg, batch_size=64, seq_len=16, optimizer="adam", lr=3e-3)
    assert coder.nested_sizes != cfg.resolve_nested_sizes(64, 4)
    assert coder.sampler.steps == 32


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    from matryoshka_plugin.clt import cache_activations

    root = tmp_path_factory.mktemp("clt-adaptive")
    model = _tiny_llama(root / "model")
    return cache_activations(model, _random_batches(), [0, 1], root / "cache", n_tokens=1200,
                             show_progress=False)


@pytest.mark.parametrize("fields", [dict(prefix_schedule="adaptive", adaptive_every=2, nested_sizes=[4, 12]),
                                    dict(permute_every=2, nested_sizes=[4, 12])], ids=["adaptive", "permute"])
def test_clt_resume_equals_an_uninterrupted_run(cache, tmp_path, fields):
    def run(name, steps, resume=False):
        clt = CLTConfig(matryoshka=True, num_latents=32, k=4, **fields)
        cfg = CLTTrainConfig(cache=str(cache), save_dir=str(tmp_path / name), clt=clt, batch_size=128,
                             lr=3e-4, lr_warmup_steps=2, max_steps=steps, save_every=3, resume=resume)
        return train_clt(cfg, show_progress=False)

    straight = run("straight", 8)
    run("cut", 5)  # checkpoints at step 3 and at its end, step 5
    resumed = run("cut", 8, resume=True)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name, rtol=0, atol=0)
    assert resumed.nested_sizes == straight.nested_sizes
    if "prefix_schedule" in fields:
        assert straight.nested_sizes != [4, 12, 32], "the sizes never moved: nothing tested"
        assert load_clt(tmp_path / "straight" / "clt").nested_sizes == straight.nested_sizes


def test_options_round_trip_through_config_files_and_coder_checkpoints(tmp_path):
    import json

    from matryoshka_plugin.adapters.sparsify import load_coder
    from matryoshka_plugin.adapters.sparsify.run_config import read_config_file

    fields = {"matryoshka": True, "prefix_schedule": "adaptive", "adaptive_every": 7, "permute_every": 3}
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"sae": fields}))
    sae = read_config_file(str(path)).sae
    assert (sae.prefix_schedule, sae.adaptive_every, sae.permute_every) == ("adaptive", 7, 3)
    path.write_text(json.dumps({"sae": {**fields, "adaptive_every": "7"}}))
    with pytest.raises(Exception, match="adaptive_every") as e:
        read_config_file(str(path))
    assert "\n" not in str(e.value)
    coder = MatryoshkaSparseCoder(8, MatryoshkaSparseCoderConfig(num_latents=32, k=2, **fields))
    coder.save_to_disk(tmp_path / "coder")
    loaded = load_coder(tmp_path / "coder")
    assert (loaded.cfg.prefix_schedule, loaded.cfg.adaptive_every, loaded.cfg.permute_every) == ("adaptive", 7, 3)
    clt = CLTConfig(matryoshka=True, prefix_schedule="adaptive", adaptive_every=5)
    assert CLTConfig.from_dict(clt.to_dict()) == clt


def test_adapted_sizes_reach_the_checkpoint_its_loads_and_the_export(tmp_path):
    """The sizes training moved to, not the configured ones, are what a loaded coder
    measures prefixes at and what the export records for circuit-tracer's prefixes."""
    import json
    import shutil

    from matryoshka_plugin.adapters.circuit_tracer.sparsify_export import export_transcoder_set
    from matryoshka_plugin.adapters.circuit_tracer.transcoder_dir import read_nested_sizes
    from matryoshka_plugin.adapters.sparsify import load_coder
    from matryoshka_plugin.fit import HOOKPOINT

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 4, generator=g) @ torch.randn(4, 16, generator=g)
    y = x @ torch.randn(16, 16, generator=g)
    cfg = MatryoshkaSparseCoderConfig(matryoshka=True, num_latents=64, k=4, transcode=True,
                                      prefix_schedule="adaptive", adaptive_every=8)
    trained = fit_activations(x, cfg, targets=y, batch_size=64, seq_len=16, optimizer="adam",
                              lr=3e-3, save_dir=tmp_path, run_name="run")
    sizes = trained.nested_sizes
    assert sizes != cfg.resolve_nested_sizes(64, 4), "the sizes never moved: nothing tested"
    saved = tmp_path / "run" / HOOKPOINT
    loaded = load_coder(saved)
    assert loaded.nested_sizes == sizes
    assert list(loaded.prefix_fvu(x, y)) == sizes
    assert loaded.cfg.resolve_nested_sizes(64, 4) == cfg.resolve_nested_sizes(64, 4), "the config keeps the starting sizes"

    shutil.copytree(saved, tmp_path / "mlps" / "layers.0.mlp")
    export_transcoder_set(tmp_path / "mlps", tmp_path / "export")
    assert read_nested_sizes(tmp_path / "export")["nested_sizes"] == sizes

    # A cfg.json written before the sizes were recorded loads with the starting sizes, and says so.
    cfg_json = saved / "cfg.json"
    cfg_json.write_text(json.dumps({k: v for k, v in json.loads(cfg_json.read_text()).items()
                                    if k != "adapted_nested_sizes"}))
    with pytest.warns(UserWarning, match="records no adapted_nested_sizes"):
        assert load_coder(saved).nested_sizes == cfg.resolve_nested_sizes(64, 4)


def test_clt_refuses_a_bad_adapted_sizes_record_in_one_line(tmp_path):
    import json

    from matryoshka_plugin.clt import MatryoshkaCLT, save_clt

    cfg = CLTConfig(matryoshka=True, num_latents=32, k=4, nested_sizes=[4, 12], prefix_schedule="adaptive")
    save_clt(MatryoshkaCLT(8, [0, 1], cfg), tmp_path / "c")
    path = tmp_path / "c" / "config.json"
    d = json.loads(path.read_text())
    d["nested_sizes_by_layer"] = {"0": [12, 4, 32], "1": [12, 4, 32]}
    path.write_text(json.dumps(d))
    with pytest.raises(CLTError, match=r"adapted nested sizes \[12, 4, 32\] do not fit") as e:
        load_clt(tmp_path / "c")
    assert "\n" not in str(e.value)
