"""The Matryoshka coder and trainer against the real sparsify 1.3.3."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sparsify import SparseCoder, SparseCoderConfig

from matryoshka_plugin import (
    MatryoshkaSparseCoder,
    MatryoshkaSparseCoderConfig,
    MatryoshkaTrainConfig,
    MatryoshkaTrainer,
    load_coder,
    prefix_fvu,
)
from matryoshka_plugin.core.errors import CheckpointError
from matryoshka_plugin.core import MatryoshkaConfigError
from matryoshka_plugin.fit import fit_activations

D_IN = 12


def make_pair(seed=0, **cfg_kwargs):
    """A Matryoshka coder and a stock sparsify coder with identical weights."""
    cfg = MatryoshkaSparseCoderConfig(num_latents=48, k=6, **cfg_kwargs)
    torch.manual_seed(seed)
    ours = MatryoshkaSparseCoder(D_IN, cfg)
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_()
    plain = SparseCoder(D_IN, SparseCoderConfig(**{
        k: v for k, v in cfg.to_dict().items() if k in SparseCoderConfig.__dataclass_fields__
    }))
    plain.load_state_dict(ours.state_dict(), strict=False)
    return ours, plain


def loss_and_grads(coder, x, y, dead_mask=None):
    coder.zero_grad()
    out = coder(x, y, dead_mask=dead_mask)
    (out.fvu + out.auxk_loss + out.multi_topk_fvu / 8).backward()
    return out.fvu.detach(), {n: p.grad.clone() for n, p in coder.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(matryoshka=False),
        dict(matryoshka=True, nested_sizes=[48]),
        dict(matryoshka=True, nested_sizes=[48], transcode=True, skip_connection=True),
        dict(matryoshka=True, nested_sizes=[48], multi_topk=True),
    ],
)
def test_single_full_width_level_is_exactly_sparsify(kwargs):
    ours, plain = make_pair(**kwargs)
    x, y = torch.randn(20, D_IN), torch.randn(20, D_IN)
    target = y if kwargs.get("transcode") else None
    dead = torch.rand(48) < 0.3
    a = loss_and_grads(ours, x, target, dead)
    b = loss_and_grads(plain, x, target, dead)
    assert torch.equal(a[0], b[0])
    assert a[1].keys() == b[1].keys()
    for name in a[1]:
        assert torch.equal(a[1][name], b[1][name]), name


@settings(max_examples=25, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 47), unique=True, min_size=1, max_size=4).map(sorted),
    transcode=st.booleans(),
    bias_level=st.booleans(),
    multi_topk=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_level_fvus_equal_truncated_plain_decodes(sizes, transcode, bias_level, multi_topk, seed):
    ours, _ = make_pair(
        seed, matryoshka=True, nested_sizes=sizes, transcode=transcode,
        skip_connection=transcode, bias_level=bias_level, multi_topk=multi_topk,
    )
    x, y = torch.randn(16, D_IN), torch.randn(16, D_IN)
    target = y if transcode else None
    out = ours(x, target)
    levels = ([0] if bias_level else []) + sizes + [48]
    assert ours.last_sizes == levels
    # Reference: the eval-mode coder truncated to each prefix; prefix 0 is b_dec (+ skip).
    reference = prefix_fvu(ours.eval(), x, target, [p for p in levels if p > 0])
    expected = [reference[p] for p in levels if p > 0]
    got = ours.last_level_fvu.tolist()[int(bias_level):]
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert float(out.fvu.detach()) == pytest.approx(sum(ours.last_level_fvu.tolist()) / len(levels), rel=1e-5)


def test_level_weights_and_stop_gradient_change_the_loss_not_the_levels():
    x = torch.randn(16, D_IN)
    base, _ = make_pair(matryoshka=True, nested_sizes=[6, 24])
    weighted, _ = make_pair(matryoshka=True, nested_sizes=[6, 24], level_weights=[0, 0, 1])
    delta, _ = make_pair(matryoshka=True, nested_sizes=[6, 24], stop_gradient=True)
    outs = [c(x) for c in (base, weighted, delta)]
    torch.testing.assert_close(base.last_level_fvu, weighted.last_level_fvu)
    torch.testing.assert_close(base.last_level_fvu, delta.last_level_fvu)
    assert float(outs[1].fvu.detach()) == pytest.approx(float(base.last_level_fvu[-1]))
    torch.testing.assert_close(outs[2].fvu, outs[0].fvu)


def test_nested_decoders_train_their_own_weights_and_stay_unit_norm():
    ours, _ = make_pair(matryoshka=True, nested_sizes=[6, 24], nested_decoders=True)
    assert [tuple(W.shape) for W in ours.W_dec_levels] == [(6, D_IN), (24, D_IN)]
    ours.set_decoder_norm_to_unit_norm()
    for W in [ours.W_dec, *ours.W_dec_levels]:
        torch.testing.assert_close(W.norm(dim=1), torch.ones(W.shape[0]))
    ours(torch.randn(16, D_IN)).fvu.backward()
    assert all(W.grad is not None and W.grad.abs().sum() > 0 for W in ours.W_dec_levels)
    # sparsify's projection assumes unit-norm rows, as its trainer guarantees.
    ours.remove_gradient_parallel_to_decoder_directions()
    for W in [ours.W_dec, *ours.W_dec_levels]:
        assert (W.grad * W.data).sum(1).abs().max() < 1e-5


def test_nested_decoder_levels_equal_their_own_truncated_decodes():
    ours, _ = make_pair(matryoshka=True, nested_sizes=[6, 24], nested_decoders=True, bias_level=True)
    x = torch.randn(16, D_IN)
    ours(x)
    top_acts, top_indices, _ = ours.encode(x)
    total_variance = (x - x.mean(0)).pow(2).sum()
    expected = [float((x - ours.b_dec).pow(2).sum() / total_variance)]  # bias-only level
    decoders = [*zip(ours.W_dec_levels, ours.b_dec_levels), (ours.W_dec, torch.zeros(D_IN))]
    for p, (W, b_offset) in zip([6, 24, 48], decoders):
        dense = torch.zeros(16, 48).scatter(1, top_indices, top_acts)[:, :p]
        recon = dense @ W + ours.b_dec + b_offset
        expected.append(float((x - recon).pow(2).sum() / total_variance))
    assert ours.last_level_fvu.tolist() == pytest.approx(expected, rel=1e-5)


def test_eval_mode_is_the_plain_coder():
    ours, plain = make_pair(matryoshka=True, nested_sizes=[6, 24], nested_decoders=True)
    x = torch.randn(16, D_IN)
    assert torch.equal(ours.eval()(x).fvu, plain(x).fvu)


def test_batch_topk_keeps_k_per_token_on_average_and_tracks_a_threshold():
    ours, _ = make_pair(matryoshka=True, batch_topk=True)
    x = torch.randn(32, D_IN)
    out = ours(x)
    active = (out.latent_acts > 0).sum()
    assert active == 6 * 32
    threshold = float(ours.batch_topk_threshold)
    assert threshold > 0
    assert threshold == pytest.approx(float(out.latent_acts.detach()[out.latent_acts > 0].min()))
    ours.eval()
    acts, _, pre = ours.encode(x)
    assert (acts > 0).sum() == (pre > threshold).sum()


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(matryoshka=True),
        dict(matryoshka=True, nested_decoders=True, nested_sizes=[6, 24]),
        dict(matryoshka=True, batch_topk=True, transcode=True, skip_connection=True),
        dict(matryoshka=True, prefix_schedule="uniform"),
    ],
)
def test_checkpoint_round_trip_is_bit_exact(tmp_path, kwargs):
    ours, _ = make_pair(**kwargs)
    if ours.cfg.batch_topk:
        ours(torch.randn(8, D_IN), torch.randn(8, D_IN))
    ours.save_to_disk(tmp_path / "hook")
    loaded = load_coder(tmp_path / "hook")
    assert type(loaded) is MatryoshkaSparseCoder and loaded.cfg == ours.cfg
    assert loaded.state_dict().keys() == ours.state_dict().keys()
    for name, tensor in ours.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert torch.equal(loaded.batch_topk_threshold, ours.batch_topk_threshold)
    assert loaded.nested_sizes == ours.nested_sizes


def test_shared_decoder_checkpoints_load_in_stock_sparsify(tmp_path):
    ours, _ = make_pair(matryoshka=True, transcode=True, skip_connection=True)
    ours.save_to_disk(tmp_path / "hook")
    stock = SparseCoder.load_from_disk(tmp_path / "hook")
    for name, tensor in stock.state_dict().items():
        assert torch.equal(tensor, ours.state_dict()[name])
    x = torch.randn(8, D_IN)
    assert torch.equal(stock(x).sae_out, ours.eval()(x).sae_out)


def test_nested_decoder_checkpoint_in_a_plain_config_says_how_to_load(tmp_path):
    ours, _ = make_pair(matryoshka=True, nested_decoders=True, nested_sizes=[6, 24])
    ours.save_to_disk(tmp_path / "hook")
    with pytest.raises(RuntimeError):
        SparseCoder.load_from_disk(tmp_path / "hook")  # upstream's strict load
    cfg_path = tmp_path / "hook" / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["matryoshka"] = False
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="matryoshka_plugin.load_coder"):
        load_coder(tmp_path / "hook")


@pytest.mark.parametrize(
    "setup,message",
    [
        (lambda p: (p / "cfg.json").unlink(), "cfg.json not found"),
        (lambda p: (p / "cfg.json").write_text("{not json"), "not a valid sparsify cfg.json"),
        (lambda p: (p / "sae.safetensors").write_bytes(b"\x00" * 10), "not a readable safetensors"),
        (lambda p: (p / "sae.safetensors").unlink(), "sae.safetensors not found"),
    ],
)
def test_broken_checkpoints_fail_with_one_line(tmp_path, setup, message):
    ours, _ = make_pair(matryoshka=True)
    ours.save_to_disk(tmp_path / "hook")
    setup(tmp_path / "hook")
    with pytest.raises(CheckpointError, match=message) as err:
        load_coder(tmp_path / "hook")
    assert "\n" not in str(err.value)


def test_wrong_shapes_in_a_checkpoint_are_reported(tmp_path):
    ours, _ = make_pair(matryoshka=True)
    ours.save_to_disk(tmp_path / "hook")
    cfg_path = tmp_path / "hook" / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["num_latents"] = 96
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="does not match"):
        load_coder(tmp_path / "hook")


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(nested_sizes=[8, 100]), "exceed the width"),
        (dict(activation="groupmax", nested_sizes=[5]), "multiples of the groupmax group size"),
        (dict(stop_gradient=True, nested_decoders=True), "needs the shared decoder"),
    ],
)
def test_bad_coder_options(kwargs, message):
    with pytest.raises(MatryoshkaConfigError, match=message):
        MatryoshkaSparseCoder(D_IN, MatryoshkaSparseCoderConfig(matryoshka=True, num_latents=48, k=6, **kwargs))


def planted_activations(n=12000, d=24, n_features=96, seed=0):
    """Sparse sums of fixed random directions with Zipf-like frequencies."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.nn.functional.normalize(torch.randn(n_features, d, generator=g), dim=1)
    freq = 0.4 / torch.arange(1, n_features + 1) ** 0.7
    codes = (torch.rand(n, n_features, generator=g) < freq) * torch.rand(n, n_features, generator=g)
    return codes @ directions


