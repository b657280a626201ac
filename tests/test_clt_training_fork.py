"""CLT training path 2: the nested loss inside EleutherAI clt-training's own runner/trainer.

These tests need clt-training as the installed ``sparsify`` (it replaces PyPI
eai-sparsify, so it lives in its own venv: ``integration_tests/clt_training.sh``) and
its Triton kernels: CUDA, or on CPU ``TRITON_INTERPRET=1``, which runs the forward pass
(all the loss checks here) but not the encoder's backward kernel (``fit``).
In the plugin's normal venv only the refusal test runs; the rest skip with the reason.
"""

import os

import pytest
import torch

from matryoshka_plugin.adapters.installed_sparsify import detect_clt_training

FORK = detect_clt_training()
CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
needs_fork = pytest.mark.skipif(
    FORK is None,
    reason="EleutherAI clt-training is not the installed sparsify (PyPI eai-sparsify is); "
    "run integration_tests/clt_training.sh <clt-training checkout>",
)
needs_kernels = pytest.mark.skipif(
    FORK is not None and not CUDA and not INTERPRET,
    reason="clt-training's Triton kernels need CUDA; without a GPU set TRITON_INTERPRET=1 "
    "(integration_tests/clt_training.sh does)",
)
needs_cuda = pytest.mark.skipif(
    FORK is not None and not CUDA,
    reason="Trainer.fit back-propagates through clt-training's Triton encoder kernel, which "
    "Triton's CPU interpreter rejects (InterpreterError: ValueError('mask has unsupported "
    "dtype')); needs CUDA",
)
DEVICE = "cuda" if CUDA else "cpu"
# On CUDA the fork computes its FVU under bfloat16 autocast (its own decorator).
RTOL = 2e-2 if CUDA and torch.cuda.is_bf16_supported() else 2e-5
N_LAYERS, D, M, K = 3, 16, 32, 4


def test_adapter_refuses_pypi_sparsify():
    if FORK is not None:
        pytest.skip("clt-training is installed: the adapter imports")
    from matryoshka_plugin.adapters.installed_sparsify import detect_clt_training as detect

    assert detect() is None
    with pytest.raises(RuntimeError, match="needs EleutherAI clt-training"):
        import matryoshka_plugin.adapters.clt_training_fork  # noqa: F401


@pytest.fixture(scope="module")
def fork():
    import matryoshka_plugin.adapters.clt_training_fork as adapter

    return adapter


@pytest.fixture(scope="module")
def model_and_data():
    from datasets import Dataset
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=N_LAYERS, n_embd=D, n_head=2, vocab_size=64, n_positions=32)
    model = GPT2LMHeadModel(cfg).to(DEVICE)
    # Token ids below the GPT-2 BOS id (50256): with filter_bos the loss mask keeps all.
    ids = torch.randint(0, 64, (8, 8), generator=torch.Generator().manual_seed(0))
    ds = Dataset.from_dict({"input_ids": ids.tolist()}).with_format("torch")
    xs, ys = [], []

    def record(module, inputs, output):
        xs.append(inputs[0].flatten(0, 1))
        ys.append(output.flatten(0, 1))

    hooks = [blk.mlp.register_forward_hook(record) for blk in model.transformer.h]
    with torch.no_grad():
        model(ids[:2].to(DEVICE))
    for h in hooks:
        h.remove()
    return model, ds, xs, ys


def make_trainer(fork, model_and_data, *, cross_layer, seed=1, loss_fn="fvu", **sae_kw):
    model, ds, _, ys = model_and_data
    sae = fork.MatryoshkaCLTCoderConfig(num_latents=M, k=K, transcode=True, **sae_kw)
    cfg = fork.MatryoshkaCLTTrainConfig(
        sae,
        batch_size=4,
        hookpoints=["h.*.mlp"],
        cross_layer=cross_layer,
        loss_fn=loss_fn,
        optimizer="adam",
        lr=1e-3,
        lr_warmup_steps=1,
        log_to_wandb=False,
        filter_bos=True,  # the fork's filter_bos=False path fails: `bos_mask &= 0` on a bool
    )
    tr = fork.MatryoshkaCLTTrainer(cfg, ds, model)
    # Transcoder decoders start at zero; random weights everywhere make every term count,
    # decoders on the targets' scale so that FVUs are of order one.
    g = torch.Generator().manual_seed(seed)
    y_scale = float(torch.cat(ys).std())
    with torch.no_grad():
        for coder in tr.saes.values():
            for name, p in coder.named_parameters():
                scale = 0.5 if "enc" in name else y_scale
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return tr


