"""permute_every: reordering latents leaves the coder's output and its training unchanged.

Exactness is checked in float64. A permutation changes the order in which a token's
active latents are summed in the decode, so outputs agree to rounding (1e-12), not bit
for bit; everything else (encoder, optimizer state) moves without arithmetic.
"""

import copy

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from schedulefree import ScheduleFreeWrapper
from sparsify.sign_sgd import SignSGD

from matryoshka_plugin.adapters.sparsify import MatryoshkaSparseCoder, MatryoshkaSparseCoderConfig
from matryoshka_plugin.clt import CLTConfig, MatryoshkaCLT
from matryoshka_plugin.core.errors import MatryoshkaConfigError
from matryoshka_plugin.core.permutation import LatentMass, permute_latents
from matryoshka_plugin.fit import fit_activations

from test_reliability_resume import STEPS_BEFORE, TOTAL_STEPS, _train

TOL = dict(rtol=1e-12, atol=1e-12)


def _coder(width, d, k, seed, **fields):
    torch.manual_seed(seed)
    cfg = MatryoshkaSparseCoderConfig(
        matryoshka=True, num_latents=width, k=k, permute_every=1, **fields
    )
    coder = MatryoshkaSparseCoder(d, cfg, dtype=torch.float64)
    with torch.no_grad():
        coder.encoder.bias.normal_()
        coder.b_dec.normal_()
    return coder


def _x(n, d, seed):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _random_perm(width, seed):
    return torch.randperm(width, generator=torch.Generator().manual_seed(seed))


def _within_levels_perm(sizes, seed):
    """A random permutation that keeps every latent in its level: the nested loss is
    then the same function of the permuted weights, so the steps can be compared."""
    g = torch.Generator().manual_seed(seed)
    starts = [0, *sizes[:-1]]
    return torch.cat([a + torch.randperm(b - a, generator=g) for a, b in zip(starts, sizes)])


def _dense(out, width):
    dense = out.latent_acts.new_zeros(len(out.latent_acts), width)
    return dense.scatter_add(1, out.latent_indices, out.latent_acts)


def _set_mass(coder, perm):
    """Mass that makes ``perm`` the importance order."""
    width = len(perm)
    coder.latent_mass.mass[perm] = torch.arange(width, 0, -1, dtype=torch.float64)


