"""Our first-letter absorption port checked against SAEBench's own code, on one coder.

Runs in a separate environment with ``sae-bench`` 0.6.0 (its pins clash with the main
one: transformers 5, transformer-lens 3.9), eai-sparsify 1.3.3 and the plugin
(``--no-deps -e``). It reads what ``run.py`` cached under ``--work``: the probe words,
their activations and the letter probe, and one trained checkpoint, and gives them to
SAEBench's functions unchanged:

- ``train_k_sparse_probes`` (its L1 probe, then sklearn's ``LogisticRegression`` per
  letter and k), ``eval_probe_and_sae_k_sparse_raw_scores``, ``build_metrics_df`` and
  ``add_feature_splits_to_metrics_df``: F1 per k and the main latents per letter;
- ``get_stats_and_likely_false_negative_tokens``, ``FeatureAbsorptionCalculator`` and
  ``calculate_projection_and_cos_sims``: the per-word absorption of the probe's true
  positives, on prompts SAEBench builds itself;
- ``main._aggregate_results_df`` and the probe-F1 > 0.6 filter of ``main.run_eval``.

What SAEBench cannot be given here, and what stands in:

- A TransformerLens ``HookedTransformer``: SmolLM2 is not a TransformerLens model name
  and the hub cannot be reached. ``ResidualModel`` gives the calculator the two things it
  calls, ``to_tokens`` and ``run_with_cache``, with the output of decoder layer
  ``--layer`` of the Hugging Face SmolLM2 (``residual_reader``: the same tensor as
  ``blocks.L.hook_resid_post``) at the word's position.
- A SAELens ``SAE``: ``SaeView`` exposes what SAEBench reads of one (``encode`` to dense
  latents, ``W_enc``, ``W_dec``, ``device``, ``dtype``, ``cfg.d_sae``).
- The vocabulary: the probe words and the ICL words are the ones ``run.py`` used.

It then runs the port's pieces on SAEBench's intermediate results: our Newton fit of
the balanced logistic regression on SAEBench's k-sparse latents (F1 per k against
sklearn's), our ``main_latents`` rule on SAEBench's F1 table, and our
``word_absorption`` on the very activations SAEBench's calculator scored, word by word.
The whole-pipeline numbers differ by the random draws (L1-probe init, ICL prompts),
which the two sides seed differently. From the repository root:

    /work/venvs/saebench/bin/python -m benchmarks.absorption.saebench_check --coder topk
"""

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from benchmarks.common import provenance, write_json
from matryoshka_plugin.adapters.sparsify import load_coder
from matryoshka_plugin.evaluation.absorption import (
    LETTERS,
    WORD_POSITION,
    AbsorptionConfig,
    ProbeData,
    alpha_words,
    balanced_logistic_regression,
    dense_latents,
    f1_score,
    main_latents,
    residual_reader,
    sparse_probe_batch_size,
    word_absorption,
)
from matryoshka_plugin.fit import HOOKPOINT

HERE = Path(__file__).resolve().parent


class SaeView:
    """A sparsify coder as SAEBench reads a SAELens SAE: dense ``encode`` and weights."""

    def __init__(self, coder):
        self.coder = coder
        self.W_dec = coder.W_dec.detach().float()
        self.W_enc = coder.encoder.weight.detach().float().T
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.cfg = SimpleNamespace(d_sae=coder.num_latents)

    def encode(self, x):
        return dense_latents(self.coder, x.float())


class ResidualModel:
    """What ``FeatureAbsorptionCalculator`` calls on a ``HookedTransformer``, backed by the
    Hugging Face SmolLM2: the residual after decoder layer ``layer`` at ``WORD_POSITION``
    (other positions zero: the calculator reads only that one). Keeps every activation
    it returned, by prompt, for the word-by-word comparison."""

    def __init__(self, model, tokenizer, layer: int):
        self.tokenizer = tokenizer
        self.read = residual_reader(model, tokenizer, layer)
        self.hook = f"blocks.{layer}.hook_resid_post"
        self.seen: dict[str, torch.Tensor] = {}

    def to_tokens(self, text: str) -> torch.Tensor:
        return torch.tensor([self.tokenizer(text)["input_ids"]])

    def run_with_cache(self, prompts, names_filter):
        assert list(names_filter) == [self.hook], names_filter
        acts = self.read(list(prompts))
        self.seen.update(zip(prompts, acts))
        n_tok = self.to_tokens(prompts[0]).shape[1]
        full = torch.zeros(len(prompts), n_tok, acts.shape[1])
        full[:, WORD_POSITION] = acts
        return None, {self.hook: full}


