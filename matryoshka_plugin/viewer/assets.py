"""Offline assets for circuit-tracer's graph viewer.

circuit-tracer's ``index.html`` loads its JavaScript libraries from two CDNs. ``vendor``
fetches the same libraries as npm registry packages (``npm pack``, checked against pinned
integrity hashes) into a cache directory, never into the repository. ``build_frontend``
copies circuit-tracer's installed frontend into a cache directory, makes it write text
from graph and feature files as text (``text_only``), adds the vendored libraries and the
plugin's own scripts, and rewrites ``index.html`` so that every script URL is local.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from ..core.errors import AssetError
from . import text_only


@dataclass(frozen=True)
class NpmFile:
    """One file taken from a pinned npm registry package."""

    package: str
    """npm package name."""
    version: str
    """Exact version (circuit-tracer's index.html pins dagre and pako to these)."""
    integrity: str
    """The registry's sha512 integrity of the package tarball."""
    member: str
    """Path of the file inside the tarball."""


@dataclass(frozen=True)
class VendoredScript:
    """A script served under ``vendor/`` in place of one of index.html's CDN scripts."""

    local_name: str
    """File name under ``vendor/``."""
    replaces: str
    """Substring of the CDN script URL in circuit-tracer's index.html it stands in for."""
    sources: tuple[NpmFile, ...]
    """Package files it is made of."""
    kind: str = "plain"
    """plain: the file as is; npyjs: CommonJS exposed as ``window.npyjs``; jetpack:
    d3-jetpack's CommonJS build bound to the page's d3 (see ``_compose``)."""


D3 = NpmFile("d3", "7.9.0", "sha512-e1U46jVP+w7Iut8Jt8ri1YsPOvFpg46k+K8TpCb0P+zjCkjkPnV7WzfDJzMHy1LnA+wj5pLT1wjO901gLXeEhA==", "package/dist/d3.min.js")
JETPACK = NpmFile("d3-jetpack", "2.3.0", "sha512-P6cgpLIKudalA5sohATXeZ78fHWcmXbAyPXYNIvxi8lc6qjRaNMggx1O/tcdIBTyTM26pTMpHPJI0N1FhPIzTg==", "package/build/d3-jetpack.cjs")
COLLECTION = NpmFile("d3-collection", "1.0.7", "sha512-ii0/r5f4sjKNTfh84Di+DpztYwqKhEyUlKoPrzUFfeSkWxjW49xU2QzO9qrPrNkpdI0XJkfzvmTu8V2Zylln6A==", "package/dist/d3-collection.js")
NPYJS = NpmFile("npyjs", "1.2.0", "sha512-HrooNo+/Q7Vx/gQFaSoiveX0xVkYlQ+jOcgp2WhfGt1C8qdANeK480Sl0s2RWe0+Hf532h45BEitCX3jkddK2Q==", "package/dist/index.cjs")
DAGRE = NpmFile("dagre", "0.8.5", "sha512-/aTqmnRta7x7MCCpExk7HQL2O4owCT2h8NT//9I1OQ9vt29Pa0BzSAkR5lwFUcQ7491yVi/3CXU9jQ5o0Mn2Sw==", "package/dist/dagre.min.js")
PAKO = NpmFile("pako", "2.1.0", "sha512-w+eufiZ1WuJYgPXbV/PO3NCMEc3xqylkKHzp8bxp1uW4qaSNQUkwmLLEc3kKsfz8lpV1F8Ht3U1Cm+9Srog2ug==", "package/dist/pako.min.js")

# transformer-circuits.pub serves d3 v7 (d3.js), a d3-jetpack build (jetpack_*.js) and a
# small .npy reader exposing ``npyjs.parse`` (npy_*.js). d3-jetpack's browser builds do not
# work with a global d3 v7: the UMD global branch replaces ``window.d3`` with an empty
# object, and the "d3v7+jetpack" bundle patches a second, unused copy of d3-selection.
# So its CommonJS build is run with ``require`` bound to the page's d3 (and d3-collection,
# which its ``nestBy`` needs), and its own functions are added to ``window.d3``.
VENDORED = (
    VendoredScript("d3.min.js", "static_js/lib/d3.js", (D3,)),
    VendoredScript("d3-jetpack.js", "static_js/lib/jetpack_", (COLLECTION, JETPACK), kind="jetpack"),
    VendoredScript("npyjs.js", "static_js/lib/npy_", (NPYJS,), kind="npyjs"),
    VendoredScript("dagre.min.js", "unpkg.com/dagre@", (DAGRE,)),
    VendoredScript("pako.min.js", "unpkg.com/pako@", (PAKO,)),
)
# A live-reload client for the page authors' own dev server: nothing to stand in for.
DROPPED_SCRIPTS = ("hotserver-client-ws.js",)
PLUGIN_SCRIPTS = ("matryoshka-viewer.js",)
PLUGIN_STYLES = ("matryoshka-viewer.css",)


def _commonjs(src: str) -> str:
    return f"(function () {{ var module = {{exports: {{}}}}, exports = module.exports;\n{src}\nreturn module.exports; }})()"


def _compose(script: VendoredScript, texts: list[str]) -> str:
    if script.kind == "plain":
        return texts[0]
    if script.kind == "npyjs":
        return f"window.npyjs = {_commonjs(texts[0])};\n"
    collection, jetpack = texts
    return (
        "(function () {\n"
        f"  var collection = {_commonjs(collection)};\n"
        "  var require = function (name) { return name === 'd3-collection' ? collection : window.d3 };\n"
        f"  var jetpack = (function (require) {{ return {_commonjs(jetpack)} }})(require);\n"
        "  for (var k in collection) if (!(k in window.d3)) window.d3[k] = collection[k];\n"
        "  for (var k in jetpack) if (!(k in window.d3)) window.d3[k] = jetpack[k];\n"
        # The pub's jetpack build gives conventions() a c.drawAxis(svg = c.svg) method;
        # the npm build has only the free function drawAxis(c).
        "  var conventions = jetpack.conventions;\n"
        "  window.d3.conventions = function (c) {\n"
        "    c = conventions(c);\n"
        "    c.drawAxis = function (svg) { return jetpack.drawAxis(Object.assign(Object.create(c), {svg: svg || c.svg})) };\n"
        "    return c;\n"
        "  };\n"
        "})();\n"
    )


def cache_dir() -> Path:
    """``$MATRYOSHKA_VIEWER_CACHE``, else ``$XDG_CACHE_HOME/matryoshka_plugin/viewer``."""
    env = os.environ.get("MATRYOSHKA_VIEWER_CACHE")
    if env:
        return Path(env)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "matryoshka_plugin" / "viewer"


def vendor_dir(root: Path | None = None) -> Path:
    return (root or cache_dir()) / "vendor"


def _sha512(data: bytes) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


def _npm_pack(spec: str, dest: Path) -> Path:
    npm = shutil.which("npm")
    if npm is None:
        raise AssetError(
            "npm is not installed; it is needed once to fetch the viewer's JavaScript "
            "libraries (apt-get install -y npm), then run: python -m matryoshka_plugin.viewer vendor"
        )
    proc = subprocess.run(
        [npm, "pack", spec, "--json", "--pack-destination", str(dest)],
        capture_output=True, text=True, timeout=300,
    )
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise AssetError(f"npm pack {spec} failed: {last}")
    name = json.loads(proc.stdout)[0]["filename"]
    return dest / name


def vendored_missing(root: Path | None = None) -> list[VendoredScript]:
    d = vendor_dir(root)
    return [v for v in VENDORED if not (d / v.local_name).is_file()]


def _fetch(f: NpmFile, tmp: Path, progress) -> str:
    progress(f"npm pack {f.package}@{f.version} ({f.member})")
    tgz = _npm_pack(f"{f.package}@{f.version}", tmp)
    data = tgz.read_bytes()
    if _sha512(data) != f.integrity:
        raise AssetError(f"{f.package}@{f.version}: tarball integrity {_sha512(data)} != pinned {f.integrity}")
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        member = tar.extractfile(f.member)
        if member is None:
            raise AssetError(f"{f.package}@{f.version} has no {f.member}")
        return member.read().decode()


def vendor(root: Path | None = None, force: bool = False, progress=print) -> Path:
    """Fetch the pinned npm packages and write the viewer's library scripts; returns the dir."""
    out = vendor_dir(root)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for v in VENDORED:
            target = out / v.local_name
            if target.is_file() and not force:
                continue
            text = _compose(v, [_fetch(f, Path(tmp), progress) for f in v.sources])
            fd, part = tempfile.mkstemp(dir=out, prefix=f".{v.local_name}.")
            with os.fdopen(fd, "w") as fh:
                fh.write(text)
            os.replace(part, target)
    return out


def _upstream_frontend() -> Path:
    return Path(str(files("circuit_tracer") / "frontend" / "assets"))


def _static_dir() -> Path:
    return Path(__file__).parent / "static"


SCRIPT_RE = re.compile(r"<script src='([^']+)'></script>\n?")


def rewrite_index(html: str) -> str:
    """circuit-tracer's index.html with local script URLs and the plugin's additions."""
    def local(m: re.Match) -> str:
        url = m.group(1)
        if not url.startswith(("http://", "https://", "//")):
            return m.group(0)
        if any(url.endswith(s) for s in DROPPED_SCRIPTS):
            return ""
        for v in VENDORED:
            if v.replaces in url:
                return f"<script src='./vendor/{v.local_name}'></script>\n"
        raise AssetError(f"circuit-tracer's index.html loads {url}, which the plugin does not vendor")

    html = SCRIPT_RE.sub(local, html)
    if re.search(r"(src|href)=['\"]?(https?:)?//", html):
        raise AssetError("circuit-tracer's index.html still references a remote URL after rewriting")
    styles = "".join(f"<link rel='stylesheet' href='./matryoshka/{s}'>\n" for s in PLUGIN_STYLES)
    scripts = "".join(f"<script src='./matryoshka/{s}'></script>\n" for s in PLUGIN_SCRIPTS)
    # Plugin scripts go before the inline script that defines and calls window.init, so
    # they can wrap init before it first runs.
    marker = "<script>\nwindow.init = async function"
    if marker not in html:
        raise AssetError("circuit-tracer's index.html has changed: cannot find where window.init is defined")
    # An empty icon: otherwise the browser asks the server for /favicon.ico (a 404).
    icon = "<link rel='icon' href='data:,'>\n"
    return html.replace(marker, icon + styles + scripts + marker, 1)


def build_frontend(root: Path | None = None, auto_vendor: bool = True) -> Path:
    """A served asset dir: circuit-tracer's frontend (text-only fixes applied) + vendored
    libraries + plugin files.

    Rebuilt whenever the upstream frontend, the plugin's static files or the code that
    builds it change (the dir name is a hash of them all); returns the directory.
    """
    root = root or cache_dir()
    if vendored_missing(root):
        if not auto_vendor:
            raise AssetError("viewer libraries are not vendored; run: python -m matryoshka_plugin.viewer vendor")
        vendor(root)
    upstream = _upstream_frontend()
    h = hashlib.sha256()
    for base in (upstream, _static_dir(), vendor_dir(root)):
        for p in sorted(base.rglob("*")):
            if p.is_file() and "__pycache__" not in p.parts:
                h.update(str(p.relative_to(base)).encode())
                h.update(p.read_bytes())
    for module in (__file__, text_only.__file__):
        h.update(Path(module).read_bytes())
    out = root / f"frontend-{h.hexdigest()[:16]}"
    if (out / "index.html").is_file():
        return out
    tmp = Path(tempfile.mkdtemp(prefix=".frontend.", dir=root))
    try:
        shutil.copytree(upstream, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
        text_only.apply_fixes(tmp)
        shutil.copytree(vendor_dir(root), tmp / "vendor")
        shutil.copytree(_static_dir(), tmp / "matryoshka")
        index = tmp / "index.html"
        index.write_text(rewrite_index(index.read_text()))
        try:
            os.replace(tmp, out)
        except OSError:
            if not (out / "index.html").is_file():  # not a concurrent build of the same hash
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