def run_targets(runner, tr, xs, ys, loss_mask=None):
    """Drive the runner over every layer as the fork's forward hook does."""
    runner.reset()
    outs = []
    for i, name in enumerate(tr.saes):
        outs.append(runner(xs[i], ys[i], tr.saes[name], name, detach_grad=True, loss_mask=loss_mask))
    return outs


# -- an independent dense reference, from the raw weights --------------------------------
def window(s, cross_layer):
    """Targets source s writes into, as the fork's Trainer sizes them."""
    return range(s, s + min(max(cross_layer, 1), N_LAYERS - s))


def dense_codes(tr, xs, cross_layer, sae_cfg, W):
    """Per target j: the (value, source, latent) codes the target decodes, dense [N, S, M]."""
    coders = list(tr.saes.values())
    sparse = []  # per source: indices [N, k] of the TopK over relu pre-activations
    for s, c in enumerate(coders):
        pre = torch.relu(xs[s].double() @ W[s]["encoder.weight"].T + W[s]["encoder.bias"])
        vals, idx = pre.topk(K, dim=1)
        sparse.append((vals, idx))
    per_target = []
    for j in range(N_LAYERS):
        sources = [s for s in range(N_LAYERS) if j in window(s, cross_layer)]
        cand_v, cand_i, cand_s = [], [], []
        for s in sources:
            t = j - s
            vals, idx = sparse[s]
            multi = cross_layer > 0
            post = W[s][f"post_encs.{t}" if multi else "post_enc"]
            v = vals + post[idx] * (vals > 0)
            if sae_cfg.get("post_encoder_scale"):
                v = v * W[s][f"post_enc_scales.{t}" if multi else "post_enc_scale"][idx]
            cand_v.append(v)
            cand_i.append(idx)
            cand_s.append(torch.full_like(idx, sources.index(s)))
        v, i, src = torch.cat(cand_v, 1), torch.cat(cand_i, 1), torch.cat(cand_s, 1)
        if sae_cfg.get("topk_coalesced"):
            v, pick = v.topk(K, dim=1)
            i, src = i.gather(1, pick), src.gather(1, pick)
        dense = torch.zeros(v.shape[0], len(sources), M, dtype=v.dtype)
        dense[torch.arange(v.shape[0])[:, None], src, i] = v
        per_target.append((sources, dense))
    return per_target


def reference_loss(tr, xs, ys, cross_layer, sae_cfg, sizes, weights, stop_gradient, mask):
    """Dense float64 nested loss summed over targets, per-level FVU, and the leaf weights."""
    coders = list(tr.saes.values())
    W = [
        {n: p.detach().double().cpu().requires_grad_() for n, p in c.named_parameters()}
        for c in coders
    ]
    xs = [x.double().cpu() for x in xs]
    ys = [y.double().cpu() for y in ys]
    m = torch.ones(ys[0].shape[0], 1, dtype=torch.float64) if mask is None else mask[:, None].double().cpu()
    coalesced = sae_cfg.get("coalesce_topk", "none") == "concat"
    total, fvus = 0, []
    for j, (sources, dense) in enumerate(dense_codes(tr, xs, cross_layer, sae_cfg, W)):
        y = ys[j]
        mean = (y * m).sum(0) / m.sum()
        tv = ((y - mean).pow(2) * m).sum()
        w = W[j]
        # concat: target j's own decoder 0 decodes every source; none: the source's own.
        key = "W_decs.0" if "W_decs.0" in w else "W_dec"
        bkey = "b_decs.0" if "b_decs.0" in w else "b_dec"
        skey = "W_skips.0" if "W_skips.0" in w else "W_skip"
        assert coalesced or sources == [j]
        offset = w[bkey] + (xs[j] @ w[skey].T if skey in w else 0)
        idx = torch.arange(M)
        level_f, prev = [], None
        for lvl, size in enumerate(sizes):
            lo = sizes[lvl - 1] if lvl else 0
            keep = (idx >= lo) & (idx < size) if stop_gradient else idx < size
            part = dense.sum(1) * keep @ w[key]
            if stop_gradient:
                recon = part + (prev.detach() if prev is not None else 0)
                prev = part if prev is None else prev + part
            else:
                recon = part
            f = ((y - (recon + offset)) * m).pow(2).sum() / tv
            level_f.append(f)
            total = total + weights[lvl] * f
        fvus.append(torch.stack(level_f).detach())
    return total, torch.stack(fvus), W


