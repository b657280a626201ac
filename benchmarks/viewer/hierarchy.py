"""Screenshots of group-by-parent and the compare view on SmolLM2 graphs (real run).

Takes a ``matryoshka-demo`` graphs folder (graph files with supernodes from the nesting,
their ``.hierarchy.json`` sidecars and the viewer data), serves it with the plugin's viewer
and drives Debian chromium with Playwright: the finest graph as drawn, the same graph
grouped by parent, and the compare view of the two finest prefix lengths. Palette-quantised
PNGs and ``hierarchy-screenshots.json`` (node counts, console errors, off-localhost
requests) go to benchmarks/viewer/.

    python -m benchmarks.viewer.hierarchy --graphs /work/runs/recipe-full/graphs
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from benchmarks.common import provenance, write_json
from benchmarks.viewer.run import FLAGS, HERE, save_png


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--graphs", type=Path, required=True, help="a matryoshka-demo --out folder's graphs/")
    p.add_argument("--name", default="smollm2", help="screenshot file prefix")
    args = p.parse_args()

    from playwright.sync_api import sync_playwright

    from matryoshka_plugin.viewer import serve_graphs

    graphs = sorted(json.loads((args.graphs / "graph-metadata.json").read_text())["graphs"], key=lambda g: g["prefix_len"])
    coarse, fine = graphs[-2], graphs[-1]
    side = json.loads((args.graphs / f"{fine['slug']}.hierarchy.json").read_text())
    server = serve_graphs(args.graphs, port=0)
    shots, counts, errors, off = [], {}, [], []
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=FLAGS, headless=True)
            page = browser.new_page(viewport={"width": 1300, "height": 900})
            page.on("console", lambda m: m.type == "error" and errors.append(m.text))
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: "localhost" not in r.url and "127.0.0.1" not in r.url and off.append(r.url))

            def rendered(n):
                page.wait_for_function("([s, n]) => matryoshkaViewer.lastRendered === s && matryoshkaViewer.renders > n",
                                       arg=[fine["slug"], n], timeout=120_000)
                page.wait_for_selector(".link-graph text.node")
                time.sleep(1.0)

            def shot(what):
                counts[what] = page.evaluate("document.querySelectorAll('.link-graph text.node').length")
                out = HERE / f"{args.name}-{what}-p{fine['prefix_len']}.png"
                save_png(page, out)
                shots.append(out.name)

            page.goto(f"{server.url}?slug={fine['slug']}")
            rendered(0)
            shot("plain")
            n = page.evaluate("matryoshkaViewer.renders")
            page.locator(".mv-group-box").set_checked(True)
            rendered(n)
            shot("grouped")
            page.click(".mv-compare-toggle")
            page.wait_for_selector(".mv-compare-table")
            time.sleep(1.0)
            splits = page.evaluate("document.querySelectorAll('.mv-compare-table tr.mv-split').length")
            summary = page.inner_text(".mv-compare-summary")
            out = HERE / f"{args.name}-compare-p{coarse['prefix_len']}-p{fine['prefix_len']}.png"
            save_png(page, out)
            shots.append(out.name)
            browser.close()
    finally:
        server.stop()
    record = {
        **provenance(__spec__.name),
        "graphs_dir": str(args.graphs),
        "coarse": coarse["slug"],
        "fine": fine["slug"],
        "children_with_a_parent": len(side["parents"]),
        "rendered_nodes": counts,
        "compare_split_rows": splits,
        "compare_summary": summary,
        "screenshots": shots,
        "console_errors": errors,
        "off_localhost_requests": off,
    }
    write_json(record, HERE / f"{args.name}-hierarchy-screenshots.json")
    print(json.dumps(record, indent=2))
    return 0 if not errors and not off else 1


if __name__ == "__main__":
    sys.exit(main())