def run(a) -> dict:
    from sae_bench.evals.absorption.feature_absorption import (
        calculate_projection_and_cos_sims,
        get_stats_and_likely_false_negative_tokens,
    )
    from sae_bench.evals.absorption.feature_absorption_calculator import FeatureAbsorptionCalculator
    from sae_bench.evals.absorption.k_sparse_probing import (
        add_feature_splits_to_metrics_df,
        build_metrics_df,
        eval_probe_and_sae_k_sparse_raw_scores,
        get_sparse_probing_raw_results_filename,
        sae_k_sparse_metadata,
        train_k_sparse_probes,
    )
    from sae_bench.evals.absorption.main import _aggregate_results_df
    from sae_bench.evals.absorption.probing import LinearProbe
    from sae_bench.evals.absorption.prompting import first_letter_formatter

    from matryoshka_plugin.offline import SMOLLM2, load_pretrained, load_tokenizer

    torch.set_num_threads(a.threads)
    work = Path(a.work)
    record_path = next((work).glob(f"{a.run_dir}/{a.coder}/eval_words{a.words}_lm*.json"))
    ours = json.loads(record_path.read_text())
    data = ProbeData(**torch.load(work / f"probe_L{a.layer}_{a.words}.pt"))
    coder = load_coder(record_path.parent / HOOKPOINT).eval()
    sae = SaeView(coder)
    cfg = AbsorptionConfig()
    model, tokenizer = load_pretrained(SMOLLM2), load_tokenizer(SMOLLM2)
    icl_words = alpha_words(tokenizer)
    batch = sparse_probe_batch_size(len(data.train_words), len(icl_words), cfg)  # as run.py

    probe = LinearProbe(data.x_train.shape[1], len(LETTERS))
    with torch.no_grad():
        probe.fc.weight.copy_(data.probe_W)
        probe.fc.bias.copy_(data.probe_b)
    y_train, y_test = data.y_train.tolist(), data.y_test.tolist()
    train_labels = list(zip(data.train_words, y_train))
    eval_labels = list(zip(data.test_words, y_test))

    def k_sparse(seed: int):
        """SAEBench's k-sparse stage; ``seed`` seeds torch's global RNG, which its L1
        probe's init and batch order draw from."""
        torch.manual_seed(seed)
        k_probes = train_k_sparse_probes(sae, train_labels, data.x_train, ks=list(range(1, cfg.max_k + 1)),
                                         batch_size=batch, precalc_sae_acts=True)
        raw = eval_probe_and_sae_k_sparse_raw_scores(sae, probe, k_probes, eval_labels, data.x_test)
        meta = sae_k_sparse_metadata(sae, probe, k_probes, sae_name="check", layer=a.layer)
        metrics = build_metrics_df(raw, meta, cfg.max_k)
        add_feature_splits_to_metrics_df(metrics, max_k_value=cfg.max_k, f1_jump_threshold=cfg.f1_jump)
        return raw, metrics

    t = time.time()
    raw, metrics = k_sparse(cfg.seed)
    k_sparse_s = time.time() - t
    # How much the main latents move with SAEBench's own random draws alone: the yardstick
    # for the port's agreement with SAEBench, whose draws it cannot reproduce.
    other_seed_main = {r["letter"]: list(r["split_feats"]) for _, r in k_sparse(a.other_seed)[1].iterrows()}

    # The port's pieces on SAEBench's k-sparse latents.
    z_train, z_test = sae.encode(data.x_train), sae.encode(data.x_test)
    yt, ye = torch.tensor(y_train), torch.tensor(y_test)
    letters = []
    for i, letter in enumerate(LETTERS):
        row = metrics[metrics["letter"] == letter].iloc[0]
        sb_f1 = [float(row[f"f1_sparse_sae_{k}"]) for k in range(1, cfg.max_k + 1)]
        feats = [row[f"sparse_sae_k_{k}_feats"].tolist() for k in range(1, cfg.max_k + 1)]
        our_f1 = []
        for ids in feats:
            coef, bias = balanced_logistic_regression(z_train[:, ids], yt == i)
            our_f1.append(f1_score(ye == i, z_test[:, ids] @ coef + bias > 0))
        sb_probe_f1 = float(row["f1_probe"])
        letters.append({
            "letter": letter,
            "saebench_probe_f1": sb_probe_f1,
            "our_probe_f1": ours["letters"][i]["probe_f1"],
            "saebench_f1_by_k": sb_f1,
            "our_newton_f1_on_saebench_latents": our_f1,
            "saebench_main_latents": list(row["split_feats"]),
            "our_rule_main_latents": main_latents(sb_f1, feats, cfg.f1_jump),
            "our_eval_main_latents": ours["letters"][i]["main_latents"],
            "saebench_other_seed_main_latents": other_seed_main[letter],
        })

    # SAEBench's absorption calculator on its own prompts.
    t = time.time()
    tl = ResidualModel(model, tokenizer, a.layer)
    calc = FeatureAbsorptionCalculator(
        model=tl, icl_word_list=icl_words, max_icl_examples=10, base_template="{word} has the first letter:",
        answer_formatter=first_letter_formatter(), word_token_pos=WORD_POSITION,
        full_absorption_probe_cos_sim_threshold=cfg.full_cos,
        absorption_fraction_probe_cos_sim_threshold=cfg.fraction_cos,
        probe_projection_proportion_threshold=cfg.projection_share,
        absorption_fraction_max_absorbing_latents=cfg.max_absorbers, batch_size=16,
    )
    random.seed(cfg.seed)
    with tempfile.TemporaryDirectory() as tmp:
        raw.to_parquet(Path(tmp) / get_sparse_probing_raw_results_filename("check", a.layer))
        negs = get_stats_and_likely_false_negative_tokens(metrics, "check", a.layer, Path(tmp))
    word_df = calculate_projection_and_cos_sims(calc, sae, probe, a.layer, negs)
    agg = _aggregate_results_df(word_df)
    absorption_s = time.time() - t

    # Our per-word rule on the activations SAEBench's calculator scored.
    diffs, full_mismatch = [], 0
    for letter, rows in word_df.groupby("letter"):
        i = LETTERS.index(letter)
        probe_dir = data.probe_W[i] / data.probe_W[i].norm()
        cos = F.cosine_similarity(probe_dir[None], sae.W_dec, dim=-1)
        for _, r in rows.iterrows():
            act = tl.seen[r["prompt"]]
            fraction, full = word_absorption(act, sae.encode(act[None])[0], cos, probe_dir,
                                             list(r["split_feats"]), cfg)
            diffs.append(abs(fraction - float(r["absorption_fraction"])))
            full_mismatch += full != bool(r["is_full_absorption"])
    f1_probe = dict(zip(metrics["letter"], metrics["f1_probe"]))
    scored = agg[[f1_probe[letter] > cfg.min_probe_f1 for letter in agg["letter"]]]
    sb_mean = statistics.mean(scored["mean_absorption_fraction"])
    sb_full = statistics.mean(scored["full_absorption_rate"])
    max_f1_gap = max(abs(x - y) for r in letters
                     for x, y in zip(r["saebench_f1_by_k"], r["our_newton_f1_on_saebench_latents"]))
    return {
        **provenance(__spec__.name),
        "coder": a.coder, "checkpoint": str(record_path.parent),
        "sparse_probe_batch_size": batch,
        "summary": {
            "saebench_mean_absorption_fraction": sb_mean,
            "port_mean_absorption_fraction": ours["mean_absorption_fraction"],
            "saebench_mean_full_absorption": sb_full,
            "port_mean_full_absorption": ours["mean_full_absorption"],
            "saebench_scored_letters": len(scored),
            "port_scored_letters": ours["num_scored_letters"],
            "saebench_mean_num_split_features": statistics.mean(len(x) for x in scored["split_feats"]),
            "port_mean_num_split_features": ours["mean_num_split_features"],
            "words_scored_by_saebench_calculator": len(diffs),
            "max_abs_fraction_diff_port_rule_vs_saebench_rule_same_activations": max(diffs) if diffs else None,
            "full_absorption_disagreements_same_activations": full_mismatch,
            "max_abs_f1_diff_newton_vs_sklearn_same_latents": max_f1_gap,
            "letters_main_latents_rule_agrees": sum(r["our_rule_main_latents"] == r["saebench_main_latents"]
                                                    for r in letters),
            "letters_main_latents_same_as_port_eval": sum(
                r["our_eval_main_latents"] == r["saebench_main_latents"] for r in letters),
            f"letters_main_latents_same_saebench_seed_{cfg.seed}_vs_{a.other_seed}": sum(
                other_seed_main[r["letter"]] == r["saebench_main_latents"] for r in letters),
            "letters_first_main_latent_same_as_port_eval": sum(
                r["our_eval_main_latents"][:1] == r["saebench_main_latents"][:1] for r in letters),
            f"letters_first_main_latent_same_saebench_seed_{cfg.seed}_vs_{a.other_seed}": sum(
                other_seed_main[r["letter"]][:1] == r["saebench_main_latents"][:1] for r in letters),
            "max_abs_probe_f1_diff": max(abs(r["saebench_probe_f1"] - r["our_probe_f1"]) for r in letters),
        },
        "wall_s": {"k_sparse": k_sparse_s, "absorption": absorption_s},
        "letters": letters,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Check the absorption port against SAEBench on one cached coder.")
    p.add_argument("--coder", default="topk", help="baseline name in run.py (a sparsify checkpoint)")
    p.add_argument("--run-dir", default="L6_*_s0", help="glob of the checkpoint's run directory under --work")
    p.add_argument("--layer", type=int, default=6)
    p.add_argument("--words", type=int, default=2000)
    p.add_argument("--other-seed", type=int, default=43, help="a second seed for SAEBench's k-sparse stage")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", default="/work/runs/absorb-cache")
    p.add_argument("--out", default=str(HERE / "saebench_check.json"))
    a = p.parse_args(argv)
    result = run(a)
    write_json(result, a.out)
    print(json.dumps(result["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
