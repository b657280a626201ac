"""First-letter absorption (``evaluation.absorption``) on a synthetic model with known answers.

The "model" maps a prompt to a residual that is its word's letter direction plus a
word direction (orthogonal subspaces); the coders are built by hand, so which words
are absorbed is known exactly. Letter directions are the centred simplex
``e_letter - 1/26``: the probe's Adam training weights every letter coordinate about
equally (+ for its letter, - for the 25 others), and against that direction the
centred simplex has cosine ~0.38, one-hot directions only ~0.15, near SAEBench's 0.1
threshold for an absorbing latent.
"""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from matryoshka_plugin.core.errors import UsageError
from matryoshka_plugin.evaluation.absorption import (
    LETTERS,
    PROMPT_TEMPLATE,
    AbsorptionConfig,
    absorption_eval,
    balanced_logistic_regression,
    first_letter,
    main_latents,
    probe_data,
    sample_words,
    sparse_probe_batch_size,
    word_absorption,
)

N_PER_LETTER = 24
WORD_DIM = 48
D = len(LETTERS) + WORD_DIM


def make_words() -> list[str]:
    # Distinct made-up words, N_PER_LETTER per first letter.
    return [f" {c}{LETTERS[j % 26]}{LETTERS[j // 26]}x" for c in LETTERS for j in range(N_PER_LETTER)]


WORDS = make_words()
_g = torch.Generator().manual_seed(0)
WORD_DIRS = torch.nn.functional.normalize(torch.randn(len(WORDS), WORD_DIM, generator=_g), dim=-1) * 0.3
LETTER_DIRS = torch.eye(len(LETTERS)) - 1 / len(LETTERS)
INDEX = {w: i for i, w in enumerate(WORDS)}


def residual(word: str) -> torch.Tensor:
    return torch.cat([LETTER_DIRS[first_letter(word)], WORD_DIRS[INDEX[word]]])


def read_acts(prompts: list[str]) -> torch.Tensor:
    """The synthetic model: the residual of the prompt's last word."""
    suffix = PROMPT_TEMPLATE.format(word="")
    return torch.stack([residual(p.rsplit("\n", 1)[1].removesuffix(suffix)) for p in prompts])


class HandCoder:
    """Latents 0..25: letters; 26..: one per word (its word direction); then one
    absorbing latent per absorbed word (letter + word direction), which replaces both
    the letter latent and the word latent on that word."""

    dtype = torch.float32

    def __init__(self, absorbed: set[str]):
        self.absorbed = sorted(absorbed)
        n_words = len(WORDS)
        self.num_latents = len(LETTERS) + n_words + len(self.absorbed)
        W = torch.zeros(self.num_latents, D)
        W[: len(LETTERS), : len(LETTERS)] = torch.nn.functional.normalize(LETTER_DIRS, dim=-1)
        W[len(LETTERS) : len(LETTERS) + n_words, len(LETTERS):] = torch.nn.functional.normalize(WORD_DIRS, dim=-1)
        for j, w in enumerate(self.absorbed):
            W[len(LETTERS) + n_words + j] = torch.nn.functional.normalize(residual(w), dim=0)
        self.W_dec = W

    def encode(self, x: torch.Tensor):
        letters = x[:, : len(LETTERS)].argmax(-1)
        words = (x[:, len(LETTERS):] @ WORD_DIRS.T).argmax(-1)
        idx, vals = [], []
        for letter, w, r in zip(letters.tolist(), words.tolist(), x):
            word = WORDS[w]
            if word in self.absorbed:
                idx.append([len(LETTERS) + len(WORDS) + self.absorbed.index(word)] * 2)
                vals.append([float(r.norm()), 0.0])  # padded like BatchTopK: repeat at 0
            else:
                idx.append([letter, len(LETTERS) + w])
                vals.append([float(LETTER_DIRS[letter].norm()), float(WORD_DIRS[w].norm())])
        return torch.tensor(vals), torch.tensor(idx), None


# 10 L1-probe steps an epoch, as SAEBench takes on a 30k-word vocabulary.
CFG = AbsorptionConfig(sparse_probe_batch_size=64)
DATA = probe_data(read_acts, WORDS, CFG)


def scored(result: dict) -> list[dict]:
    """The letters SAEBench averages over: probe F1 above 0.6."""
    return [r for r in result["letters"] if r["probe_f1"] > CFG.min_probe_f1]


def test_probe_learns_enough_letters():
    result = absorption_eval(HandCoder(set()), DATA, read_acts, WORDS, CFG)
    assert result["num_scored_letters"] == len(scored(result)) >= CFG.min_letters


def test_letter_latent_always_firing_is_no_absorption():
    result = absorption_eval(HandCoder(set()), DATA, read_acts, WORDS, CFG)
    for i, r in enumerate(result["letters"]):
        assert r["main_latents"] == [i]
        assert r["absorption_fractions"] == [0.0] * len(r["words"])
        assert not any(r["full_absorptions"])
    assert result["mean_absorption_fraction"] == 0.0
    assert result["mean_full_absorption"] == 0.0


