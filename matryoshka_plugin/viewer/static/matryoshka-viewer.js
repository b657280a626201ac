// Matryoshka additions to circuit-tracer's graph viewer: a prefix-length selector and a
// coarse-to-fine decomposition panel. Loaded after circuit-tracer's scripts and before
// its inline script defines window.init, so it wraps init and initCg without editing them.
// Every text from a graph, decomposition or feature file goes in with .text(), never .html().
(function () {
  var MV = window.matryoshkaViewer = {graphs: [], renders: 0, lastRendered: null, decomp: {}, notice: ''}

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
  function graphData(slug) { return util.getFile(`./graph_data/${slug}.json`) }
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
    return realInit.apply(this, arguments)
  }

  var realInitCg = window.initCg
  window.initCg = async function (sel, slug) {
    var result = await realInitCg.apply(this, arguments)
    MV.renders += 1
    MV.lastRendered = slug
    renderBar()
    renderDecomposition()
    return result
  }

  var realSet = util.params.set
  util.params.set = function (key, value) {
    realSet(key, value)
    if (key === 'clickedId') renderDecomposition()
  }

  // -- prefix selector -------------------------------------------------------------------
  function ensureBar() {
    if (document.querySelector('.mv-bar')) return
    var bar = d3.select('body').insert('div', '.cg').attr('class', 'mv-bar')
    var row = bar.append('div').attr('class', 'mv-row')
    row.append('span').attr('class', 'mv-label').text('Matryoshka prefix length P:')
    row.append('span').attr('class', 'mv-prefixes')
    row.append('span').attr('class', 'mv-info')
    bar.append('div').attr('class', 'mv-notice')
    bar.append('div').attr('class', 'mv-decomp')
  }

  function renderBar() {
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
  }

  // Switch to another graph of the same prompt; pins, supernodes and the selected node
  // carry over where the same node (layer, latent, position) exists in the new graph.
  async function switchTo(slug, select) {
    var data = await graphData(slug)
    var ids = new Set(data.nodes.map(d => d.node_id))
    var pinned = (util.params.get('pinnedIds') || '').split(',').filter(id => id && ids.has(id))
    var supernodes = []
    try { supernodes = JSON.parse(util.params.get('supernodes') || '[]') } catch (e) { supernodes = [] }
    supernodes = supernodes
      .map(sn => [sn[0], ...sn.slice(1).filter(id => ids.has(id))])
      .filter(sn => sn.length > 1)
    var clicked = select || util.params.get('clickedId') || window.visState.clickedId
    if (!clicked || !ids.has(clicked)) clicked = undefined

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
    var data = await graphData(slug)
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
    var data = await graphData(target.slug)
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
    var clicked = util.params.get('clickedId') || window.visState?.clickedId
    var id = parseNodeId(clicked)
    var data = g && await graphData(slug)
    var node = data && data.nodes.find(n => n.node_id === clicked)
    if (!g || g.prefix_len == null || !id || !node || node.feature_type !== 'cross layer transcoder') {
      panel.html('').append('div').attr('class', 'mv-hint')
        .text(g && g.prefix_len != null ? 'Click a feature node to see the latents that refine it.' : '')
      return
    }
    var dec = await decompositionFor(slug)
    if (currentSlug() !== slug || (util.params.get('clickedId') || window.visState?.clickedId) !== clicked) return
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
})()
