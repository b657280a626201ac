"""Screenshots of the multi-level viewer on the SmolLM2 prefix graphs (real run).

Copies the attribution benchmark's graphs (benchmarks/attribution/results/graphs, built
by run_smollm2.py from the Matryoshka TopK transcoders it exports into its --work dir)
into a scratch dir, writes feature pages and decompositions there from Austen text with
the same SmolLM2 + transcoders, serves them and drives Debian chromium with Playwright:
one screenshot per prefix length, one of a decomposition, one after clicking a refining
latent. Screenshots are palette-quantised PNGs in benchmarks/viewer/.

    python -m benchmarks.viewer.run [--n-tokens 4096]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

from benchmarks.common import provenance, scratch_dir, write_json

HERE = Path(__file__).resolve().parent
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def save_png(page, path: Path) -> None:
    from PIL import Image

    tmp = path.with_suffix(".raw.png")
    page.screenshot(path=str(tmp))
    Image.open(tmp).convert("RGB").quantize(colors=64).save(path, optimize=True)
    tmp.unlink()


def open_page(pw, viewport: dict):
    """Debian chromium on a new page, with the lists its console errors and its requests
    off localhost (any URL whose host is not localhost or 127.0.0.1) are collected in."""
    browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=FLAGS, headless=True)
    page = browser.new_page(viewport=viewport)
    errors, off = [], []
    page.on("console", lambda m: m.type == "error" and errors.append(m.text))
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("request", lambda r: urlparse(r.url).hostname not in ("localhost", "127.0.0.1") and off.append(r.url))
    return browser, page, errors, off


def finish(record: dict, name: str, shots: list, errors: list, off: list) -> int:
    """Write and print the run's record; exit status 1 if the page logged an error or
    asked for anything off localhost."""
    record = {**record, "screenshots": shots, "console_errors": errors, "off_localhost_requests": off}
    write_json(record, HERE / name)
    print(json.dumps(record, indent=2))
    return 0 if not errors and not off else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--graphs", default=str(HERE.parent / "attribution" / "results" / "graphs"))
    p.add_argument("--transcoders", default=str(scratch_dir("attribution-bench") / "export-topk"))
    p.add_argument("--model", default="smollm2")
    p.add_argument("--work", default=str(scratch_dir("viewer-bench")))
    p.add_argument("--n-tokens", type=int, default=4096)
    p.add_argument("--skip-build", action="store_true", help="reuse the viewer data in --work")
    args = p.parse_args()

    from playwright.sync_api import sync_playwright

    from matryoshka_plugin.corpus import austen_texts
    from matryoshka_plugin.offline import SMOLLM2
    from matryoshka_plugin.viewer import build_viewer_data, serve_graphs
    from matryoshka_plugin.viewer.__main__ import load_model

    work = Path(args.work) / "graphs"
    t0 = time.time()
    if not args.skip_build:
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(args.graphs, work)
        model = load_model(args.transcoders, SMOLLM2 if args.model == "smollm2" else args.model)
        # Austen's texts after the first 5% of each novel (the attribution run trained on the start).
        texts = [t[len(t) // 20 :] for t in austen_texts().values()]
        build_viewer_data(work, model, texts, n_tokens=args.n_tokens, seq_len=64)
        del model
    build_s = time.time() - t0

    graphs = sorted(json.loads((work / "graph-metadata.json").read_text())["graphs"], key=lambda g: g["prefix_len"])
    data = {g["prefix_len"]: json.loads((work / f"{g['slug']}.json").read_text()) for g in graphs}
    (decomp_path,) = (work / "matryoshka-viewer").glob("*/decomposition.json")
    decomp = json.loads(decomp_path.read_text())
    smallest = graphs[0]
    # The most influential feature node of the coarsest graph that has refining latents.
    feats = [n for n in data[smallest["prefix_len"]]["nodes"] if n["feature_type"] == "cross layer transcoder"]
    feats.sort(key=lambda n: n["influence"])
    focus = next((n for n in feats if decomp["features"].get("_".join(n["node_id"].split("_")[:2]), {}).get("children", {}).get(str(smallest["prefix_len"]))), None)
    if focus is None:
        print(f"the P={smallest['prefix_len']} graph has no feature node with refining latents: no decomposition screenshot")

    server = serve_graphs(work, port=0)
    shots, counts = [], {}
    try:
        with sync_playwright() as pw:
            browser, page, errors, off = open_page(pw, {"width": 1300, "height": 900})

            def rendered(slug, n):
                page.wait_for_function("([s, n]) => matryoshkaViewer.lastRendered === s && matryoshkaViewer.renders > n", arg=[slug, n], timeout=120_000)
                page.wait_for_selector(".link-graph text.node")
                time.sleep(1.0)

            page.goto(f"{server.url}?slug={smallest['slug']}")
            rendered(smallest["slug"], 0)
            for g in graphs:
                n = page.evaluate("matryoshkaViewer.renders")
                page.click(f".mv-prefix[data-p='{g['prefix_len']}']")
                rendered(g["slug"], n if g is not smallest else n - 1)
                counts[g["prefix_len"]] = page.evaluate("document.querySelectorAll('.link-graph text.node').length")
                out = HERE / f"smollm2-p{g['prefix_len']}.png"
                save_png(page, out)
                shots.append(out.name)
            if focus is None:
                browser.close()
                raise SystemExit(2)
            n = page.evaluate("matryoshkaViewer.renders")
            page.click(f".mv-prefix[data-p='{smallest['prefix_len']}']")
            rendered(smallest["slug"], n)
            ids = page.evaluate("[...document.querySelectorAll('.link-graph text.node')].map(e => d3.select(e).datum().nodeId)")
            page.locator(".link-graph text.node").nth(ids.index(focus["node_id"])).click(force=True)
            page.wait_for_selector(".mv-children tr.mv-link")
            page.wait_for_selector(".feature-examples-container .ctx-container", timeout=60_000)
            out = HERE / "smollm2-decomposition.png"
            save_png(page, out)
            shots.append(out.name)
            n = page.evaluate("matryoshkaViewer.renders")
            page.click(".mv-children tr.mv-link >> nth=0")
            page.wait_for_function("n => matryoshkaViewer.renders > n", arg=n, timeout=120_000)
            time.sleep(1.5)
            out = HERE / "smollm2-decomposition-click.png"
            save_png(page, out)
            shots.append(out.name)
            browser.close()
    finally:
        server.stop()
    record = {
        **provenance(__spec__.name),
        "graphs": {g["prefix_len"]: g["slug"] for g in graphs},
        "rendered_nodes_per_prefix": counts,
        "graphs_dir": args.graphs,
        "feature_nodes_per_prefix": {p: sum(n["feature_type"] == "cross layer transcoder" for n in d["nodes"]) for p, d in data.items()},
        "focus_node": focus["node_id"],
        "viewer_data_build_seconds": round(build_s, 1),
        "corpus_tokens": decomp["corpus_tokens"],
    }
    return finish(record, "screenshots.json", shots, errors, off)


if __name__ == "__main__":
    sys.exit(main())
