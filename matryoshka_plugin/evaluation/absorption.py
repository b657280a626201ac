"""First-letter feature absorption (Chanin et al. 2024), as SAEBench measures it.

A port of SAEBench's ``sae_bench/evals/absorption`` (adamkarvonen/SAEBench 0.6.0):
``main.py`` (aggregation), ``k_sparse_probing.py`` (main latents per letter),
``feature_absorption_calculator.py`` (the per-word rule), ``probing.py`` (the linear
probe), ``prompting.py`` and ``vocab.py`` (prompts and words). The steps:

1. Words: single-token alphabetic words. Each word gets an in-context prompt of 10
   other words, ``"\\n{ex} has the first letter: {EX[0]}"`` joined by newlines, then
   ``"\\n{word} has the first letter:"``; the activation is read at the word's token
   (position -6 of the prompt). 80% of the words train, 20% test (split by word).
2. A 26-way one-vs-rest logistic probe on the activations (the "ground truth").
3. k-sparse probing on the coder's latents: an L1 probe on all latents ranks them per
   letter; for k = 1..10 a logistic regression on the top-k latents is scored by F1 on
   the test words. The main latents of a letter are the top-k set at the last k whose
   F1 rose by more than 0.03 over the one before.
4. For each test word the probe gets right, absorption: the main latents do not carry
   the probe's projection and at most 3 other latents aligned with the probe (cosine
   >= 0.1) carry at least 40% of it: the fraction of it they carry. Full absorption:
   no main latent fires and the top-projecting latent (cosine >= 0.025) carries >= 40%.
5. Per letter: summed fractions (and full absorptions) over the probe's true
   positives; the score is the mean over letters whose probe F1 exceeds 0.6, needing
   at least 20 such letters.

Deviations from SAEBench, each forced by running offline on a CPU without sklearn:

- Words: ``alpha_words`` keeps only words with a leading space (SAEBench also takes
  bare subword pieces such as ``"ing"``), and the caller may subsample them
  (``sample_words``, which keeps at least ``min_per_letter`` words of every letter, so
  rare letters are over-represented); ICL examples of the absorption prompts still
  come from all words.
- Activations come from a callable (``read_acts``), not TransformerLens'
  ``hook_resid_post``; for a Hugging Face model, ``residual_reader`` reads the decoder
  layer's output, which is the same tensor, and checks that the token read is the word.
- The k-sparse logistic regressions minimise sklearn's ``LogisticRegression(
  class_weight="balanced")`` objective (L2 with C = 1, intercept unpenalised) by
  Newton's method in float64 instead of sklearn's lbfgs: the same convex optimum.
- Random draws (split, ICL examples, probe init, batch order) come from seeded
  generators, not Python's global ``random``.
"""

import math
import random
import string
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.errors import UsageError

LETTERS = string.ascii_lowercase
PROMPT_TEMPLATE = "{word} has the first letter:"
"""SAEBench's default template; the word sits 6 tokens before the end."""
WORD_POSITION = -6
ICL_EXAMPLES = 10


@dataclass(frozen=True)
class AbsorptionConfig:
    """SAEBench's defaults (``eval_config.py``, ``feature_absorption.py``)."""

    train_fraction: float = 0.8
    """Share of the words whose prompts train the probes."""
    max_k: int = 10
    """Largest k of the k-sparse probes."""
    f1_jump: float = 0.03
    """F1 gain that makes one more latent a main latent (feature splitting)."""
    min_probe_f1: float = 0.6
    """A letter counts only if the ground-truth probe's test F1 exceeds this."""
    min_letters: int = 20
    """Letters passing ``min_probe_f1`` needed for a score."""
    fraction_cos: float = 0.1
    """Least cosine with the probe of a latent that may absorb (absorption fraction)."""
    full_cos: float = 0.025
    """Least cosine with the probe of the top latent (full absorption)."""
    projection_share: float = 0.4
    """Share of the probe projection the absorbing latents must carry (both rules)."""
    max_absorbers: int = 3
    """Latents that may jointly absorb (absorption fraction)."""
    top_latents: int = 10
    """Latents ranked by probe projection for full absorption."""
    sparse_probe_batch_size: int = 4096
    """Batch of the L1 probe that ranks latents (SAEBench's 4096; with fewer words than
    SAEBench's whole vocabulary, a smaller batch keeps its number of Adam steps)."""
    seed: int = 42