CONFIGS = {
    # What the fork's own training scripts run: every source's codes, decoded per target.
    "concat": dict(cross_layer=N_LAYERS, coalesce_topk="concat", skip_connection=True),
    "concat-topk-scale": dict(
        cross_layer=2, coalesce_topk="concat", topk_coalesced=True, post_encoder_scale=True
    ),
    "per-layer-multi": dict(cross_layer=1, coalesce_topk="none", skip_connection=True),
    "per-layer-plain": dict(cross_layer=0, coalesce_topk="none"),
}


def split(cfg):
    cfg = dict(cfg)
    return cfg.pop("cross_layer"), cfg


@needs_fork
@needs_kernels
@pytest.mark.parametrize("name", list(CONFIGS))
def test_full_width_loss_equals_fork_loss(fork, model_and_data, name):
    from sparsify.runner import CrossLayerRunner

    _, _, xs, ys = model_and_data
    cross_layer, sae_kw = split(CONFIGS[name])
    tr = make_trainer(
        fork, model_and_data, cross_layer=cross_layer, matryoshka=True,
        group_fractions=[1.0], **sae_kw,
    )
    mask = torch.ones(xs[0].shape[0], dtype=torch.bool, device=DEVICE)
    mask[::3] = False
    for loss_mask in (None, mask):
        plain = run_targets(CrossLayerRunner(), tr, xs, ys, loss_mask)
        runner = fork.MatryoshkaCLTRunner(tr.prefixes)
        nested = run_targets(runner, tr, xs, ys, loss_mask)
        for name_, a, b in zip(tr.saes, plain, nested):
            assert runner.level_sizes[name_] == [M]
            assert torch.allclose(b.fvu.float(), a.fvu.float(), rtol=RTOL), (name_, a.fvu, b.fvu)
            assert torch.equal(a.latent_indices, b.latent_indices)
            assert torch.allclose(a.sae_out, b.sae_out)


