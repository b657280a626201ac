"""BatchTopK at evaluation: how far the inference threshold's L0 is from k during training (#20).

A BatchTopK coder is trained through ``fit_activations`` on the hard toy
(``toy.hard_toy_config``). Every ``--every`` steps, with the weights of that moment, the
held-out rows are encoded with the threshold each rule would hold then (all rules see
the same stream of per-batch smallest kept activations, so one run compares them):

- ``ema_first``: an EMA (momentum 0.99) started at the first batch's value (the
  plugin before 2026-12-02);
- ``ema_debiased``: the same EMA with Adam's bias correction, so the first batch
  weighs as much as any other rather than 0.99^n;
- ``ema_0.9``, ``last_batch``: a fixed momentum of 0.9, and no averaging at all;
- ``window_5pct``, ``window_10pct``: an EMA over the last 5 % / 10 % of the batches so
  far, at most 0.99 (the plugin now implements the 10 % one);
- ``coder``: the threshold the coder itself holds (whatever rule it implements);
- ``per_token_topk``: plain TopK per row (L0 = k exactly), for its FVU;
- ``oracle``: the threshold that gives L0 = k on the held-out rows themselves.

Reported per rule: held-out L0 / k and FVU, and (for the coder) how many columns its
eval output has on held-out batches of different make-up.

    python -m benchmarks.quality.batch_topk_threshold --settings w2_k6,w2_k2
"""

import argparse
import os
import time

import torch

from benchmarks.common import provenance, write_json, write_markdown
from matryoshka_plugin import MatryoshkaSparseCoderConfig
from matryoshka_plugin.adapters.sparsify import coder as coder_module
from matryoshka_plugin.fit import fit_activations
from matryoshka_plugin.toy import ToyModel, hard_toy_config

HERE = os.path.dirname(os.path.abspath(__file__))
MOMENTUM = 0.99


def _debiased(n: int) -> float:
    m = MOMENTUM
    return m * (1 - m ** (n - 1)) / (1 - m**n)


RULES = {
    # name -> momentum at update n (n = 1, 2, ...); update 1 takes the batch's value.
    "ema_first": lambda n: MOMENTUM,
    "ema_debiased": _debiased,
    "ema_0.9": lambda n: 0.9,
    "last_batch": lambda n: 0.0,
    "window_5pct": lambda n: min(MOMENTUM, 1 - 1 / max(1.0, 0.05 * n)),
    "window_10pct": lambda n: min(MOMENTUM, 1 - 1 / max(1.0, 0.1 * n)),
}
"""Threshold rules, each an EMA of the per-batch smallest kept activation."""


class RuleStream:
    """Every rule in ``RULES`` fed the per-batch smallest kept activation, step by step."""

    def __init__(self):
        self.values = dict.fromkeys(RULES, 0.0)
        self.n = 0

    def update(self, min_kept: float) -> None:
        self.n += 1
        for name, beta in RULES.items():
            b = beta(self.n) if self.n > 1 else 0.0
            self.values[name] = b * self.values[name] + (1 - b) * min_kept

    def thresholds(self) -> dict[str, float]:
        return dict(self.values)


@torch.no_grad()
def evaluate(coder, x_test: torch.Tensor, thresholds: dict, k: int, batch: int) -> dict:
    pre = torch.relu(coder.encoder(x_test - coder.b_dec))
    var = (x_test - x_test.mean(0)).pow(2).sum()

    def fvu(acts):
        return float((x_test - (acts @ coder.W_dec + coder.b_dec)).pow(2).sum() / var)

    out = {}
    n_keep = k * len(pre)
    oracle = float(pre.flatten().kthvalue(pre.numel() - n_keep + 1).values)
    for name, t in {**thresholds, "oracle": oracle}.items():
        acts = pre * (pre > t)
        out[name] = {"l0_over_k": float((acts > 0).sum(1).float().mean()) / k, "fvu": fvu(acts)}
    top = pre.topk(k, dim=1)
    out["per_token_topk"] = {
        "l0_over_k": float((top.values > 0).sum(1).float().mean()) / k,
        "fvu": fvu(torch.zeros_like(pre).scatter(1, top.indices, top.values)),
    }
    # The coder's own eval path: its output width on batches of different make-up.
    was = coder.training
    coder.eval()
    widths = [int(coder.encode(xb).top_acts.shape[1]) for xb in x_test.split(batch)]
    coder.train(was)
    out["coder_eval_columns"] = widths
    return out