@settings(max_examples=25, deadline=None)
@given(
    width=st.integers(4, 48), d=st.integers(2, 12), k=st.integers(1, 4),
    seed=st.integers(0, 2**16), batch_topk=st.booleans(),
)
@example(width=7, d=9, k=1, seed=0, batch_topk=True)
def test_full_width_output_is_unchanged_by_any_permutation(width, d, k, seed, batch_topk):
    coder = _coder(width, d, min(k, width), seed, nested_sizes=[width // 2] if width > 2 else [],
                   batch_topk=batch_topk)
    x = _x(32, d, seed)
    coder.train()
    # Sets the BatchTopK threshold, one number for all latents. From other tokens than
    # x: it equals the smallest activation kept in its batch, and on that batch the
    # permuted encoder's rounding would decide whether an activation exactly at the
    # threshold passes (hypothesis found it: width 7, d 9, k 1, seed 0).
    coder(_x(32, d, seed + 1))
    coder.eval()
    before = coder(x)
    perm = _random_perm(width, seed)
    _set_mass(coder, perm)
    assert torch.equal(coder.permute_by_mass(), perm)
    after = coder(x)
    torch.testing.assert_close(after.sae_out, before.sae_out, **TOL)
    # The same latents fire as strongly, under their new indices: new latent i is old
    # latent perm[i]. (Dense, because latents tied at activation 0 may swap places.)
    torch.testing.assert_close(_dense(after, width), _dense(before, width)[:, perm], **TOL)
    assert not coder.latent_mass.mass.any(), "the mass restarts after a reorder"


def _all_positive(coder):
    """Make every pre-activation positive. sparsify's TopK also picks latents at 0 when
    fewer than k are positive, by index among the tied ones, and still passes them a
    gradient: a permutation would change which, and the steps would differ there."""
    with torch.no_grad():
        coder.encoder.bias.add_(20)


def _adam(coder):
    return torch.optim.Adam(coder.parameters(), lr=1e-2)


def _signum(coder):
    opt = ScheduleFreeWrapper(SignSGD(coder.parameters(), lr=1e-2), momentum=0.95)
    opt.train()
    return opt


def _step(coder, opt, x):
    opt.zero_grad()
    coder(x).fvu.backward()
    opt.step()


def _permuted_params(coder, perm):
    p = coder.state_dict()
    return {
        "encoder.weight": p["encoder.weight"][perm], "encoder.bias": p["encoder.bias"][perm],
        "W_dec": p["W_dec"][perm], "b_dec": p["b_dec"],
    }


@pytest.mark.parametrize("make_opt", [_adam, _signum], ids=["adam", "signum-schedulefree"])
@settings(max_examples=6, deadline=None)
@given(width=st.integers(8, 40), seed=st.integers(0, 2**16))
def test_a_step_after_a_permutation_is_the_permuted_step(make_opt, width, seed):
    d, k = 6, 3
    plain = _coder(width, d, k, seed, nested_sizes=[width // 4, width // 2])
    _all_positive(plain)
    plain.train()
    opt = make_opt(plain)
    for i in range(3):  # optimizer state worth moving
        _step(plain, opt, _x(64, d, seed + i))
    moved = copy.deepcopy(plain)
    moved_opt = make_opt(moved)
    moved_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # loading shares tensors
    if isinstance(opt, ScheduleFreeWrapper):
        moved_opt.train_mode = opt.train_mode
    perm = _within_levels_perm(plain.nested_sizes, seed)
    _set_mass(moved, perm)
    moved.permute_by_mass([moved_opt])
    x = _x(64, d, seed + 99)
    _step(plain, opt, x)
    _step(moved, moved_opt, x)
    expected = _permuted_params(plain, perm)
    for name, value in expected.items():
        torch.testing.assert_close(moved.state_dict()[name], value, **TOL, msg=name)


def test_moving_weights_but_not_adam_state_gives_a_different_step():
    """The published implementation's mistake: the check above catches it."""
    width, d, seed = 16, 6, 3
    plain = _coder(width, d, 3, seed, nested_sizes=[4, 8])
    _all_positive(plain)
    plain.train()
    opt = _adam(plain)
    for i in range(3):
        _step(plain, opt, _x(64, d, seed + i))
    moved = copy.deepcopy(plain)
    moved_opt = _adam(moved)
    moved_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # loading shares tensors
    perm = _within_levels_perm(plain.nested_sizes, seed)
    _set_mass(moved, perm)
    moved.permute_by_mass()  # no optimizer: its moments stay in the old order
    x = _x(64, d, seed + 99)
    _step(plain, opt, x)
    _step(moved, moved_opt, x)
    assert not torch.allclose(moved.encoder.weight, _permuted_params(plain, perm)["encoder.weight"])


def test_counters_and_adaptive_mass_follow_the_permutation():
    coder = _coder(8, 4, 2, 0, prefix_schedule="adaptive", nested_sizes=[2, 4])
    counts = torch.arange(8) * 10
    coder.sampler.mass.mass = torch.arange(8, dtype=torch.float64)
    perm = torch.tensor([3, 1, 7, 0, 2, 6, 5, 4])
    _set_mass(coder, perm)
    coder.permute_by_mass((), (counts,))
    assert counts.tolist() == (perm * 10).tolist()
    assert coder.sampler.mass.mass.tolist() == perm.double().tolist()


def test_quantised_optimizer_state_is_refused():
    p = torch.nn.Parameter(torch.zeros(4, 3))

    class Blockwise(torch.optim.SGD):
        pass

    opt = Blockwise([p], lr=1.0)
    opt.state[p]["absmax"] = torch.ones(2)
    with pytest.raises(MatryoshkaConfigError, match=r"state 'absmax' of shape \(2,\)"):
        permute_latents([(p, 0)], torch.tensor([1, 0, 3, 2]), [opt])


def test_latent_mass_orders_by_mass_and_keeps_ties_in_place():
    mass = LatentMass(5)
    mass.observe(torch.tensor([[1.0, 2.0], [3.0, 0.5]]), torch.tensor([[4, 1], [4, 2]]))
    assert mass.mass.tolist() == [0, 2, 0.5, 0, 4]
    assert mass.order().tolist() == [4, 1, 2, 0, 3]


def test_clt_output_and_adam_step_are_unchanged_by_a_permutation():
    torch.manual_seed(0)
    cfg = CLTConfig(matryoshka=True, num_latents=16, k=3, nested_sizes=[4, 8], permute_every=1)
    clt = MatryoshkaCLT(5, [0, 1, 2], cfg, dtype=torch.float64)
    with torch.no_grad():
        for W in clt.W_dec:
            W.normal_()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 3, 5, generator=g, dtype=torch.float64)
    y = torch.randn(64, 3, 5, generator=g, dtype=torch.float64)
    opt = torch.optim.Adam(clt.parameters(), lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        clt(x, y).loss.backward()
        opt.step()
    moved = copy.deepcopy(clt)
    moved_opt = torch.optim.Adam(moved.parameters(), lr=1e-2)
    moved_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # loading shares tensors
    since = torch.arange(3 * 16).view(3, 16)
    wanted = [_within_levels_perm([4, 8, 16], s) for s in range(3)]
    for mass, p in zip(moved.latent_mass, wanted):
        mass.mass[p] = torch.arange(16, 0, -1, dtype=torch.float64)
    perms = moved.permute_by_mass([moved_opt], since)
    assert all(torch.equal(p, w) for p, w in zip(perms, wanted))
    for s, p in enumerate(perms):
        assert since[s].tolist() == (s * 16 + p).tolist()
    clt.eval(), moved.eval()
    torch.testing.assert_close(moved.reconstruct(x), clt.reconstruct(x), **TOL)
    clt.train(), moved.train()
    for model, o in ((clt, opt), (moved, moved_opt)):
        o.zero_grad()
        model(x, y).loss.backward()
        o.step()
    for s, p in enumerate(perms):
        torch.testing.assert_close(moved.W_enc[s], clt.W_enc[s][p], **TOL)
        torch.testing.assert_close(moved.W_dec[s], clt.W_dec[s][p], **TOL)
        torch.testing.assert_close(moved.b_enc[s], clt.b_enc[s][p], **TOL)


def test_training_permutes_without_changing_the_output(monkeypatch):
    """Through sparsify's trainer: each reorder keeps the full-width output, and the
    latents end sorted by mass (the first ones fire most)."""
    seen = []
    original = MatryoshkaSparseCoder.permute_by_mass
    probe = torch.randn(256, 16, generator=torch.Generator().manual_seed(5))

    def checked(self, *args):
        was = self.training
        self.eval()
        before = self(probe).sae_out
        perm = original(self, *args)
        torch.testing.assert_close(self(probe).sae_out, before, rtol=1e-5, atol=1e-5)
        self.train(was)
        seen.append(perm)
        return perm

    monkeypatch.setattr(MatryoshkaSparseCoder, "permute_by_mass", checked)
    cfg = MatryoshkaSparseCoderConfig(matryoshka=True, num_latents=32, k=4, nested_sizes=[4, 16],
                                      permute_every=4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 4, generator=g) @ torch.randn(4, 16, generator=g)
    coder = fit_activations(x, cfg, batch_size=64, seq_len=16, optimizer="adam", lr=3e-3,
                            auxk_alpha=1 / 32)
    assert len(seen) == 16 // 4 - 1  # after steps 4, 8 and 12 of 16
    assert any(not torch.equal(p, torch.arange(32)) for p in seen)
    fired = torch.zeros(32)
    top = coder.encode(x)
    fired.index_add_(0, top.top_indices.flatten(), top.top_acts.flatten())
    assert fired[:16].sum() > fired[16:].sum()


@pytest.mark.parametrize("fields", [
    dict(permute_every=2),
    dict(prefix_schedule="adaptive", adaptive_every=2),
    dict(prefix_schedule="adaptive", adaptive_every=3, permute_every=2, batch_topk=True),
], ids=["permute", "adaptive", "both-batchtopk"])
@pytest.mark.parametrize("optimizer", ["adam", "signum"])
def test_resumed_run_equals_an_uninterrupted_one(fields, optimizer, tmp_path):
    cfg = MatryoshkaSparseCoderConfig(matryoshka=True, num_latents=32, k=4, **fields)
    full = _train(tmp_path / "full", cfg, optimizer)
    assert len(full) == TOTAL_STEPS
    _train(tmp_path / "cut", cfg, optimizer, stop_after=STEPS_BEFORE)
    resumed = _train(tmp_path / "cut", cfg, optimizer, resume=True)
    assert resumed == full[STEPS_BEFORE - 1:]
