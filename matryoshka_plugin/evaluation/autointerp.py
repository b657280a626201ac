"""Automated interpretability per nested level: Sort Eval and Contrastive Eval (seed 001,
after Anthropic's circuit-tracing paper) and Detection Eval (seed 000's LLM explanation
scoring), with a pluggable LLM judge and explainer (``explainers``).

- **Sort Eval**: two latents of one level are shown to the judge by their top-activating
  corpus contexts (every other rank; the activating token marked ``[[like this]]``); the
  judge then sorts each held-out context (the other ranks) into the latent it came from.
  Score: how often it sorts right (chance 0.5). Distinguishable latents score high.
- **Contrastive Eval**: prompt pairs that differ in one word (``he``/``she``, ``Mr.``/
  ``Mrs.``, ... from ``CONTRAST_WORDS``, substituted into corpus sentences). For each pair
  and level, the latent of that level whose activation (max over the positions from the
  first differing token on) differs most between the two prompts is shown to the judge by
  its top contexts, with both prompts; the judge names the prompt it fires on more.
  Score: probability of naming the right prompt (chance 0.5).
- **Detection Eval** (explain, then detect; as SAEBench's autointerp and delphi's
  detection scorer): the explainer writes a one-line explanation of a latent from its
  top contexts (the even ranks, marked); the judge is then shown, one at a time and
  unmarked, the latent's held-out top contexts (the odd ranks) and as many windows of
  corpus text where it never fires, and asked whether the explained feature fires on
  each (A yes, B no). Score: how often it is right, positives and negatives balanced
  (chance 0.5). Good explanations of well-defined latents score high. The explanations
  are returned with the scores so they can be read. The positives are top contexts only,
  which makes this easier than SAEBench's, whose positives also sample weaker activations.

All three report ``accuracy`` (ties split) and ``p_correct`` (mean probability on the right
answer) per level, a level being the latents between two consecutive nested sizes.

EleutherAI delphi (``eai-delphi``) has scorers of this kind, but its ``delphi.clients``
imports vllm unconditionally (every scorer and explainer imports it) and
``delphi.latents`` imports faiss, so it cannot be imported on a CPU machine without
vllm; these evaluations are re-implemented here (the Detection Eval follows delphi's
detection scorer, the other two are not delphi's).

Datasets are deterministic under ``seed``: latents are drawn with a seeded generator
among those with enough activating contexts, and which latent (prompt) is option A is a
seeded coin.
"""

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..core.errors import UsageError
from ..corpus import corpus_chunks
from ..hooks import capture_mlps
from ..toy import dense_codes
from .explainers import Explainer, Judge
from .latent_stats import _level_bounds

MARK = "[[{}]]"
"""How the activating token is marked in a context shown to the judge."""

WINDOW = (12, 3)
"""Tokens before and after the activating one in a context."""

CONTRAST_WORDS = {
    "he": "she", "his": "her", "him": "her", "Mr.": "Mrs.", "sister": "brother",
    "mother": "father", "daughter": "son", "man": "woman", "gentleman": "lady",
    "happy": "unhappy", "good": "bad", "young": "old", "yes": "no", "love": "hate",
}
"""Word swaps of the Contrastive Eval's prompt pairs (each applied in both directions)."""

OPTIONS = ("A", "B")


@dataclass(frozen=True)
class Question:
    """One judge question: its prompt, the right option's index, and what it is about."""

    kind: str
    level: int
    prompt: str
    answer: int
    latents: tuple[int, ...]


# -- contexts -------------------------------------------------------------------------------


def render_context(tokens: Sequence[str], position: int | None) -> str:
    """The tokens joined as text, the one at ``position`` marked (none if None)."""
    parts = list(tokens)
    if position is not None:
        parts[position] = MARK.format(parts[position])
    return "".join(parts).replace("\n", " ").strip()


def top_contexts(
    acts: Tensor, tokens: Sequence[Sequence[str]], n: int, window: tuple[int, int] = WINDOW, *, mark: bool = True
) -> list[list[str]]:
    """Each latent's ``n`` top contexts, one per sequence at most, strongest first.

    ``acts``: ``[sequences, positions, latents]`` activations; ``tokens``: each sequence's
    token strings. A context is ``window`` tokens before and after the activating one,
    rendered by ``render_context`` (the activating token marked if ``mark``); a latent
    gets only contexts where it is positive. Unmarked contexts keep the whole window's
    length near a sequence's ends (shifted inwards), as ``silent_contexts`` windows do:
    the Detection Eval shows both unmarked, and a shorter positive would give it away.
    """
    best, where = acts.max(dim=1)  # [sequences, latents]: one context per sequence
    k = min(n, acts.shape[0])
    values, seqs = best.topk(k, dim=0)  # [k, latents]
    before, after = window
    length = before + after + 1
    out = []
    for j in range(acts.shape[2]):
        contexts = []
        for v, s in zip(values[:, j].tolist(), seqs[:, j].tolist()):
            if v <= 0:
                break
            p = int(where[s, j])
            if mark:
                lo, hi = max(0, p - before), p + after + 1
            else:
                lo = max(0, min(p - before, len(tokens[s]) - length))
                hi = lo + length
            contexts.append(render_context(tokens[s][lo:hi], p - lo if mark else None))
        out.append(contexts)
    return out


