"""Fixes to circuit-tracer's frontend so that text from graph and feature files stays text.

circuit-tracer 0.5.0 writes some texts it reads from graph files into the page with d3's
``.html(...)``: the node tooltip (a node's clerp, an embedding node's prompt token, a
supernode's name), the feature header (its ``vis_link`` inside an ``href="..."``, its label)
and the "failed to load" line of the feature examples. A graph file holding
``<img src=x onerror=...>`` therefore runs script in the viewer. Each fix below replaces
one such call with ``.text(...)`` or with elements built by d3, and drops ``vis_link``s
that are not http(s) (``javascript:``). One more fix makes the page show the supernodes a
graph file holds in ``qParams.supernodes`` (upstream always replaced them with the URL's,
an empty list when the URL has none), and one gives dagre integer edge weights so the
subgraph of a real graph's supernodes lays out. ``patches/circuit-tracer/`` offers the same
changes upstream.

``apply_fixes`` edits a copy of the frontend (``assets.build_frontend``). It refuses to
build if a piece of upstream source it replaces is not there exactly once: a changed
upstream must be looked at again, not served half-fixed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..core.errors import AssetError


@dataclass(frozen=True)
class SourceFix:
    """One exact replacement in one file of circuit-tracer's frontend."""

    path: str
    """File, relative to the frontend directory."""
    old: str
    """Upstream source replaced; must occur exactly once."""
    new: str


FIXES = (
    # The link graph's tooltip. Both tooltip functions now fill it through fillTooltip.
    SourceFix(
        "attribution_graph/util-cg.js",
        r"""    let tooltipHtml = !ev.metaKey ? (d.ppClerp || `F#${d.feature}`) : Object.keys(d)
      .filter(str => typeof d[str] != 'object' && typeof d[str] != 'function' && !keysToSkip.has(str))
      .map(str => {
        var val = d[str]
        if (typeof val == 'number' && !Number.isInteger(val)) val = val.toFixed(6)
        return `<div>${str}: <b>${val}</b></div>`
      })
      .join('')

    tooltipSel
      .style('left', left +'px')
      .style('top', top + 'px')
      .html(tooltipHtml)
      .classed('tooltip-hidden', false)
  }
""",
        r"""    tooltipSel
      .style('left', left +'px')
      .style('top', top + 'px')
      .call(fillTooltip, ev, d, d.ppClerp || `F#${d.feature}`)
      .classed('tooltip-hidden', false)
  }

  // A node's fields come from the graph file: write them as text, never parse them as HTML.
  function fillTooltip(tooltipSel, ev, d, label) {
    if (!ev.metaKey) return tooltipSel.text(label)
    tooltipSel.html('')
    Object.keys(d)
      .filter(str => typeof d[str] != 'object' && typeof d[str] != 'function' && !keysToSkip.has(str))
      .forEach(str => {
        var val = d[str]
        if (typeof val == 'number' && !Number.isInteger(val)) val = val.toFixed(6)
        tooltipSel.append('div').text(`${str}: `).append('b').text(val)
      })
  }
""",
    ),
    # The feature scatter's tooltip.
    SourceFix(
        "attribution_graph/util-cg.js",
        r"""      .on('mouseover.tt', (ev, d) => {
        var tooltipHtml = !ev.metaKey ? d.ppClerp : Object.keys(d)
          .filter(str => typeof d[str] != 'object' && typeof d[str] != 'function' && !keysToSkip.has(str))
          .map(str => {
            var val = d[str]
            if (typeof val == 'number' && !Number.isInteger(val)) val = val.toFixed(6)
            return `<div>${str}: <b>${val}</b></div>`
          })
          .join('')

        d3.select('.tooltip').html(tooltipHtml)
      })
""",
        r"""      .on('mouseover.tt', (ev, d) => d3.select('.tooltip').call(fillTooltip, ev, d, d.ppClerp))
""",
    ),
    # The feature header: label, link and activation as elements and text.
    SourceFix(
        "attribution_graph/init-cg-feature-detail.js",
        r"""      const featureTitleSel = headerTopRowSel.append('div.feature-title')
        .html(`Feature&nbsp;<a style="color: inherit;" href="${d.url}" target="_blank">${label}</a> <span style="font-size: 0.9em; color: #777;">Act: ${actText}</span>`)
""",
        r"""      // The label and the link (vis_link) come from the graph file: text and an attribute,
      // and the link only if it goes to http(s) (not javascript:).
      var href = null
      try { if (['http:', 'https:'].includes(new URL(d.url, location.href).protocol)) href = d.url } catch {}
      const featureTitleSel = headerTopRowSel.append('div.feature-title').text('Feature\u00a0')
      featureTitleSel.append('a').st({color: 'inherit'}).at({href, target: '_blank'}).text(label)
      featureTitleSel.node().append(' ')
      featureTitleSel.append('span').st({fontSize: '0.9em', color: '#777'}).text(`Act: ${actText}`)
""",
    ),
    SourceFix(
        "attribution_graph/init-cg-feature-detail.js",
        r"""      headerSel.html(`<b>${label}</b>`)
""",
        r"""      headerSel.html('').append('b').text(label)
""",
    ),
    SourceFix(
        "feature_examples/init-feature-examples-list.js",
        r"""return sel.html(`Feature ${visState.feature.featureIndex} failed to load`)""",
        r"""return sel.text(`Feature ${visState.feature.featureIndex} failed to load`)""",
    ),
    # Not a text fix: the graph file's own supernodes. ``[]`` is truthy, so upstream
    # replaced qParams.supernodes with an empty list whenever the URL had none.
    SourceFix(
        "attribution_graph/init-cg.js",
        r"""  let urlSupernodes = [];
""",
        r"""  // null when the URL has none: [] is truthy and would hide the graph file's qParams.supernodes.
  let urlSupernodes = null;
""",
    ),
    # Not a text fix either: dagre's network-simplex ranker fails ("Cannot read properties of
    # undefined (reading 'v')") on some graphs with fractional edge weights, which upstream
    # passes as |pct input|. The demo's SmolLM2 graphs with their supernodes hit it, and the
    # subgraph then never draws. Integer weights (per mille; edges below 3 are skipped anyway)
    # keep the ranking preference and lay out.
    SourceFix(
        "attribution_graph/init-cg-subgraph.js",
        r"""        g.setEdge(d.source.nodeId, d.target.nodeId, {width: 1, height: 1, labelpos: 'c', weight: Math.abs(d.weight)})
""",
        r"""        // Integer weights: dagre's network simplex can fail on fractional ones.
        g.setEdge(d.source.nodeId, d.target.nodeId, {width: 1, height: 1, labelpos: 'c', weight: Math.round(Math.abs(d.weight) * 1000)})
""",
    ),
)


def apply_fixes(frontend: Path) -> None:
    """Apply ``FIXES`` to the copy of circuit-tracer's frontend in ``frontend``."""
    for fix in FIXES:
        path = Path(frontend) / fix.path
        src = path.read_text()
        found = src.count(fix.old)
        if found != 1:
            first = fix.old.strip().splitlines()[0]
            raise AssetError(
                f"circuit-tracer's {fix.path} has changed: the code the viewer rewrites to show "
                f"graph text as text occurs {found} times, not once: {first}"
            )
        path.write_text(src.replace(fix.old, fix.new))
