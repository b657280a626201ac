"""Mechanistic fidelity against transcoders that are exact copies of ReLU MLPs (issue #13).

Each block's MLP is made ``ReLU(x W_in + b_in) W_out + b_out`` and each transcoder is
built from those weights (``W_enc = W_in``, ``W_dec = W_out``, one latent per MLP
neuron, ReLU: every latent may fire). The local replacement model then *is* the model,
so fidelity must be 1 at every layer; noise added to the decoders must lower it, more
noise more so. A wrong implementation (errors recomputed from the wrong inputs, deltas
at the wrong layer or position, the replacement run left unpatched) fails these.
"""

import pytest
import torch
from circuit_tracer.transcoder.single_layer_transcoder import SingleLayerTranscoder, TranscoderSet
from torch import nn

from matryoshka_plugin.adapters.circuit_tracer import load_local_replacement_model
from matryoshka_plugin.causal import mechanistic_fidelity, tokenize, top_features

from tiny import D_MODEL, N_LAYERS, PROMPT, build_tiny_llama

D_MLP = 2 * D_MODEL


class ReLUMLP(nn.Module):
    """``ReLU(x W_in + b_in) W_out + b_out``, an MLP a transcoder can copy exactly."""

    def __init__(self, W_in, b_in, W_out, b_out):
        super().__init__()
        self.W_in, self.b_in, self.W_out, self.b_out = W_in, b_in, W_out, b_out

    def forward(self, x):
        return torch.relu(x @ self.W_in + self.b_in) @ self.W_out + self.b_out


@pytest.fixture(scope="module")
def exact(tmp_path_factory):
    llama = build_tiny_llama(tmp_path_factory.mktemp("fidelity") / "llama")
    g = torch.Generator().manual_seed(0)
    weights = [
        (torch.randn(D_MODEL, D_MLP, generator=g), torch.randn(D_MLP, generator=g) * 0.1,
         torch.randn(D_MLP, D_MODEL, generator=g) * 0.3, torch.randn(D_MODEL, generator=g) * 0.1)
        for _ in range(N_LAYERS)
    ]
    tcs = {}
    for l, (W_in, b_in, W_out, b_out) in enumerate(weights):
        tc = SingleLayerTranscoder(D_MODEL, D_MLP, nn.ReLU(), l, device=torch.device("cpu"), dtype=torch.float32)
        with torch.no_grad():
            tc.W_enc.copy_(W_in.T)
            tc.b_enc.copy_(b_in)
            tc.W_dec.copy_(W_out)
            tc.b_dec.copy_(b_out)
        tcs[l] = tc
    model = load_local_replacement_model(llama, TranscoderSet(tcs, "mlp.hook_in", "mlp.hook_out", scan="exact"))
    for block, w in zip(model.blocks, weights):
        block.mlp.old_mlp = ReLUMLP(*w)
    tokens = tokenize(model, PROMPT)
    return model, tokens, weights


def test_the_transcoders_copy_the_mlps(exact):
    model, tokens, _ = exact
    _, cache = model.run_with_cache(tokens)
    for l in range(N_LAYERS):
        x, y = cache[f"blocks.{l}.mlp.hook_in"], cache[f"blocks.{l}.mlp.hook_out"]
        torch.testing.assert_close(model.transcoders[l](x), y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("factor", [0.0, 2.0])
def test_exact_transcoders_give_fidelity_one(exact, factor):
    model, tokens, _ = exact
    feats = top_features(model, tokens, 2, max_layer=0)
    fid = mechanistic_fidelity(model, tokens, feats, factor)
    assert fid.change_norm > 1e-3  # the patch does something downstream
    assert fid.cosine == pytest.approx(1.0, abs=1e-6)
    assert fid.nmse == pytest.approx(0.0, abs=1e-6)
    assert all(c == pytest.approx(1.0, abs=1e-6) for c in fid.layer_cosine)


def test_decoder_noise_degrades_fidelity_monotonically(exact):
    model, tokens, weights = exact
    feats = top_features(model, tokens, 2, max_layer=0)
    g = torch.Generator().manual_seed(1)
    noise = [torch.randn(D_MLP, D_MODEL, generator=g) for _ in range(N_LAYERS)]
    cosines, nmses = [], []
    try:
        for scale in (0.0, 0.03, 0.1, 0.3, 1.0):
            with torch.no_grad():
                for l, (_, _, W_out, _) in enumerate(weights):
                    model.transcoders[l].W_dec.copy_(W_out + scale * noise[l])
            fid = mechanistic_fidelity(model, tokens, feats, 0.0)
            cosines.append(fid.cosine)
            nmses.append(fid.nmse)
    finally:
        with torch.no_grad():
            for l, (_, _, W_out, _) in enumerate(weights):
                model.transcoders[l].W_dec.copy_(W_out)
    assert cosines[0] == pytest.approx(1.0, abs=1e-6)
    assert all(b < a for a, b in zip(cosines, cosines[1:])), cosines
    assert all(b > a for a, b in zip(nmses, nmses[1:])), nmses