def test_after_training_prefix_fvu_decreases_with_prefix_length():
    x = planted_activations()
    cfg = MatryoshkaSparseCoderConfig(matryoshka=True, num_latents=96, k=8)
    coder = fit_activations(
        x[:10000], cfg, batch_size=500, epochs=3, optimizer="adam", lr=3e-3, lr_warmup_steps=10
    )
    fvu = coder.prefix_fvu(x[10000:])
    values = [fvu[p] for p in coder.nested_sizes]
    assert all(b < a for a, b in zip(values, values[1:])), fvu
    assert values[-1] < 0.5


TRAIN_CASES = [
    dict(),  # SAE, fixed groups, shared decoder
    dict(transcode=True, prefix_schedule="pareto"),
    dict(transcode=True, skip_connection=True, nested_decoders=True, nested_sizes=[8, 16]),
    dict(prefix_schedule="uniform", batch_topk=True),
]


@pytest.mark.parametrize("sae_kwargs", TRAIN_CASES)
def test_trainer_fit_on_tiny_models(tmp_path, tiny_model_dir, sae_kwargs):
    from datasets import Dataset
    from transformers import AutoModel

    model = AutoModel.from_pretrained(tiny_model_dir)
    data = Dataset.from_dict(
        {"input_ids": torch.randint(2, 90, (24, 16), generator=torch.Generator().manual_seed(0))}
    ).with_format("torch")
    hookpoint = "h.0.mlp" if "gpt2" in tiny_model_dir.name else "layers.0.mlp"
    cfg = MatryoshkaTrainConfig(
        sae=MatryoshkaSparseCoderConfig(matryoshka=True, num_latents=32, k=4, **sae_kwargs),
        batch_size=4, hookpoints=[hookpoint], log_to_wandb=False,
        save_dir=str(tmp_path), run_name="run", save_every=3,
        # sparsify's default signum is ScheduleFree: it saves averaged weights, not
        # the live ones this test compares against.
        optimizer="adam", lr_warmup_steps=1,
    )
    trainer = MatryoshkaTrainer(cfg, data, model)
    coder = trainer.saes[hookpoint]
    assert isinstance(coder, MatryoshkaSparseCoder)
    before = {n: p.detach().clone() for n, p in coder.named_parameters()}
    trainer.fit()
    assert any(not torch.equal(before[n], p) for n, p in coder.named_parameters())
    run = tmp_path / "run"
    assert {p.name for p in run.iterdir()} >= {hookpoint, "config.json", "state.pt", "matryoshka_state.pt"}
    loaded = load_coder(run / hookpoint)
    for name, tensor in coder.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor)
    if not coder.cfg.nested_decoders:
        SparseCoder.load_from_disk(run / hookpoint)