def sparse_probe_batch_size(n_train_words: int, n_vocab_words: int, cfg: AbsorptionConfig = AbsorptionConfig()) -> int:
    """The L1-probe batch that gives ``n_train_words`` as many Adam steps an epoch as
    SAEBench's 4096-row batches over a whole vocabulary of ``n_vocab_words``."""
    steps = -(-int(n_vocab_words * cfg.train_fraction) // 4096)
    return -(-n_train_words // steps)


# -- words and prompts (vocab.py, prompting.py) --------------------------------------


def alpha_words(tokenizer) -> list[str]:
    """Single-token words: a leading space then ASCII letters only, in vocabulary order."""
    words = []
    for token in sorted(tokenizer.get_vocab(), key=tokenizer.get_vocab().get):
        text = tokenizer.convert_tokens_to_string([token])
        if len(text) > 1 and text[0] == " " and all(c in string.ascii_letters for c in text[1:]):
            words.append(text)
    return words


def sample_words(words: Sequence[str], n: int, seed: int = 0, min_per_letter: int = 10) -> list[str]:
    """``n`` of ``words`` drawn at random (seeded), with at least ``min_per_letter`` of
    each letter (all of a letter that has fewer).

    A plain random draw from a vocabulary leaves the rarest letters (SmolLM2 has 28
    words starting with "x" among 31,586) with no training word for the probe.
    """
    order = torch.randperm(len(words), generator=torch.Generator().manual_seed(seed)).tolist()
    taken: list[int] = []
    per_letter = [0] * len(LETTERS)
    for i in order:  # the first draws of each letter, up to the floor
        letter = first_letter(words[i])
        if per_letter[letter] < min_per_letter:
            per_letter[letter] += 1
            taken.append(i)
    if len(taken) > n:
        raise UsageError(f"{n} words cannot hold {min_per_letter} of every letter; give at least {len(taken)}")
    chosen = set(taken)
    chosen.update([i for i in order if i not in chosen][: n - len(taken)])
    return [words[i] for i in order if i in chosen]  # in draw order


def first_letter(word: str) -> int:
    """Index in ``LETTERS`` of the word's first letter."""
    return LETTERS.index(word.strip()[0].lower())


def icl_prompt(word: str, examples: Sequence[str], rng: random.Random) -> str:
    """SAEBench's ``create_icl_prompt``: 10 examples other than ``word``, separator first."""
    while True:
        shots = rng.sample(list(examples), ICL_EXAMPLES)
        if word not in shots:
            break
    lines = [PROMPT_TEMPLATE.format(word=ex) + " " + ex.strip()[0].upper() for ex in shots]
    return "\n" + "\n".join(lines) + "\n" + PROMPT_TEMPLATE.format(word=word)


def residual_reader(model, tokenizer, layer: int, batch_size: int = 16) -> Callable[[list[str]], Tensor]:
    """``prompts -> [n, d]``: the output of decoder layer ``layer`` at the word's token.

    That is TransformerLens' ``blocks.{layer}.hook_resid_post``. Prompts start with the
    tokenizer's BOS, as TransformerLens prepends it. Raises if the token at
    ``WORD_POSITION`` is not the prompt's word.
    """
    base = getattr(model, "model", model)
    block = base.layers[layer]
    device = next(model.parameters()).device

    @torch.no_grad()
    def read(prompts: list[str]) -> Tensor:
        out = []
        captured = {}

        handle = block.register_forward_hook(stop_after(captured))
        try:
            for start in range(0, len(prompts), batch_size):
                chunk = prompts[start : start + batch_size]
                ids = [tokenizer(p)["input_ids"] for p in chunk]
                for p, row in zip(chunk, ids):
                    word = p.rsplit("\n", 1)[1][: -len(PROMPT_TEMPLATE) + len("{word}")]
                    if tokenizer.decode(row[WORD_POSITION]) != word:
                        raise UsageError(f"prompt {p[-60:]!r}: the token at {WORD_POSITION} is not {word!r}")
                # Same-length prompts batch without padding; other lengths go one by one.
                for group in _same_length(ids):
                    try:
                        model(torch.tensor(group, device=device))
                    except Stop:
                        pass
                    out.append(captured["h"][:, WORD_POSITION].float().cpu())
        finally:
            handle.remove()
        return torch.cat(out)

    return read


class Stop(Exception):
    """Raised by the capture hook: the layers after the one read are not needed."""


def stop_after(captured: dict):
    """A forward hook that keeps the module's output as ``captured["h"]`` and ends the
    forward pass there (the caller catches ``Stop``)."""

    def hook(mod, args, output):
        captured["h"] = output[0] if isinstance(output, tuple) else output
        raise Stop

    return hook


def _same_length(ids: list[list[int]]) -> list[list[list[int]]]:
    """Consecutive runs of equal length, in order (so outputs keep the prompts' order)."""
    groups: list[list[list[int]]] = []
    for row in ids:
        if groups and len(groups[-1][0]) == len(row):
            groups[-1].append(row)
        else:
            groups.append([row])
    return groups


# -- probes (probing.py, k_sparse_probing.py) -----------------------------------------


def train_multi_probe(
    x: Tensor,
    labels: Tensor,
    *,
    batch_size: int,
    epochs: int = 50,
    lr: float = 1e-2,
    end_lr: float = 1e-5,
    weight_decay: float = 1e-6,
    l1: float = 0.0,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """SAEBench's ``train_multi_probe``: 26 one-vs-rest logistic probes, ``(W [26, d], b [26])``.

    BCE with positives weighted by negatives / positives per letter, Adam, the learning
    rate decayed exponentially from ``lr`` to ``end_lr`` over the epochs, shuffled
    batches; ``l1`` adds SAEBench's k-sparse penalty ``l1 * mean_letters(sum |W|)``.
    """
    g = torch.Generator().manual_seed(seed)
    y = F.one_hot(labels, len(LETTERS)).float()
    pos = y.sum(0)
    probe = torch.nn.Linear(x.shape[1], len(LETTERS))
    with torch.no_grad():  # nn.Linear's own init, drawn from the seeded generator
        bound = 1 / math.sqrt(x.shape[1])
        probe.weight.uniform_(-bound, bound, generator=g)
        probe.bias.uniform_(-bound, bound, generator=g)
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=(len(y) - pos) / pos)
    opt = torch.optim.Adam(probe.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=math.exp(math.log(end_lr / lr) / epochs))
    with torch.enable_grad():
        for _ in range(epochs):
            for idx in torch.randperm(len(x), generator=g).split(batch_size):
                opt.zero_grad()
                loss = loss_fn(probe(x[idx]), y[idx])
                if l1:
                    loss = loss + l1 * probe.weight.abs().sum(-1).mean()
                loss.backward()
                opt.step()
            sched.step()
    return probe.weight.detach(), probe.bias.detach()


def balanced_logistic_regression(x: Tensor, y: Tensor, iters: int = 100) -> tuple[Tensor, float]:
    """sklearn's ``LogisticRegression(class_weight="balanced")`` fit: ``(coef [k], intercept)``.

    Minimises ``sum_i s_i log(1 + exp(-t_i f_i)) + |w|^2 / 2`` (``t = +-1``, ``s_i`` =
    n / (2 n_class(i)), intercept unpenalised) by damped Newton steps in float64.
    """
    x = x.double()
    t = y.double() * 2 - 1
    n_pos = float(y.sum())
    s = torch.where(y.bool(), len(y) / (2 * n_pos), len(y) / (2 * (len(y) - n_pos)))
    A = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    reg = torch.ones(A.shape[1], dtype=x.dtype)
    reg[-1] = 0
    theta = torch.zeros(A.shape[1], dtype=x.dtype)

    def objective(th: Tensor) -> Tensor:
        return (s * F.softplus(-t * (A @ th))).sum() + 0.5 * (reg * th * th).sum()

    for _ in range(iters):
        p = torch.sigmoid(-t * (A @ theta))
        grad = A.T @ (-s * t * p) + reg * theta
        if grad.abs().max() < 1e-9:
            break
        H = A.T @ (A * (s * p * (1 - p))[:, None]) + torch.diag(reg) + 1e-10 * torch.eye(len(theta), dtype=x.dtype)
        step = torch.linalg.solve(H, grad)
        f0, size = objective(theta), 1.0
        while objective(theta - size * step) > f0 and size > 1e-8:
            size /= 2
        theta = theta - size * step
    return theta[:-1].float(), float(theta[-1])


@contextmanager
def _one_thread():
    """Torch on one thread: the k-column regressions are so small that handing their ops
    to a second thread costs far more than it saves (100x on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def f1_score(y: Tensor, pred: Tensor) -> float:
    """Binary F1 (0 when there is nothing to score, as sklearn)."""
    tp = float((y & pred).sum())
    denom = 2 * tp + float((~y & pred).sum()) + float((y & ~pred).sum())
    return 2 * tp / denom if denom else 0.0


def main_latents(f1_by_k: Sequence[float], feats_by_k: Sequence[list[int]], jump: float) -> list[int]:
    """SAEBench's ``add_feature_splits_to_metrics_df`` for one letter."""
    best, feats = -100.0, []
    for f1, ids in zip(f1_by_k, feats_by_k):
        if f1 > best + jump:
            best, feats = f1, list(ids)
        else:
            break
    return feats


# -- the per-word rule (feature_absorption_calculator.py) ----------------------------


def word_absorption(
    act: Tensor, latents: Tensor, cos: Tensor, probe_dir: Tensor, main: list[int], cfg: AbsorptionConfig
) -> tuple[float, bool]:
    """``(absorption fraction, full absorption)`` of one word.

    ``act`` [d]: the model's activation; ``latents`` [width]: the coder's dense latents;
    ``cos`` [width]: each decoder row's cosine with the unit ``probe_dir``.
    """
    proj = latents * cos
    total = float(act @ probe_dir)
    main_proj = float(proj[main].sum())
    candidates = torch.ones_like(proj, dtype=torch.bool)
    candidates[main] = False
    candidates &= (cos >= cfg.fraction_cos) & (proj > 0)
    pool = proj[candidates]
    absorbed = float(pool.topk(min(cfg.max_absorbers, pool.numel())).values.sum())
    if main_proj >= total or absorbed / total < cfg.projection_share:
        fraction = 0.0
    elif main_proj <= 0:
        fraction = 1.0
    else:
        share = min(absorbed, total - main_proj)
        fraction = min(max(share / (share + main_proj), 0.0), 1.0)

    top = proj.topk(min(cfg.top_latents, proj.numel())).indices[0]
    full = (
        bool((latents[main] < 1e-8).all())
        and float(cos[top]) >= cfg.full_cos
        and total >= 0
        and float(proj[top]) / total >= cfg.projection_share
    )
    return fraction, full


# -- the eval (main.py) --------------------------------------------------------------


@torch.no_grad()
def dense_latents(coder, x: Tensor, chunk: int = 4096) -> Tensor:
    """``[rows, width]`` latent activations from the coder's sparse ``encode``."""
    out = []
    for xc in x.split(chunk):
        values, indices, _ = coder.encode(xc.to(coder.dtype))
        # scatter_add: BatchTopK pads rows with repeats of a kept index at value 0.
        out.append(torch.zeros(len(xc), coder.num_latents).scatter_add_(1, indices.long(), values.float()))
    return torch.cat(out)


@dataclass
class ProbeData:
    """Words, their letters and their activations, for the train and test words."""

    train_words: list[str]
    test_words: list[str]
    x_train: Tensor
    x_test: Tensor
    probe_W: Tensor
    probe_b: Tensor

    @property
    def y_train(self) -> Tensor:
        return torch.tensor([first_letter(w) for w in self.train_words])

    @property
    def y_test(self) -> Tensor:
        return torch.tensor([first_letter(w) for w in self.test_words])


def probe_data(
    read_acts: Callable[[list[str]], Tensor], words: Sequence[str], cfg: AbsorptionConfig = AbsorptionConfig()
) -> ProbeData:
    """Split the words, read their prompts' activations and train the letter probe.

    This part depends on the model only, so one ``ProbeData`` serves every coder.
    """
    words = list(dict.fromkeys(words))
    if len(words) < 2 * (ICL_EXAMPLES + 1):
        raise UsageError(f"{len(words)} distinct words are too few; give at least {2 * (ICL_EXAMPLES + 1)}")
    rng = random.Random(cfg.seed)
    shuffled = rng.sample(words, len(words))
    cut = int(len(shuffled) * cfg.train_fraction)
    train, test = shuffled[:cut], shuffled[cut:]
    labels = torch.tensor([first_letter(w) for w in train])
    # A letter without a training word would get an infinite positive weight in the
    # probe's loss, which turns every probe (all letters share the loss) into NaN.
    counts = torch.bincount(labels, minlength=len(LETTERS))
    if (counts == 0).any():
        letter = LETTERS[int((counts == 0).nonzero()[0])]
        raise UsageError(f"no training word starts with {letter!r} ({len(train)} training words); give more words")
    x_train = read_acts([icl_prompt(w, train, rng) for w in train])
    x_test = read_acts([icl_prompt(w, test, rng) for w in test])
    # probing.py's train_linear_probe_for_task: batch 64, weight decay 1e-4.
    W, b = train_multi_probe(x_train, labels, batch_size=64, weight_decay=1e-4, seed=cfg.seed)
    return ProbeData(train, test, x_train, x_test, W, b)


def absorption_eval(
    coder,
    data: ProbeData,
    read_acts: Callable[[list[str]], Tensor],
    icl_words: Sequence[str],
    cfg: AbsorptionConfig = AbsorptionConfig(),
) -> dict:
    """SAEBench's first-letter absorption of ``coder`` (a sparsify-style coder).

    ``icl_words``: the examples the absorption prompts draw from (SAEBench: the whole
    vocabulary). Returns the means over scored letters (``mean_absorption_fraction``,
    ``mean_full_absorption``, ``mean_num_split_features``, NaN with a ``reason`` when
    fewer than ``min_letters`` letters pass), and ``letters``, one record per letter.
    """
    W_dec = coder.W_dec.detach().float()
    y_train, y_test = data.y_train, data.y_test
    z_train, z_test = dense_latents(coder, data.x_train), dense_latents(coder, data.x_test)
    # k_sparse_probing.py's train_sparse_multi_probe: L1 0.01, L2 1e-6.
    W_l1, _ = train_multi_probe(z_train, y_train, batch_size=cfg.sparse_probe_batch_size, l1=0.01, seed=cfg.seed)
    probe_scores = data.x_test @ data.probe_W.T + data.probe_b
    rng = random.Random(cfg.seed)
    letters = []
    for i, letter in enumerate(LETTERS):
        is_letter = y_test == i
        probe_f1 = f1_score(is_letter, probe_scores[:, i] > 0)
        f1_by_k, feats_by_k = [], []
        with _one_thread():
            for k in range(1, cfg.max_k + 1):
                feats = W_l1[i].topk(k).indices.tolist()
                coef, bias = balanced_logistic_regression(z_train[:, feats], y_train == i)
                f1_by_k.append(f1_score(is_letter, z_test[:, feats] @ coef + bias > 0))
                feats_by_k.append(feats)
        main = main_latents(f1_by_k, feats_by_k, cfg.f1_jump)
        # The probe's true positives get fresh prompts, as the calculator builds them.
        hits = [w for w, ok in zip(data.test_words, (is_letter & (probe_scores[:, i] > 0)).tolist()) if ok]
        fractions, fulls = [], []
        if hits:
            probe_dir = data.probe_W[i] / data.probe_W[i].norm()
            cos = F.cosine_similarity(probe_dir[None], W_dec, dim=-1)
            acts = read_acts([icl_prompt(w, icl_words, rng) for w in hits])
            lat = dense_latents(coder, acts)
            for a, z in zip(acts, lat):
                fraction, full = word_absorption(a, z, cos, probe_dir, main, cfg)
                fractions.append(fraction)
                fulls.append(full)
        letters.append({
            "letter": letter,
            "probe_f1": probe_f1,
            "f1_by_k": f1_by_k,
            "main_latents": main,
            "num_probe_true_positives": len(hits),
            "words": hits,
            "absorption_fractions": fractions,
            "full_absorptions": fulls,
            "mean_absorption_fraction": sum(fractions) / len(hits) if hits else float("nan"),
            "full_absorption_rate": sum(fulls) / len(hits) if hits else float("nan"),
        })
    scored = [r for r in letters if r["probe_f1"] > cfg.min_probe_f1 and r["num_probe_true_positives"]]
    result = {"letters": letters, "num_scored_letters": len(scored)}
    if sum(r["probe_f1"] > cfg.min_probe_f1 for r in letters) < cfg.min_letters:
        nan = float("nan")
        return {**result, "mean_absorption_fraction": nan, "mean_full_absorption": nan,
                "mean_num_split_features": nan,
                "reason": f"only {len(scored)} letters have probe F1 > {cfg.min_probe_f1}; need {cfg.min_letters}"}
    mean = lambda key: sum(r[key] for r in scored) / len(scored)  # noqa: E731
    return {
        **result,
        "mean_absorption_fraction": mean("mean_absorption_fraction"),
        "mean_full_absorption": mean("full_absorption_rate"),
        "mean_num_split_features": sum(len(r["main_latents"]) for r in scored) / len(scored),
    }
