// Matryoshka additions to circuit-tracer's graph viewer: a prefix-length selector, a
// coarse-to-fine decomposition panel, "Group by parent" (a fine graph's supernodes collapsed
// into their coarse parents, from the <slug>.hierarchy.json sidecar), a compare view of two
// prefix lengths and, with a server started with --model/--transcoder_set, graphs on demand.
// Loaded after circuit-tracer's scripts and before its inline script defines window.init, so
// it wraps init, initCg and util.getFile without editing them.
// Every text from a graph, decomposition or feature file goes in with .text(), never .html().
(function () {
  var MV = window.matryoshkaViewer = {graphs: [], renders: 0, lastRendered: null, decomp: {}, notice: '',
                                      raw: {}, hier: {}, compareOpen: false, compute: null}

  function graphEntry(slug) { return MV.graphs.find(g => g.slug === slug) }
  function baseSlug(g) {
    var p = g.prefix_len
    return p != null && g.slug.endsWith('-p' + p) ? g.slug.slice(0, -('-p' + p).length) : g.slug
  }
  function siblings(g) {
    return MV.graphs.filter(h => h.prefix_len != null && baseSlug(h) === baseSlug(g) && h.prompt === g.prompt)
      .sort((a, b) => a.prefix_len - b.prefix_len)
  }
  function currentSlug() { return window.visState?.slug }
  // The graph file as written, never handed to circuit-tracer (whose formatData mutates it).
  function rawGraph(slug) {
    if (!MV.raw[slug]) MV.raw[slug] = fetch(`./graph_data/${slug}.json`).then(r => r.json())
    return MV.raw[slug]
  }
  // The sidecar of part 1: {prefix_len, parent_prefix_len, parents: {node_id: latent}, scores}.
  // The server answers {parents: {}, missing: true} for a graph without one.
  function hierarchy(slug) {
    if (!MV.hier[slug]) MV.hier[slug] = fetch(`./graph_data/${slug}.hierarchy.json`).then(r => r.json())
    return MV.hier[slug]
  }
  function isGrouped() { return util.params.get('mvGroup') === '1' }
  function decompUrl(scan) { return scan.replace(/features$/, 'decomposition.json') }
  function parseNodeId(id) {
    var m = /^(\d+)_(\d+)_(\d+)$/.exec(id || '')
    return m ? {layer: +m[1], feature: +m[2], pos: +m[3]} : null
  }

  // -- wrap circuit-tracer's entry points ------------------------------------------------
  var realInit
  Object.defineProperty(window, 'init', {
    configurable: true,
    get() { return realInit && wrappedInit },
    set(fn) { realInit = fn },
  })
  async function wrappedInit() {
    // Set before the first fetch: util.getFile sends ./data/ requests on localhost to a
    // CDN unless the page says it is served locally (circuit-tracer's init sets it later).
    window.isLocalServing = true
    MV.graphs = (await util.getFile('./data/graph-metadata.json', false)).graphs
    ensureBar()
    await ensureCompute()
    // An empty directory (graphs on demand from scratch): circuit-tracer's init needs a graph.
    if (!MV.graphs.length) return renderBar()
    return realInit.apply(this, arguments)
  }

  // With "Group by parent" on, circuit-tracer is handed the grouped graph instead of the file.
  var realGetFile = util.getFile
  util.getFile = async function (path) {
    var m = /^\.\/graph_data\/(.+)\.json$/.exec(path)
    if (m && isGrouped()) {
      var v = await view(m[1], true)
      if (v.grouped) return v.data
    }
    return realGetFile.apply(this, arguments)
  }

  var realInitCg = window.initCg
  window.initCg = async function (sel, slug) {
    var result = await realInitCg.apply(this, arguments)
    MV.renders += 1
    MV.lastRendered = slug
    await renderBar()
    renderDecomposition()
    return result
  }

  var realSet = util.params.set
  util.params.set = function (key, value) {
    realSet(key, value)
    if (key === 'clickedId') renderDecomposition()
  }

  // -- group by parent -------------------------------------------------------------------
  function cantor(a, b) { return (a + b) * (a + b + 1) / 2 + b }

  // The fine graph with each supernode collapsed into its coarse parent: every node with a
  // parent in the sidecar becomes the node (layer, parent latent, position), merged with the
  // parent's own node when the graph has it. Links are rerouted and parallel ones summed;
  // links inside a collapsed node are dropped. The file itself is never changed.
  function groupGraph(raw, hier) {
    var map = {}
    Object.entries(hier.parents || {}).forEach(([id, parent]) => {
      var p = parseNodeId(id)
      if (p) map[id] = `${p.layer}_${parent}_${p.pos}`
    })
    var byId = Object.fromEntries(raw.nodes.map(n => [n.node_id, n]))
    var kids = {}
    raw.nodes.forEach(n => { var g = map[n.node_id]; if (g) (kids[g] = kids[g] || []).push(n) })
    var names = {}
    ;(raw.qParams?.supernodes || []).forEach(([name, ...ids]) => ids.forEach(id => { if (map[id]) names[map[id]] = name }))
    var nodes = [], members = {}, seen = new Set()
    raw.nodes.forEach(n => {
      var gid = map[n.node_id] || n.node_id
      if (seen.has(gid)) return
      seen.add(gid)
      if (!kids[gid]) return nodes.push({...n})
      var parent = byId[gid], p = parseNodeId(gid), children = kids[gid]
      var all = parent ? [parent, ...children] : children
      var infl = all.map(m => m.influence).filter(x => x != null)
      members[gid] = [gid, ...children.map(c => c.node_id)]
      var label = (names[gid] ? names[gid] + ': ' : '') +
        `${p.layer}/${p.feature} at P=${hier.parent_prefix_len ?? '?'} ⊃ ` + children.map(c => `${p.layer}/${parseNodeId(c.node_id).feature}`).join(', ')
      nodes.push({
        ...(parent || children[0]), node_id: gid, jsNodeId: gid, feature: parent ? parent.feature : cantor(p.layer, p.feature),
        influence: infl.length ? Math.min(...infl) : null,
        activation: parent ? parent.activation : Math.max(...children.map(c => c.activation ?? 0)),
        clerp: label, vis_link: parent?.vis_link,
      })
    })
    var links = new Map()
    raw.links.forEach(l => {
      var s = map[l.source] || l.source, t = map[l.target] || l.target
      if (s === t) return
      var k = s + ' ' + t, have = links.get(k)
      if (have) have.weight += l.weight
      else links.set(k, {...l, source: s, target: t})
    })
    var qParams = {...(raw.qParams || {})}
    delete qParams.supernodes  // their members are collapsed
    // The file's pins (the plugin pins every node with a parent) would name nodes this view
    // no longer has, and the subgraph would be empty: pin their collapsed nodes instead.
    var filePins = qParams.pinnedIds?.split ? qParams.pinnedIds.split(',') : (qParams.pinnedIds || [])
    qParams.pinnedIds = [...new Set(filePins.filter(id => id).map(id => map[id] || id))]
    return {data: {...raw, metadata: {...raw.metadata}, qParams, nodes, links: [...links.values()]}, map, members}
  }
  MV.groupGraph = groupGraph

  // A view of a graph: the file, or (grouped and with a sidecar that has parents) grouped.
  async function view(slug, grouped) {
    var raw = await rawGraph(slug)
    var hier = grouped ? await hierarchy(slug) : null
    if (hier && Object.keys(hier.parents || {}).length) {
      var g = groupGraph(raw, hier)
      return {...g, grouped: true, ids: new Set(g.data.nodes.map(n => n.node_id))}
    }
    return {data: raw, map: {}, members: {}, grouped: false, ids: new Set(raw.nodes.map(n => n.node_id))}
  }

  function currentClicked() { return util.params.get('clickedId') || window.visState?.clickedId }

  // -- prefix selector -------------------------------------------------------------------
  function ensureBar() {
    if (document.querySelector('.mv-bar')) return
    var bar = d3.select('body').insert('div', '.cg').attr('class', 'mv-bar')
    var row = bar.append('div').attr('class', 'mv-row')
    row.append('span').attr('class', 'mv-label').text('Matryoshka prefix length P:')
    row.append('span').attr('class', 'mv-prefixes')
    row.append('span').attr('class', 'mv-info')
    var tools = bar.append('div').attr('class', 'mv-row mv-tools')
    var group = tools.append('label').attr('class', 'mv-group')
    group.append('input').attr('type', 'checkbox').attr('class', 'mv-group-box')
      .on('change', function () { MV.notice = ''; switchTo(currentSlug(), undefined, this.checked) })
    group.append('span').text(' Group by parent')
    tools.append('span').attr('class', 'mv-group-info')
    tools.append('button').attr('class', 'mv-compare-toggle')
      .on('click', () => { MV.compareOpen = !MV.compareOpen; renderBar() })
    bar.append('div').attr('class', 'mv-notice')
    bar.append('div').attr('class', 'mv-compare')
    bar.append('div').attr('class', 'mv-decomp')
  }

  async function renderBar() {
    var g = graphEntry(currentSlug())
    var bar = d3.select('.mv-bar')
    var sibs = g ? siblings(g) : []
    bar.classed('mv-hidden', sibs.length < 2)
    var buttons = bar.select('.mv-prefixes').selectAll('button').data(sibs, d => d.slug)
    buttons.exit().remove()
    buttons.enter().append('button').attr('class', 'mv-prefix')
      .merge(buttons)
      .attr('data-p', d => d.prefix_len)
      .classed('active', d => d.slug === g.slug)
      .text(d => d.prefix_len + (d.width && d.prefix_len === d.width ? ' (full)' : ''))
      .on('click', (ev, d) => { MV.notice = ''; switchTo(d.slug) })
    var info = g && g.prefix_len != null
      ? `width ${g.width ?? '?'}` + (g.nested_sizes ? `, nested sizes ${g.nested_sizes.join(', ')}` : '') +
        (g.replacement_score != null ? ` · replacement ${(+g.replacement_score).toFixed(3)}, completeness ${(+g.completeness_score).toFixed(3)}` : '')
      : ''
    bar.select('.mv-info').text(info)
    bar.select('.mv-notice').text(MV.notice)
    bar.select('.mv-tools').classed('mv-off', !g)
    if (!g) return
    var slug = g.slug, hier = await hierarchy(slug)
    var v = await view(slug, isGrouped())
    if (currentSlug() !== slug) return
    var n = Object.keys(hier.parents || {}).length
    bar.select('.mv-group-box').property('checked', isGrouped()).property('disabled', !n && !isGrouped())
    var nGroups = Object.keys(v.members).length
    bar.select('.mv-group-info').text(!n
      ? 'no coarser level in this graph: nothing to group'
      : v.grouped
        ? `${n} fine nodes collapsed into ${nGroups} coarse parents (P=${hier.parent_prefix_len})`
        : `${n} fine nodes have a parent at P=${hier.parent_prefix_len}`)
    var coarse = n && sibs.find(h => h.prefix_len === hier.parent_prefix_len)
    bar.select('.mv-compare-toggle').classed('mv-off', !coarse)
      .text(MV.compareOpen ? 'Hide comparison' : `Compare P=${hier.parent_prefix_len} → P=${g.prefix_len}`)
    var panel = bar.select('.mv-compare').html('')
    if (coarse && MV.compareOpen) renderCompare(panel, coarse, g, hier)
  }

  // -- compare two prefix lengths ----------------------------------------------------------
  // A node's influence here: the summed |weight| of its outgoing links in the graph file.
  function outInfluence(raw) {
    var out = {}
    raw.links.forEach(l => { out[l.source] = (out[l.source] || 0) + Math.abs(l.weight) })
    return out
  }
  // Share of the logit nodes' direct input (|weight|) that comes from error nodes.
  function logitErrorShare(raw) {
    var kind = Object.fromEntries(raw.nodes.map(n => [n.node_id, n.feature_type]))
    var err = 0, all = 0
    raw.links.forEach(l => {
      if (kind[l.target] !== 'logit') return
      all += Math.abs(l.weight)
      if ((kind[l.source] || '').includes('error')) err += Math.abs(l.weight)
    })
    return all ? err / all : null
  }
  // For the fine graph's sidecar: each coarse node (layer, parent latent, position) that split,
  // the fine nodes it split into, and the share of the group's influence at the fine P that
  // the children carry, i.e. that sits in the error nodes at the coarse P (where they are zeroed).
  function compareGraphs(coarseRaw, fineRaw, hier) {
    var out = outInfluence(fineRaw)
    var inCoarse = new Set(coarseRaw.nodes.map(n => n.node_id))
    var inFine = new Set(fineRaw.nodes.map(n => n.node_id))
    var groups = {}
    Object.entries(hier.parents || {}).forEach(([id, parent]) => {
      var p = parseNodeId(id)
      if (!p || !inFine.has(id)) return
      var gid = `${p.layer}_${parent}_${p.pos}`
      ;(groups[gid] = groups[gid] || []).push(id)
    })
    var rows = Object.entries(groups).map(([gid, kids]) => {
      kids.sort()
      var kidInfl = kids.reduce((a, id) => a + (out[id] || 0), 0)
      var total = kidInfl + (inFine.has(gid) ? out[gid] || 0 : 0)
      return {coarse: gid, inCoarse: inCoarse.has(gid), inFine: inFine.has(gid), fine: kids,
              share: total ? kidInfl / total : null, influence: total}
    })
    rows.sort((a, b) => b.influence - a.influence || (a.coarse < b.coarse ? -1 : 1))
    return {rows, logitError: {coarse: logitErrorShare(coarseRaw), fine: logitErrorShare(fineRaw)}}
  }
  MV.compareGraphs = compareGraphs

  function pct(x) { return x == null ? '–' : (100 * x).toFixed(1) + '%' }
  function nodeLabel(id) { var p = parseNodeId(id); return `${p.layer}/${p.feature}@${p.pos}` }

  async function renderCompare(panel, coarse, fine, hier) {
    var [cRaw, fRaw] = await Promise.all([rawGraph(coarse.slug), rawGraph(fine.slug)])
    if (currentSlug() !== fine.slug) return
    var cmp = compareGraphs(cRaw, fRaw, hier)
    panel.append('div').attr('class', 'mv-decomp-title')
      .text(`P=${coarse.prefix_len} → P=${fine.prefix_len}: which coarse node split into which fine nodes`)
    panel.append('div').attr('class', 'mv-hint mv-compare-summary')
      .text(`Error nodes' share of the logits' direct input: ${pct(cmp.logitError.coarse)} at P=${coarse.prefix_len}, ` +
            `${pct(cmp.logitError.fine)} at P=${fine.prefix_len}.`)
    if (!cmp.rows.length) return panel.append('div').attr('class', 'mv-hint').text('No node of this graph has a coarse parent.')
    var t = panel.append('table').attr('class', 'mv-compare-table')
    t.append('tr').selectAll('th')
      .data([`coarse node (P=${coarse.prefix_len})`, `fine nodes (P=${fine.prefix_len})`, `moved into error nodes at P=${coarse.prefix_len}`])
      .enter().append('th').text(d => d)
    var rows = t.selectAll('tr.mv-split').data(cmp.rows).enter().append('tr').attr('class', 'mv-split')
      .attr('data-coarse', d => d.coarse)
    rows.append('td').attr('class', 'mv-coarse')
      .text(d => nodeLabel(d.coarse) + (d.inCoarse ? '' : ' (not in the graph)'))
    var cells = rows.append('td').attr('class', 'mv-fine')
    cells.selectAll('span').data(d => (d.inFine ? [d.coarse] : []).concat(d.fine)).enter().append('span')
      .attr('class', 'mv-fine-node').attr('data-node', id => id).text(id => nodeLabel(id))
      .on('click', (ev, id) => { MV.notice = ''; switchTo(fine.slug, id, false) })
    rows.append('td').attr('class', 'mv-share').text(d => pct(d.share))
  }

  // Switch to another graph of the same prompt, or to the same graph grouped or not
  // (``group``, default: as now). Pins, supernodes and the selected node carry over where
  // the same node (layer, latent, position) is in the new view: a collapsed node stands for
  // its parent and children, and a node with a parent is found in its collapsed node.
  async function switchTo(slug, select, group) {
    group = group ?? isGrouped()
    var from = currentSlug()
    var source = from ? await view(from, isGrouped()) : null
    var target = await view(slug, group)
    function translate(ids) {
      var out = ids.flatMap(id => source?.members[id] || [id])
        .map(id => target.map[id] || id)
        .filter(id => target.ids.has(id))
      return [...new Set(out)]
    }
    var pinned = translate((util.params.get('pinnedIds') || '').split(',').filter(id => id))
    var supernodes = []
    try { supernodes = JSON.parse(util.params.get('supernodes') || '[]') } catch (e) { supernodes = [] }
    supernodes = supernodes
      .map(sn => [sn[0], ...translate(sn.slice(1))])
      .filter(sn => sn.length > 1)
    var clicked = translate([select || currentClicked()].filter(id => id))[0]

    realSet('mvGroup', group ? '1' : null)
    realSet('pinnedIds', pinned.length ? pinned.join(',') : null)
    realSet('supernodes', supernodes.length ? JSON.stringify(supernodes) : null)
    realSet('clickedId', clicked ?? null)
    realSet('slug', slug)
    window.visState.slug = slug
    window.visState.clickedId = clicked
    await window.init()
  }
  MV.switchTo = switchTo

  // -- decomposition panel ---------------------------------------------------------------
  async function decompositionFor(slug) {
    var data = await rawGraph(slug)
    var url = decompUrl(data.metadata.scan)
    if (!MV.decomp[url]) MV.decomp[url] = util.getFile(url)
    return MV.decomp[url]
  }

  async function moveTo(layer, feature, appearsAt, fromPos) {
    var g = graphEntry(currentSlug())
    var target = siblings(g).find(h => h.prefix_len >= appearsAt)
    if (!target) {
      MV.notice = `No graph at a prefix length that contains latent ${layer}/${feature} (P ≥ ${appearsAt}).`
      return renderBar()
    }
    var data = await rawGraph(target.slug)
    var nodes = data.nodes.filter(n => { var p = parseNodeId(n.node_id); return p && n.feature_type === 'cross layer transcoder' && p.layer === layer && p.feature === feature })
    nodes.sort((a, b) => Math.abs(a.ctx_idx - fromPos) - Math.abs(b.ctx_idx - fromPos))
    MV.notice = nodes.length ? '' : `Latent ${layer}/${feature} is not in the P=${target.prefix_len} graph for this prompt (inactive or pruned).`
    await switchTo(target.slug, nodes[0]?.node_id)
  }
  MV.moveTo = moveTo

  async function renderDecomposition() {
    var panel = d3.select('.mv-decomp')
    if (panel.empty()) return
    var slug = currentSlug()
    var g = graphEntry(slug)
    var clicked = currentClicked()
    var id = parseNodeId(clicked)
    var data = g && (await view(slug, isGrouped())).data
    var node = data && data.nodes.find(n => n.node_id === clicked)
    if (!g || g.prefix_len == null || !id || !node || node.feature_type !== 'cross layer transcoder') {
      panel.html('').append('div').attr('class', 'mv-hint')
        .text(g && g.prefix_len != null ? 'Click a feature node to see the latents that refine it.' : '')
      return
    }
    var dec = await decompositionFor(slug)
    if (currentSlug() !== slug || currentClicked() !== clicked) return
    var entry = dec.features?.[`${id.layer}_${id.feature}`]
    panel.html('')
    var head = panel.append('div').attr('class', 'mv-decomp-title')
      .text(`Latent ${id.layer}/${id.feature} at P=${g.prefix_len}` + (entry ? ` — first present at P=${entry.appears_at}` : ''))
    if (!entry) {
      panel.append('div').attr('class', 'mv-hint').text(dec.missing
        ? 'No decomposition built for this graph directory (python -m matryoshka_plugin.viewer build).'
        : 'No decomposition stored for this latent.')
      return
    }
    var cols = panel.append('div').attr('class', 'mv-cols')
    table(cols, 'mv-children', `Refined beyond P=${g.prefix_len} by`, entry.children[String(g.prefix_len)] || [],
      'No latents beyond this prefix length.')
    table(cols, 'mv-parents', 'Coarse parent', entry.parents.slice(0, 3), 'Coarsest level: no parent.')

    function table(sel, cls, title, links, empty) {
      var box = sel.append('div').attr('class', 'mv-box ' + cls)
      box.append('div').attr('class', 'mv-box-title').text(title)
      if (!links.length) return box.append('div').attr('class', 'mv-hint').text(empty)
      var t = box.append('table')
      t.append('tr').selectAll('th').data(['latent', 'cosine', 'co-activation', 'appears at'])
        .enter().append('th').text(d => d)
      var rows = t.selectAll('tr.mv-link').data(links).enter().append('tr').attr('class', 'mv-link')
        .attr('data-feature', d => d.feature)
        .on('click', (ev, d) => moveTo(id.layer, d.feature, d.appears_at, id.pos))
      rows.append('td').text(d => `${id.layer}/${d.feature}`)
      rows.append('td').text(d => d.cosine.toFixed(3))
      rows.append('td').text(d => d.coactivation == null ? '–' : d.coactivation.toFixed(3))
      rows.append('td').text(d => `P=${d.appears_at}`)
    }
  }

  // -- graphs on demand --------------------------------------------------------------------
  async function ensureCompute() {
    if (MV.compute) return
    MV.compute = await (await fetch('./compute/status', {cache: 'no-store'})).json()
    if (!MV.compute.available) return
    var box = d3.select('.mv-bar').insert('div', '.mv-notice').attr('class', 'mv-compute')
    box.append('span').attr('class', 'mv-label').text('New prompt:')
    box.append('input').attr('class', 'mv-prompt').attr('type', 'text').attr('size', 48)
      .attr('placeholder', 'text to attribute')
    box.append('span').text('at P =')
    box.append('input').attr('class', 'mv-prompt-prefixes').attr('type', 'text').attr('size', 16)
      .property('value', MV.compute.prefix_lens.join(' '))
    box.append('button').attr('class', 'mv-compute-go').text('Compute graphs').on('click', computeGraphs)
    box.append('progress').attr('class', 'mv-progress mv-off')
    box.append('span').attr('class', 'mv-compute-status')
    d3.select('.mv-bar').insert('div', '.mv-notice').attr('class', 'mv-compute-msg')
    if (!MV.graphs.length) d3.select('.mv-compute-status').text('No graphs in this directory yet: compute some.')
  }

  function computeMessage(text, isError) {
    d3.select('.mv-compute-msg').classed('mv-error', !!isError).text(text)
  }

  async function computeGraphs() {
    var prompt = d3.select('.mv-prompt').property('value')
    var words = d3.select('.mv-prompt-prefixes').property('value').split(/[\s,]+/).filter(w => w)
    var bad = words.find(w => !/^\d+$/.test(w))
    if (bad !== undefined) return computeMessage(`prefix length ${JSON.stringify(bad)} is not a whole number; give numbers like ${MV.compute.prefix_lens.join(' ')}`, true)
    computeMessage('')
    var go = d3.select('.mv-compute-go').property('disabled', true)
    try {
      var res = await fetch('./compute/start', {method: 'POST', headers: {'Content-Type': 'application/json'},
                                                body: JSON.stringify({prompt, prefix_lens: words.map(Number)})})
      var body = await res.json()
      if (!res.ok) return computeMessage(body.error, true)
      var job = await followJob(body.job.id)
      if (job.state !== 'done') return computeMessage(job.error, true)
      job.slugs.forEach(slug => {
        delete MV.raw[slug]; delete MV.hier[slug]
        delete (window.__datacache || {})[`./graph_data/${slug}.json`]
      })
      computeMessage(`Computed ${job.slugs.length} graphs for “${job.prompt}”.`)
      MV.graphs = (await util.getFile('./data/graph-metadata.json', false)).graphs
      MV.notice = ''
      if (!window.visState) {  // the directory was empty: circuit-tracer's first init
        util.params.set('slug', job.slugs[0])
        return realInit()
      }
      await switchTo(job.slugs[0])
    } finally {
      go.property('disabled', false)
    }
  }

  async function followJob(id) {
    var bar = d3.select('.mv-progress').classed('mv-off', false)
    var status = d3.select('.mv-compute-status')
    while (true) {
      var job = (await (await fetch('./compute/status', {cache: 'no-store'})).json()).job
      if (job && job.id === id) {
        bar.attr('max', job.total).attr('value', job.done)
        status.text(job.state === 'running'
          ? (job.current != null ? `computing P=${job.current} (${job.done + 1} of ${job.total})…` : 'writing graph files…')
          : '')
        if (job.state !== 'running') { bar.classed('mv-off', true); return job }
      }
      await new Promise(r => setTimeout(r, 250))
    }
  }
})()