def test_token_latents_absorb_exactly_their_words():
    # Every third word of each letter is absorbed, in the train and the test split.
    absorbed = {w for i, w in enumerate(WORDS) if i % 3 == 0}
    result = absorption_eval(HandCoder(absorbed), DATA, read_acts, WORDS, CFG)
    for i, r in enumerate(result["letters"]):
        assert r["main_latents"] == [i]
        want = [1.0 if w in absorbed else 0.0 for w in r["words"]]
        assert r["absorption_fractions"] == want
        assert r["full_absorptions"] == [w in absorbed for w in r["words"]]
        assert r["mean_absorption_fraction"] == sum(want) / len(want)
    per_letter = [r["mean_absorption_fraction"] for r in scored(result)]
    assert 0 < result["mean_absorption_fraction"] < 1
    assert abs(result["mean_absorption_fraction"] - sum(per_letter) / len(per_letter)) < 1e-12
    assert result["mean_full_absorption"] == result["mean_absorption_fraction"]


def test_partial_absorption_fraction():
    # Main latent carries 0.25 of the probe projection, an aligned absorber 0.75.
    probe = torch.tensor([1.0, 0.0])
    cos = torch.tensor([1.0, 0.6])
    latents = torch.tensor([0.25, 1.25])  # projections 0.25 and 0.75
    act = torch.tensor([1.0, 0.8])
    fraction, full = word_absorption(act, latents, cos, probe, [0], CFG)
    assert abs(fraction - 0.75) < 1e-6
    assert not full  # the main latent fired


def test_few_good_letters_give_no_score():
    cfg = AbsorptionConfig(min_letters=27)
    result = absorption_eval(HandCoder(set()), DATA, read_acts, WORDS, cfg)
    assert result["mean_absorption_fraction"] != result["mean_absorption_fraction"]  # NaN
    assert "need 27" in result["reason"]


def test_main_latents_stop_at_the_first_small_gain():
    feats = [[5], [5, 7], [5, 7, 2], [5, 7, 2, 9]]
    assert main_latents([0.5, 0.6, 0.61, 0.9], feats, 0.03) == [5, 7]
    assert main_latents([0.5, 0.5, 0.9, 0.9], feats, 0.03) == [5]


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10**6), st.integers(1, 4))
def test_logistic_regression_reaches_the_balanced_l2_optimum(seed, k):
    """At the returned point the gradient of sklearn's objective is zero."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(60, k, generator=g).double()
    y = (x[:, 0] + torch.randn(60, generator=g).double() > 0.7)
    if y.all() or not y.any():
        y[0] = ~y[0]
    coef, bias = balanced_logistic_regression(x, y)
    theta = torch.cat([coef.double(), torch.tensor([bias], dtype=torch.double)]).requires_grad_()
    A = torch.cat([x, torch.ones(60, 1, dtype=torch.double)], 1)
    t = y.double() * 2 - 1
    s = torch.where(y, 60 / (2 * y.sum()), 60 / (2 * (~y).sum())).double()
    obj = (s * torch.nn.functional.softplus(-t * (A @ theta))).sum() + 0.5 * (theta[:-1] ** 2).sum()
    (grad,) = torch.autograd.grad(obj, theta)
    assert grad.abs().max() < 1e-4


def test_a_letter_without_training_words_is_refused():
    # Without any "z" word the probe's positive weight for "z" is infinite and every
    # letter's probe would train to NaN; the refusal names the letter instead.
    words = [w for w in WORDS if not w.startswith(" z")]
    try:
        probe_data(read_acts, words, CFG)
    except UsageError as e:
        assert "'z'" in str(e)
    else:
        raise AssertionError("probe_data accepted words with no 'z'")


def test_sample_words_keeps_every_letter():
    # A vocabulary with 3 "x" words among 26 * 24 others: a plain draw of 60 would
    # usually miss "x"; the floor keeps all 3 and at least 2 of every other letter.
    vocab = [w for w in WORDS if not w.startswith(" x")] + [" xaa", " xab", " xac"]
    sample = sample_words(vocab, 60, seed=1, min_per_letter=2)
    assert len(sample) == len(set(sample)) == 60 and set(sample) <= set(vocab)
    counts = torch.bincount(torch.tensor([first_letter(w) for w in sample]), minlength=26)
    assert counts.min() >= 2 and counts[LETTERS.index("x")] >= 2
    assert sample == sample_words(vocab, 60, seed=1, min_per_letter=2)  # seeded
    try:
        sample_words(vocab, 40, min_per_letter=2)
    except UsageError as e:
        assert "give at least 52" in str(e)
    else:
        raise AssertionError("sample_words gave 40 words with 2 of each of 26 letters")


@given(st.integers(50, 5000), st.integers(5000, 200_000))
@settings(max_examples=50, deadline=None)
def test_sparse_probe_batch_gives_saebench_steps(n_train, n_vocab):
    # The smallest batch that takes no more L1-probe steps an epoch on n_train words than
    # SAEBench's 4096-row batches on 80% of a whole vocabulary.
    batch = sparse_probe_batch_size(n_train, n_vocab)
    saebench_steps = -(-int(n_vocab * 0.8) // 4096)
    assert -(-n_train // batch) <= saebench_steps
    assert batch == 1 or -(-n_train // (batch - 1)) > saebench_steps


def test_sparse_probe_batch_on_smollm2_sample():
    # run.py's case: 1,600 training words of SmolLM2's 31,586: SAEBench takes 7 steps.
    assert -(-1600 // sparse_probe_batch_size(1600, 31_586)) == 7