def tiny_llama_trainer(tiny_llama_dir, save_dir, **sae_options) -> MatryoshkaTrainer:
    """sparsify's trainer on the tiny Llama's first MLP, fed random token ids."""
    from datasets import Dataset
    from transformers import AutoModel

    model = AutoModel.from_pretrained(tiny_llama_dir)
    data = Dataset.from_dict({"input_ids": torch.randint(2, 90, (8, 16))}).with_format("torch")
    cfg = MatryoshkaTrainConfig(
        sae=MatryoshkaSparseCoderConfig(num_latents=32, k=4, **sae_options), batch_size=4,
        hookpoints=["layers.0.mlp"], log_to_wandb=False, save_dir=str(save_dir),
    )
    return MatryoshkaTrainer(cfg, data, model)


def test_matryoshka_false_trains_stock_coders(tiny_llama_dir, tmp_path):
    trainer = tiny_llama_trainer(tiny_llama_dir, tmp_path)
    assert type(trainer.saes["layers.0.mlp"]) is SparseCoder


def test_batch_topk_without_matryoshka_is_plain_batch_topk(tiny_llama_dir, tmp_path):
    coder = tiny_llama_trainer(tiny_llama_dir, tmp_path, batch_topk=True).saes["layers.0.mlp"]
    assert isinstance(coder, MatryoshkaSparseCoder)
    x = torch.randn(10, 16)
    out = coder(x)
    assert (out.latent_acts > 0).sum() == 4 * 10  # k x batch over the whole batch
    assert coder.last_level_fvu is None  # no nested loss: plain BatchTopK
    coder.save_to_disk(tmp_path / "c")
    assert type(load_coder(tmp_path / "c")) is MatryoshkaSparseCoder


@pytest.mark.parametrize("transcode", [False, True])
def test_batch_topk_sparse_backward_equals_dense_autograd(transcode):
    ours, _ = make_pair(matryoshka=True, batch_topk=True, transcode=transcode)
    x = torch.randn(24, D_IN)
    acts, indices, _ = ours.encode(x)
    grad_out = torch.randn_like(acts)
    (acts * grad_out).sum().backward()
    params = (ours.encoder.weight, ours.encoder.bias, ours.b_dec)
    sparse = [None if p.grad is None else p.grad.clone() for p in params]
    # Reference: the same selection, differentiated densely by autograd.
    ours.zero_grad()
    inputs = x if transcode else x - ours.b_dec
    pre = torch.relu(inputs @ ours.encoder.weight.T + ours.encoder.bias)
    (pre.gather(1, indices) * (acts > 0) * grad_out).sum().backward()
    dense = [p.grad for p in params]
    assert [g is None for g in sparse] == [g is None for g in dense] == [False, False, transcode]
    for s, d in zip(sparse, dense):
        if d is not None:
            torch.testing.assert_close(s, d)