def silent_contexts(
    acts: Tensor, tokens: Sequence[Sequence[str]], latents: Sequence[int], n: int, g: torch.Generator,
    window: tuple[int, int] = WINDOW,
) -> dict[int, list[str]]:
    """Per latent of ``latents``: up to ``n`` unmarked windows, as long as a top context, of
    distinct sequences where it never fires, drawn with ``g`` (sequence and position)."""
    length = sum(window) + 1
    quiet = acts.max(dim=1).values <= 0  # [sequences, latents]
    out = {}
    for j in latents:
        seqs = quiet[:, j].nonzero().flatten()
        drawn = seqs[torch.randperm(len(seqs), generator=g)[:n]].tolist()
        windows = []
        for s in drawn:
            lo = int(torch.randint(0, max(1, len(tokens[s]) - length + 1), (1,), generator=g))
            windows.append(render_context(tokens[s][lo : lo + length], None))
        out[j] = windows
    return out


def level_bounds(levels: Sequence[int]) -> list[tuple[int, int]]:
    """``[(0, s1), (s1, s2), ...]`` from the level ends."""
    return list(zip([0, *levels[:-1]], levels))


def pick_latents(contexts: list[list[str]], start: int, end: int, n: int, need: int, g: torch.Generator) -> list[int]:
    """Up to ``n`` latents of ``[start, end)`` with at least ``need`` contexts, drawn with ``g``."""
    eligible = [j for j in range(start, end) if len(contexts[j]) >= need]
    order = torch.randperm(len(eligible), generator=g).tolist()
    return sorted(eligible[i] for i in order[:n])


def _examples(contexts: Sequence[str]) -> str:
    return "\n".join(f"{i + 1}. {c}" for i, c in enumerate(contexts))


# -- Sort Eval ------------------------------------------------------------------------------