@needs_fork
@needs_kernels
@pytest.mark.parametrize(
    "name,options",
    [
        ("concat", dict(nested_sizes=[4, 12])),
        ("concat", dict(nested_sizes=[4, 12], stop_gradient=True, level_weights=[3, 2, 1])),
        ("concat-topk-scale", dict(nested_sizes=[8], bias_level=True)),
        ("per-layer-multi", dict(nested_sizes=[2, 5, 20])),
        ("per-layer-plain", dict(nested_sizes=[16], stop_gradient=True)),
    ],
)
def test_nested_loss_and_gradients_match_dense_reference(fork, model_and_data, name, options):
    _, _, xs, ys = model_and_data
    cross_layer, sae_kw = split(CONFIGS[name])
    tr = make_trainer(
        fork, model_and_data, cross_layer=cross_layer, matryoshka=True, **sae_kw, **options
    )
    sizes = ([0] if options.get("bias_level") else []) + options["nested_sizes"] + [M]
    lw = options.get("level_weights")
    weights = [w / sum(lw) for w in lw] if lw else [1 / len(sizes)] * len(sizes)
    mask = torch.ones(xs[0].shape[0], dtype=torch.bool, device=DEVICE)
    mask[1::4] = False

    runner = fork.MatryoshkaCLTRunner(tr.prefixes)
    outs = run_targets(runner, tr, xs, ys, mask)
    loss = sum(o.fvu for o in outs)
    # Gradients reach the decoders, biases, skips, post-encoder terms and the detached
    # codes; the encoder's own backward (restore) is a Triton kernel, left out here.
    loss.backward()
    ref, ref_fvu, W = reference_loss(
        tr, xs, ys, cross_layer, sae_kw, sizes, weights, options.get("stop_gradient", False), mask
    )
    ref.backward()

    got_fvu = torch.stack([runner.level_fvu[n].float().cpu() for n in tr.saes])
    assert all(runner.level_sizes[n] == sizes for n in tr.saes)
    torch.testing.assert_close(got_fvu, ref_fvu.float(), rtol=RTOL, atol=1e-6)
    torch.testing.assert_close(loss.detach().double().cpu(), ref.detach(), rtol=RTOL, atol=1e-6)
    checked = 0
    for coder, w in zip(tr.saes.values(), W):
        for pname, p in coder.named_parameters():
            if "encoder" in pname:
                continue
            ref_grad = w[pname].grad
            got = p.grad
            if ref_grad is None or not ref_grad.abs().sum():
                assert got is None or not got.abs().sum(), pname
                continue
            # float32 sums against float64: tolerance relative to the gradient's scale.
            scale = float(ref_grad.abs().max())
            torch.testing.assert_close(
                got.double().cpu(), ref_grad, rtol=RTOL, atol=max(RTOL, 1e-5) * scale
            )
            checked += 1
    assert checked >= 2 * N_LAYERS  # at least a decoder and a bias per layer


@needs_fork
@needs_kernels
def test_sampled_prefixes_are_shared_by_targets_and_resume(fork, model_and_data, tmp_path):
    _, _, xs, ys = model_and_data
    kw = dict(
        cross_layer=N_LAYERS, coalesce_topk="concat", matryoshka=True,
        prefix_schedule="pareto", num_prefixes=6, prefix_seed=3,
    )
    tr = make_trainer(fork, model_and_data, **kw)
    runner = fork.MatryoshkaCLTRunner(tr.prefixes)
    steps = []
    for _ in range(3):
        outs = run_targets(runner, tr, xs, ys)
        drawn = [runner.level_sizes[n] for n in tr.saes]
        assert all(s == drawn[0] for s in drawn), drawn  # one draw per step, all targets
        assert drawn[0][-1] == M and drawn[0] == sorted(set(drawn[0]))
        steps.append(drawn[0])
    assert len({tuple(s) for s in steps}) > 1  # resampled each step

    # The fork cannot reload the optimiser state of an optimiser that never stepped
    # (KeyError: 'state'): take one step on the decoder-side gradients.
    sum(o.fvu for o in outs).backward()
    tr.optimizers[0].step()
    tr.cfg.save_dir = str(tmp_path)
    tr.save()
    ckpt = tmp_path / "unnamed"
    assert (ckpt / fork.SAMPLER_STATE_FILE).is_file()
    after = []  # the draws of the next two steps of the saved run
    for _ in range(2):
        tr.prefixes.new_step()
        after.append(tr.prefixes.sizes(M))
    resumed = make_trainer(fork, model_and_data, **kw)
    resumed.load_state(str(ckpt))
    assert resumed.prefixes.sizes(M) == after[0]
    resumed.prefixes.new_step()
    assert resumed.prefixes.sizes(M) == after[1]


