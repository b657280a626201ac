"""Held-out FVU of a nested_decoders CLT at its nested sizes: each level's own decoder
against the full decoder's first P rows (issue #15 part 2, for CLTs).

A 2-layer CLT on the planted-hierarchy toy (``matryoshka_plugin.toy``): source layer
``l`` reads toy activations ``x_l`` and both targets are fixed random rotations of the
sources' sums, so latents of layer 0 must write into layer 1. Trained with Adam on
fresh batches; the same model is then evaluated both ways on one held-out set.

    python -m benchmarks.clt_level_decoders.run [--steps N] [--seeds S ...]

Writes ``results.json`` and ``results.md`` next to this file.
"""

import argparse
from pathlib import Path

import torch

from benchmarks.common import provenance, write_json, write_markdown
from matryoshka_plugin.clt import CLTConfig, MatryoshkaCLT
from matryoshka_plugin.core.cross_layer import cross_layer_nested_fvu, cross_layer_recons
from matryoshka_plugin.toy import ToyConfig, ToyModel

HERE = Path(__file__).parent
WIDTH, K, NESTED = 64, 8, [8, 32]


def data(toy: ToyModel, rot: torch.Tensor, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs ``[n, 2, d]`` (two toy samples) and targets: layer 0 rotates source 0, layer 1
    rotates the sum of both sources."""
    x0, _ = toy.sample(n, seed=2 * seed)
    x1, _ = toy.sample(n, seed=2 * seed + 1)
    x = torch.stack([x0, x1], dim=1)
    y = torch.stack([x0 @ rot[0], (x0 + x1) @ rot[1]], dim=1)
    return x, y


def full_decoder_fvu(clt: MatryoshkaCLT, x, y, lens) -> list[list[float]]:
    """FVU per prefix with the full decoder's first P rows (what export used before)."""
    codes = clt.encode(x)
    recons = cross_layer_recons(clt._target_decodes(codes, lens), clt.b_dec, stop_gradient=False)
    _, fvu = cross_layer_nested_fvu(recons, y, [1.0] * len(lens))
    return fvu.T.tolist()


def run_seed(seed: int, steps: int) -> dict:
    toy = ToyModel(ToyConfig(seed=seed))
    g = torch.Generator().manual_seed(seed)
    rot = torch.linalg.qr(torch.randn(2, toy.cfg.d_model, toy.cfg.d_model, generator=g))[0]
    torch.manual_seed(seed)
    cfg = CLTConfig(matryoshka=True, num_latents=WIDTH, k=K, nested_sizes=NESTED, nested_decoders=True)
    clt = MatryoshkaCLT(toy.cfg.d_model, [0, 1], cfg)
    opt = torch.optim.Adam(clt.parameters(), lr=2e-3)
    x, y = data(toy, rot, 512, 1000)
    clt.init_biases(x, y)
    clt.train()
    for step in range(steps):
        x, y = data(toy, rot, 512, step)
        loss = clt(x, y).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    clt.eval()
    xh, yh = data(toy, rot, 8192, 10**6)
    lens = clt.nested_sizes
    with torch.no_grad():
        own = clt.prefix_fvu(xh, yh, lens)
        full = full_decoder_fvu(clt, xh, yh, lens)
    return {
        "seed": seed,
        "own_decoder": {str(p): own[p] for p in lens},
        "full_decoder_rows": {str(p): full[i] for i, p in enumerate(lens)},
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="Adam steps per seed.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="Seeds to train.")
    args = parser.parse_args(argv)
    runs = [run_seed(s, args.steps) for s in args.seeds]
    prov = provenance("benchmarks.clt_level_decoders.run", argv)
    write_json({**prov, "width": WIDTH, "k": K, "nested_sizes": NESTED, "steps": args.steps, "runs": runs},
               HERE / "results.json")
    lines = [
        "# CLT level decoders: held-out FVU at the nested sizes",
        "",
        f"`{prov['command']}`, {prov['date']}, {prov['machine']}.",
        "",
        f"2-layer CLT, width {WIDTH}, k={K}, nested sizes {NESTED}, `nested_decoders: true`, "
        f"{args.steps} Adam steps on the planted-hierarchy toy; FVU per target layer (0 / 1) "
        "on 8192 held-out rows. Same model, two decoders.",
        "",
        "| seed | P | own decoder (L0 / L1) | full decoder's first P rows (L0 / L1) |",
        "| --- | --- | --- | --- |",
    ]
    for r in runs:
        for p in map(str, NESTED):
            own, full = r["own_decoder"][p], r["full_decoder_rows"][p]
            lines.append(f"| {r['seed']} | {p} | {own[0]:.3f} / {own[1]:.3f} | {full[0]:.3f} / {full[1]:.3f} |")
    write_markdown(lines, HERE / "results.md")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
