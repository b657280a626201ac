"""Screenshots of the hierarchy views on SmolLM2: group by parent, compare, graphs on demand.

Takes the graphs ``matryoshka-demo`` wrote (``DIR/graphs``: three prefix lengths of one
Austen prompt, with supernodes and ``.hierarchy.json`` sidecars scored by co-activation
on held-out novels, and the viewer's feature pages), copies them into a scratch dir and
serves them with a graph computer over the demo's own SmolLM2 transcoders
(``DIR/transcoders``), the same as ``circuit-tracer-matryoshka start-server``. Debian
chromium, driven by Playwright, then

1. checks that the pinned subgraph, the file's supernodes, is laid out, then turns on
   "Group by parent" at the middle prefix length (fine nodes collapsed into their coarse
   parents);
2. opens the compare view of the two smallest prefix lengths (which coarse node split
   into which fine nodes, and how much of the influence went to error nodes);
3. types a new Austen prompt into the prompt box, after a bad one that must be refused
   in the page (its 400, which chromium logs, is recorded as ``refused_prompt``, not
   as a console error), and waits for its graphs at two prefix lengths to be computed.

Screenshots (palette-quantised PNGs) go to ``benchmarks/viewer/``, the record of what
was checked to ``hierarchy_screenshots.json``. From the repository root:

    .venv/bin/matryoshka-demo --out matryoshka-demo
    .venv/bin/python -m benchmarks.viewer.hierarchy --demo matryoshka-demo
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from benchmarks.common import provenance, scratch_dir
from benchmarks.viewer.run import HERE, finish, open_page, save_png

# Mansfield Park's first sentence: a novel the demo held out of training.
ON_DEMAND_PROMPT = "About thirty years ago Miss Maria Ward, of Huntingdon, with only seven thousand pounds"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo", required=True, help="a matryoshka-demo --out directory")
    p.add_argument("--work", default=str(scratch_dir("viewer-hierarchy")))
    p.add_argument("--timeout-s", type=float, default=900, help="longest wait for one render or computation")
    args = p.parse_args()
    demo = Path(args.demo)
    if not (demo / "graphs" / "graph-metadata.json").is_file() or not (demo / "transcoders").is_dir():
        print(f"{p.prog}: error: --demo {demo} holds no matryoshka-demo graphs/graph-metadata.json and transcoders/",
              file=sys.stderr)
        return 2

    from playwright.sync_api import sync_playwright

    from matryoshka_plugin.offline import SMOLLM2
    from matryoshka_plugin.viewer.compute import GraphComputer, load_model_and_config
    from matryoshka_plugin.viewer.server import serve_graphs

    work = Path(args.work) / "graphs"
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(demo / "graphs", work)
    graphs = sorted(json.loads((work / "graph-metadata.json").read_text())["graphs"], key=lambda g: g["prefix_len"])
    if len(graphs) < 2:
        print(f"{p.prog}: error: --demo {demo} has {len(graphs)} graph(s); the views need at least 2 prefix lengths",
              file=sys.stderr)
        return 2
    coarse, mid = graphs[0], graphs[1]
    hier = json.loads((work / f"{mid['slug']}.hierarchy.json").read_text())
    on_demand_p = [graphs[0]["prefix_len"], graphs[-1]["prefix_len"]]

    t0 = time.time()
    model, config = load_model_and_config(str(demo / "transcoders"), SMOLLM2)
    computer = GraphComputer(model, config, work, prefix_lens=on_demand_p)
    load_s = time.time() - t0
    timeout_ms = args.timeout_s * 1000

    server = serve_graphs(work, port=0, computer=computer)
    shots, record = [], {}
    try:
        with sync_playwright() as pw:
            # Tall enough that the pinned subgraph under the graph is in the shots.
            browser, page, errors, off = open_page(pw, {"width": 1400, "height": 1600})

            def rendered(slug, n):
                page.wait_for_function("([s, n]) => matryoshkaViewer.lastRendered === s && matryoshkaViewer.renders > n",
                                       arg=[slug, n], timeout=timeout_ms)
                page.wait_for_selector(".link-graph text.node", timeout=timeout_ms)
                page.wait_for_selector(".mv-group-info:not(:empty)", timeout=timeout_ms)
                time.sleep(1.0)

            def shot(name):
                out = HERE / name
                save_png(page, out)
                shots.append(out.name)

            # 1. Group by parent at the middle prefix length.
            t = time.time()
            page.goto(f"{server.url}?slug={mid['slug']}")
            rendered(mid["slug"], 0)
            record["first_render_s"] = round(time.time() - t, 1)
            nodes_before = page.evaluate("document.querySelectorAll('.link-graph text.node').length")
            # The pinned subgraph with the file's supernodes: circuit-tracer's own layout
            # threw on these graphs (dagre and fractional weights; viewer.text_only).
            page.wait_for_selector(".subgraph .supernode-container", timeout=timeout_ms)
            subgraph = """() => ({
                drawn: window.selForceNodes.length,
                supernodes: window.selForceNodes.filter(d => d.node.isSuperNode).length,
                laid_out_by_dagre: window.selForceNodes.filter(d => d.dagrePositioned === true).length})"""
            record["subgraph"] = page.evaluate(subgraph)
            assert record["subgraph"]["laid_out_by_dagre"] == record["subgraph"]["drawn"] > 0, record["subgraph"]
            n = page.evaluate("matryoshkaViewer.renders")
            page.locator(".mv-group-box").set_checked(True)
            rendered(mid["slug"], n)
            record["grouped"] = {
                "prefix_len": mid["prefix_len"],
                "children_in_sidecar": len(hier["parents"]),
                "rendered_nodes": [nodes_before, page.evaluate("document.querySelectorAll('.link-graph text.node').length")],
                "group_info": page.inner_text(".mv-group-info"),
                # The file pins the nodes with a parent; grouped, their collapsed nodes.
                "subgraph": page.evaluate(subgraph),
            }
            assert record["grouped"]["subgraph"]["drawn"] > 0, "grouping emptied the pinned subgraph"
            shot(f"smollm2-grouped-p{mid['prefix_len']}.png")

            # 2. The compare view of the two smallest prefix lengths, ungrouped.
            n = page.evaluate("matryoshkaViewer.renders")
            page.locator(".mv-group-box").set_checked(False)
            rendered(mid["slug"], n)
            page.click(".mv-compare-toggle")
            page.wait_for_selector(".mv-compare-table tr.mv-split", timeout=timeout_ms)
            record["compare"] = {
                "prefixes": [coarse["prefix_len"], mid["prefix_len"]],
                "split_rows": page.evaluate("document.querySelectorAll('.mv-compare-table tr.mv-split').length"),
                "summary": page.inner_text(".mv-compare-summary"),
            }
            page.locator(".mv-compare-table").scroll_into_view_if_needed()
            shot(f"smollm2-compare-p{coarse['prefix_len']}-p{mid['prefix_len']}.png")

            # 3. Graphs on demand: a bad prompt is refused in the page and writes nothing, then a good one.
            page.goto(f"{server.url}?slug={mid['slug']}")
            rendered(mid["slug"], 0)
            before = sorted(f.name for f in work.iterdir())
            n_errors = len(errors)
            page.fill(".mv-prompt", "")
            page.click(".mv-compute-go")
            page.wait_for_function("() => document.querySelector('.mv-compute-msg').textContent.includes('the prompt is empty')")
            assert sorted(f.name for f in work.iterdir()) == before, "a refused prompt wrote files"
            # Chromium logs the refusal's 400 as a console error: that one is expected,
            # and is recorded apart so that any other error still fails the run.
            refusal = [e for e in errors[n_errors:] if "status of 400 (Bad Request)" in e]
            assert len(refusal) == 1, f"expected one 400 for the empty prompt, got {errors[n_errors:]}"
            errors.remove(refusal[0])
            record["refused_prompt"] = {"prompt": "", "message": page.inner_text(".mv-compute-msg"),
                                        "console": refusal[0]}
            page.fill(".mv-prompt", ON_DEMAND_PROMPT)
            page.fill(".mv-prompt-prefixes", " ".join(map(str, on_demand_p)))
            t = time.time()
            page.click(".mv-compute-go")
            page.wait_for_function(
                "n => document.querySelector('.mv-compute-msg').textContent.includes('Computed ' + n + ' graphs')",
                arg=len(on_demand_p), timeout=timeout_ms)
            page.wait_for_selector(".link-graph text.node", timeout=timeout_ms)
            time.sleep(1.0)
            record["on_demand"] = {
                "prompt": ON_DEMAND_PROMPT,
                "prefixes": on_demand_p,
                "compute_s": round(time.time() - t, 1),
                "message": page.inner_text(".mv-compute-msg"),
                "prompt_options": page.eval_on_selector_all("select.graph-prompt-select option", "o => o.length"),
            }
            shot("smollm2-on-demand.png")
            browser.close()
    finally:
        server.stop()
    record = {
        **provenance(__spec__.name),
        "demo": str(demo),
        "model_load_s": round(load_s, 1),
        **record,
    }
    return finish(record, "hierarchy_screenshots.json", shots, errors, off)


if __name__ == "__main__":
    sys.exit(main())