def sort_questions(
    contexts: list[list[str]], levels: Sequence[int], *, latents_per_level: int = 4,
    examples: int = 4, seed: int = 0,
) -> list[Question]:
    """Sort Eval questions: per level, latents paired two by two, ``examples`` shown and
    ``examples`` held out per latent (even and odd ranks of its top contexts)."""
    g = torch.Generator().manual_seed(seed)
    questions = []
    for level, (start, end) in enumerate(level_bounds(levels)):
        chosen = pick_latents(contexts, start, end, 2 * (latents_per_level // 2), 2 * examples, g)
        for a, b in zip(chosen[0::2], chosen[1::2]):
            pair = (a, b) if torch.rand(1, generator=g).item() < 0.5 else (b, a)
            shown = {j: contexts[j][0 : 2 * examples : 2] for j in pair}
            header = (
                "Two features of a language model are shown by text excerpts where each fires "
                "most; the token where it fires is marked [[like this]].\n\n"
                f"Feature A:\n{_examples(shown[pair[0]])}\n\nFeature B:\n{_examples(shown[pair[1]])}\n\n"
            )
            for answer, j in enumerate(pair):
                for held_out in contexts[j][1 : 2 * examples : 2]:
                    prompt = header + f"Which feature fires on this excerpt?\n{held_out}\n\nAnswer A or B."
                    questions.append(Question("sort", level, prompt, answer, pair))
    return questions


# -- Contrastive Eval -----------------------------------------------------------------------


def contrast_pairs(
    texts: Sequence[str], n_pairs: int, *, words: dict[str, str] = CONTRAST_WORDS,
    words_after: int = 3, max_words: int = 24,
) -> list[tuple[str, str]]:
    """``n_pairs`` prompt pairs from ``texts``: a sentence cut ``words_after`` words after a
    word of ``words``, and the same with that word swapped (the first pairs found)."""
    swap = {**{b: a for a, b in words.items()}, **words}
    pairs = []
    for text in texts:
        for sentence in re.split(r"(?<=[.!?])\s+", " ".join(text.split())):
            tokens = sentence.split(" ")
            for i, w in enumerate(tokens):
                if w in swap and i + words_after < len(tokens):
                    lo = max(0, i + words_after + 1 - max_words)
                    kept = tokens[lo : i + words_after + 1]
                    other = list(kept)
                    other[i - lo] = swap[w]
                    pairs.append((" ".join(kept), " ".join(other)))
                    break
            if len(pairs) == n_pairs:
                return pairs
    return pairs


def contrast_differences(first: Tensor, second: Tensor, ids_first: Tensor, ids_second: Tensor) -> Tensor:
    """Per latent: max activation of ``first`` minus that of ``second`` over the positions
    from the first token where the two prompts differ (``[positions, latents]`` each)."""
    n = min(len(ids_first), len(ids_second))
    same = (ids_first[:n] == ids_second[:n]).int().cumprod(0)
    start = min(int(same.sum()), n - 1)  # a prompt that only extends the other: its last token
    return first[start:].max(dim=0).values - second[start:].max(dim=0).values


def contrastive_questions(
    pairs: Sequence[tuple[str, str]],
    activations: Callable[[str], tuple[Tensor, Tensor]],
    contexts: list[list[str]],
    levels: Sequence[int],
    *, examples: int = 4, seed: int = 0,
) -> list[Question]:
    """Contrastive Eval questions: per pair and level, the level's most differing latent.

    ``activations(text)`` returns the prompt's token ids and its ``[positions, latents]``
    activations. A level whose latents differ nowhere on a pair (or have fewer than
    ``examples`` contexts) asks nothing about it.
    """
    g = torch.Generator().manual_seed(seed)
    questions = []
    for first, second in pairs:
        (ids_a, acts_a), (ids_b, acts_b) = activations(first), activations(second)
        diff = contrast_differences(acts_a, acts_b, ids_a, ids_b)
        flip = torch.rand(1, generator=g).item() < 0.5
        shown = (second, first) if flip else (first, second)
        for level, (start, end) in enumerate(level_bounds(levels)):
            d = diff[start:end].clone()
            d[torch.tensor([len(contexts[j]) < examples for j in range(start, end)])] = 0
            j = int(d.abs().argmax())
            if d[j] == 0:
                continue
            fires_on_first = bool(d[j] > 0)
            answer = int(fires_on_first == flip)  # index into `shown`
            prompt = (
                "A feature of a language model is shown by text excerpts where it fires most; the "
                f"token where it fires is marked [[like this]].\n\n{_examples(contexts[start + j][:examples])}\n\n"
                f"Two prompts differ in one word:\nA: {shown[0]}\nB: {shown[1]}\n\n"
                "On which prompt does this feature fire more? Answer A or B."
            )
            questions.append(Question("contrastive", level, prompt, answer, (start + j,)))
    return questions


# -- Detection Eval -------------------------------------------------------------------------


def explanation_prompt(contexts: Sequence[str]) -> str:
    """What the explainer is asked about a latent, given its marked top contexts."""
    return (
        "A feature of a language model fires most on these text excerpts; the token where it "
        f"fires is marked [[like this]].\n\n{_examples(contexts)}\n\n"
        "In a few words, what does this feature detect? Reply with the explanation only."
    )


def detection_questions(
    contexts: list[list[str]], plain: list[list[str]], silent: Callable[[list[int]], dict[int, list[str]]],
    levels: Sequence[int], explain: Explainer, *, latents_per_level: int = 4, examples: int = 4, seed: int = 0,
) -> tuple[list[Question], list[dict]]:
    """Detection Eval questions, and the explanations they test.

    Per level, up to ``latents_per_level`` latents with ``2 * examples`` top contexts
    (``contexts`` marked, ``plain`` the same unmarked) are explained from the even ranks;
    each is asked about on its ``examples`` held-out odd ranks (answer A, yes) and on
    ``examples`` of ``silent(latents)``'s windows where it never fires (answer B, no). A
    latent with fewer silent windows than that (it fires in nearly every sequence) is
    not asked about.
    """
    g = torch.Generator().manual_seed(seed)
    questions, explanations = [], []
    for level, (start, end) in enumerate(level_bounds(levels)):
        chosen = pick_latents(contexts, start, end, latents_per_level, 2 * examples, g)
        negatives = silent(chosen)
        for j in chosen:
            if len(negatives[j]) < examples:
                continue
            explanation = explain(explanation_prompt(contexts[j][0 : 2 * examples : 2]))
            explanations.append({"level": level, "latent": j, "explanation": explanation})
            shown = [(c, 0) for c in plain[j][1 : 2 * examples : 2]] + [(c, 1) for c in negatives[j][:examples]]
            for excerpt, answer in shown:
                prompt = (
                    f'A feature of a language model is explained as: "{explanation}"\n\n'
                    f"Excerpt:\n{excerpt}\n\n"
                    "Does this feature fire on some token of this excerpt? Answer A for yes or B for no."
                )
                questions.append(Question("detection", level, prompt, answer, (j,)))
    return questions, explanations


# -- scoring --------------------------------------------------------------------------------


def score(questions: Sequence[Question], judge: Judge, levels: Sequence[int]) -> list[dict]:
    """Per level: questions asked, accuracy (argmax, ties split) and mean probability on
    the right answer; None where a level has no question."""
    per_level = [{"start": s, "end": e, "n_questions": 0, "accuracy": 0.0, "p_correct": 0.0}
                 for s, e in level_bounds(levels)]
    kind = questions[0].kind if questions else ""
    for q in tqdm(questions, desc=f"{kind} questions", leave=False, disable=len(questions) < 8):
        probs = [float(p) for p in judge(q.prompt, OPTIONS)]
        if len(probs) != len(OPTIONS):
            raise UsageError(f"the judge gave {len(probs)} probabilities for {len(OPTIONS)} options")
        best = max(probs)
        ties = [i for i, p in enumerate(probs) if p == best]
        row = per_level[q.level]
        row["n_questions"] += 1
        row["accuracy"] += (q.answer in ties) / len(ties)
        row["p_correct"] += probs[q.answer] / max(sum(probs), 1e-12)
    for row in per_level:
        for key in ("accuracy", "p_correct"):
            row[key] = row[key] / row["n_questions"] if row["n_questions"] else None
    return per_level


# -- on a model -----------------------------------------------------------------------------


@torch.no_grad()
def autointerp(
    model, tokenizer, coder, layer: int, texts: Sequence[str], judge: Judge,
    levels: Sequence[int] | None = None, *, explainer: Explainer | None = None,
    n_tokens: int = 8192, seq_len: int = 64, latents_per_level: int = 4, examples: int = 4,
    n_pairs: int = 24, seed: int = 0, contrast_words: dict[str, str] = CONTRAST_WORDS,
) -> dict:
    """Sort Eval, Contrastive Eval and Detection Eval of ``coder`` (reading the MLP input
    of ``layer`` of ``model``) on ``texts``, judged by ``judge``, per level.

    ``explainer`` writes the Detection Eval's explanations; by default ``judge.explain``
    (both bundled backends have one). ``levels`` default to the coder's nested sizes.
    Top contexts come from the first
    ``n_tokens`` tokens of ``texts`` (``seq_len``-token chunks, BOS first, BOS positions
    ignored); the contrastive pairs from the first ``n_pairs`` sentences with a
    ``contrast_words`` word. The coder runs on the CPU.
    """
    for name, value in (("latents_per_level", latents_per_level), ("examples", examples),
                        ("n_pairs", n_pairs), ("n_tokens", n_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (2 if name == "latents_per_level" else 1):
            low = 2 if name == "latents_per_level" else 1
            raise UsageError(f"{name}={value!r} is not allowed; expected an integer >= {low}")
    explain = explainer or getattr(judge, "explain", None)
    if not callable(explain):
        raise UsageError(f"the judge {judge!r} cannot explain latents; pass explainer=, a callable prompt -> text")
    coder = coder.cpu()
    bounds = _level_bounds(coder, levels)
    chunks = corpus_chunks(tokenizer, texts, n_tokens, seq_len)
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    with capture_mlps(model, [layer], outputs=False) as run:

        def encode(ids: Tensor) -> Tensor:
            acts = dense_codes(coder, run(ids[None])[layer].input[0].float().cpu().to(coder.dtype))
            if bos:
                acts[0] = 0  # BOS activations are outliers that say nothing about the text
            return acts

        acts = torch.stack([encode(c) for c in chunks])
        tokens = [[tokenizer.decode([int(t)]) for t in c] for c in chunks]
        contexts = top_contexts(acts, tokens, 2 * examples)
        plain = top_contexts(acts, tokens, 2 * examples, mark=False)

        def prompt_activations(text: str) -> tuple[Tensor, Tensor]:
            ids = torch.tensor(bos + tokenizer(text, add_special_tokens=False)["input_ids"])
            return ids, encode(ids)

        pairs = contrast_pairs(texts, n_pairs, words=contrast_words)
        contrastive = contrastive_questions(pairs, prompt_activations, contexts, bounds, examples=examples, seed=seed)
    sort = sort_questions(contexts, bounds, latents_per_level=latents_per_level, examples=examples, seed=seed)
    silent_g = torch.Generator().manual_seed(seed)
    detection, explanations = detection_questions(
        contexts, plain, lambda latents: silent_contexts(acts, tokens, latents, examples, silent_g), bounds, explain,
        latents_per_level=latents_per_level, examples=examples, seed=seed,
    )
    return {
        "settings": {"n_tokens": len(chunks) * seq_len, "latents_per_level": latents_per_level,
                     "examples": examples, "contrast_pairs": len(pairs), "seed": seed, "levels": bounds},
        "sort_eval": score(sort, judge, bounds),
        "contrastive_eval": score(contrastive, judge, bounds),
        "detection_eval": score(detection, judge, bounds),
        "explanations": explanations,
        "judge_unparsed_answers": getattr(judge, "unparsed", None),
        "chance": 1 / len(OPTIONS),
    }