def run_setting(width, k, args, x_train, x_test):
    """One training run; returns the per-eval-point rows."""
    stream, rows, calls = RuleStream(), [], [0]
    real_encode = coder_module.MatryoshkaSparseCoder.encode

    def encode(self, x):
        if not self.training:
            return real_encode(self, x)
        if calls[0] % args.every == 0 and stream.n:
            ths = {**stream.thresholds(), "coder": float(self.batch_topk_threshold)}
            rows.append({"step": calls[0], **evaluate(self, x_test, ths, k, args.eval_batch)})
        out = real_encode(self, x)
        kept = out.top_acts.detach()[out.top_acts > 0]
        stream.update(float(kept.min()))
        calls[0] += 1
        return out

    coder_module.MatryoshkaSparseCoder.encode = encode
    try:
        cfg = MatryoshkaSparseCoderConfig(num_latents=width, k=k, batch_topk=True, matryoshka=args.matryoshka)
        coder = fit_activations(x_train, cfg, batch_size=args.batch_size, epochs=args.epochs,
                                optimizer="adam", lr=args.lr, seed=args.seed)
    finally:
        coder_module.MatryoshkaSparseCoder.encode = real_encode
    final = evaluate(coder, x_test, {**stream.thresholds(), "coder": float(coder.batch_topk_threshold)},
                     k, args.eval_batch)
    rows.append({"step": calls[0], **final})
    return rows


def markdown(results: dict, meta: dict, steps_shown: list[int]) -> str:
    rules = [*RULES, "coder", "oracle", "per_token_topk"]
    lines = [f"{meta['command']}  \n{meta['date']}, {meta['machine']}", ""]
    for setting, rows in results.items():
        lines += [f"**{setting}**: held-out L0 / k (FVU) by step", "",
                  "| step | " + " | ".join(rules) + " | coder eval columns (min-max over batches) |",
                  "|---" * (len(rules) + 2) + "|"]
        for r in rows:
            if r["step"] not in steps_shown and r is not rows[-1]:
                continue
            cells = [f"{r[n]['l0_over_k']:.2f} ({r[n]['fvu']:.3f})" for n in rules]
            cols = r["coder_eval_columns"]
            lines.append(f"| {r['step']} | " + " | ".join(cells) + f" | {min(cols)}-{max(cols)} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality.batch_topk_threshold",
                                description=__doc__.splitlines()[0])
    p.add_argument("--settings", type=lambda s: s.split(","), default=["w2_k6", "w2_k2"])
    p.add_argument("--matryoshka", action="store_true")
    p.add_argument("--train-rows", type=int, default=65536)
    p.add_argument("--test-rows", type=int, default=8192)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--eval-batch", type=int, default=512)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--every", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(HERE, "batch_topk_threshold"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    toy = ToyModel(hard_toy_config())
    x_train, _ = toy.sample(args.train_rows, seed=1000)
    x_test, _ = toy.sample(args.test_rows, seed=2000)
    results = {}
    for name in args.settings:
        w, k = name.split("_")
        started = time.time()
        results[name] = run_setting(int(w[1:]) * toy.cfg.n_features, int(k[1:]), args, x_train, x_test)
        print(name, f"{time.time() - started:.0f}s", flush=True)
    meta = provenance("benchmarks.quality.batch_topk_threshold", argv)
    write_json({**meta, "args": vars(args), "results": results}, args.out + ".json")
    shown = [8, 16, 32, 64, 128, 256, 512]
    table = markdown(results, meta, shown)
    write_markdown(table.splitlines(), args.out + ".md")
    print(table)


if __name__ == "__main__":
    main()