@needs_fork
@needs_kernels
def test_untied_cross_layer_is_refused_because_the_fork_itself_fails(fork, model_and_data):
    from sparsify.runner import CrossLayerRunner

    _, _, xs, ys = model_and_data
    plain = make_trainer(fork, model_and_data, cross_layer=2, coalesce_topk="none")
    # The fork's own runner breaks at the first target with an earlier source.
    with pytest.raises(TypeError, match="positional arguments"):
        run_targets(CrossLayerRunner(), plain, xs, ys)
    with pytest.raises(fork.MatryoshkaConfigError, match="clt-training itself fails") as err:
        make_trainer(fork, model_and_data, cross_layer=2, coalesce_topk="none", matryoshka=True)
    assert "\n" not in str(err.value)


@needs_fork
@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(loss_fn="ce", coalesce_topk="concat"), "loss_fn='ce'"),
        (dict(coalesce_topk="per-layer"), "coalesce_topk='per-layer'"),
        (dict(coalesce_topk="concat", activation="groupmax"), "groupmax"),
        (dict(coalesce_topk="concat", nested_decoders=True), "nested_decoders"),
        (dict(coalesce_topk="concat", nested_sizes=[40]), "exceed the width"),
    ],
)
def test_bad_settings_fail_with_one_line(fork, model_and_data, kw, match):
    with pytest.raises(fork.MatryoshkaConfigError, match=match) as err:
        make_trainer(fork, model_and_data, cross_layer=N_LAYERS, matryoshka=True, **kw)
    assert "\n" not in str(err.value)


@needs_fork
def test_matryoshka_off_keeps_the_forks_runner(fork, model_and_data):
    from sparsify.runner import CrossLayerRunner

    tr = make_trainer(fork, model_and_data, cross_layer=N_LAYERS, coalesce_topk="concat")
    assert tr.prefixes is None
    assert type(tr.make_runner()) is CrossLayerRunner


@needs_fork
@needs_cuda
def test_fit_trains_with_the_nested_loss(fork, model_and_data, tmp_path):
    model, ds, xs, ys = model_and_data
    tr = make_trainer(
        fork, model_and_data, cross_layer=N_LAYERS, coalesce_topk="concat",
        matryoshka=True, nested_sizes=[4, 12],
    )
    tr.cfg.save_dir = str(tmp_path)
    before = {n: c.encoder.weight.detach().clone() for n, c in tr.saes.items()}
    runner = fork.MatryoshkaCLTRunner(tr.prefixes)
    first = [float(o.fvu) for o in run_targets(runner, tr, xs, ys)]
    tr.fit()
    for n, c in tr.saes.items():
        assert not torch.equal(c.encoder.weight, before[n]), n  # the encoder backward ran
    runner = fork.MatryoshkaCLTRunner(tr.prefixes)
    last = [float(o.fvu) for o in run_targets(runner, tr, xs, ys)]
    assert all(torch.isfinite(torch.tensor(last)))
    assert sum(last) < sum(first)
    assert (tmp_path / "unnamed" / fork.SAMPLER_STATE_FILE).is_file()


@needs_fork
@needs_kernels
def test_resume_refuses_a_sampler_file_that_would_run_code(fork, model_and_data, tmp_path):
    from test_correctness_clt import RunsCode

    from matryoshka_plugin.core.errors import CheckpointError

    kw = dict(cross_layer=N_LAYERS, coalesce_topk="concat", matryoshka=True, prefix_schedule="pareto")
    tr = make_trainer(fork, model_and_data, **kw)
    _, _, xs, ys = model_and_data
    # One optimiser step first: the fork cannot reload a state that never stepped.
    sum(o.fvu for o in run_targets(fork.MatryoshkaCLTRunner(tr.prefixes), tr, xs, ys)).backward()
    tr.optimizers[0].step()
    tr.cfg.save_dir = str(tmp_path)
    tr.save()
    marker = tmp_path / "MARKER"
    torch.save({M: RunsCode(marker)}, tmp_path / "unnamed" / fork.SAMPLER_STATE_FILE)
    with pytest.raises(CheckpointError, match="holds more than tensors and plain data"):
        make_trainer(fork, model_and_data, **kw).load_state(str(tmp_path / "unnamed"))
    assert not marker.exists()
