#!/usr/bin/env bash
# Integration run for patches/: fetch the pinned upstream sources from PyPI, check and
# apply every patch, install the patched packages into a separate venv, run upstream's
# CPU-capable tests plus the tests the patches add, then the parity tests (patched
# upstream vs the plugin, in two processes).
#
#   integration_tests/run.sh            # reuse cached downloads and the dependency venv
#   integration_tests/run.sh --fresh    # rebuild the dependency venv first
#
# Environment: MATRYOSHKA_UPSTREAM_CACHE (default ~/.cache/matryoshka_plugin/upstream),
# PLUGIN_PYTHON (default .venv/bin/python: the plugin's venv with stock upstream).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
CACHE="${MATRYOSHKA_UPSTREAM_CACHE:-$HOME/.cache/matryoshka_plugin/upstream}"
PLUGIN_PYTHON="${PLUGIN_PYTHON:-$ROOT/.venv/bin/python}"
TORCH_PIN="torch==2.13.0"  # a CPU wheel; an unpinned torch would pull a multi-GB CUDA build
# name on PyPI | version | sdist file stem | patch directory
UPSTREAM=(
    "eai-sparsify|1.3.3|eai_sparsify-1.3.3|sparsify"
    "circuit-tracer|0.5.0|circuit_tracer-0.5.0|circuit-tracer"
)
FRESH=0
for arg in "$@"; do
    case "$arg" in
        --fresh) FRESH=1 ;;
        *) echo "run.sh: unknown argument $arg; allowed: --fresh" >&2; exit 2 ;;
    esac
done

step() { printf '\n== %s (%ss)\n' "$1" "$SECONDS"; }
# pip's notices about the offline index mirrors that lack a package are noise here
pip_q() {
    local py="$1"; shift
    "$py" -m pip -q --disable-pip-version-check "$@" \
        2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}

[ -x "$PLUGIN_PYTHON" ] || { echo "run.sh: no plugin venv at $PLUGIN_PYTHON (run .ci/setup)" >&2; exit 2; }
mkdir -p "$CACHE/sdist"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/matryoshka-integration.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

step "1. fetch pinned sdists from PyPI (cached in $CACHE/sdist)"
for entry in "${UPSTREAM[@]}"; do
    IFS='|' read -r name version stem _ <<<"$entry"
    sdist="$CACHE/sdist/$stem.tar.gz"
    if [ ! -s "$sdist" ]; then
        pip_q "$PLUGIN_PYTHON" download --no-deps --no-binary :all: "$name==$version" \
            -d "$WORK/download"
        mv "$WORK/download/$stem.tar.gz" "$sdist"
    fi
    echo "$sdist"
    tar --no-same-owner -xzf "$sdist" -C "$WORK"
done

step "2. git apply --check, then apply every patch"
for entry in "${UPSTREAM[@]}"; do
    IFS='|' read -r name version stem patch_dir <<<"$entry"
    for patch in "$ROOT/patches/$patch_dir"/*.patch; do
        # outside any git repository, git apply works on plain files
        if ! log="$(cd "$WORK/$stem" && git apply --check --verbose "$patch" 2>&1)"; then
            echo "FAILED: patches/$patch_dir/$(basename "$patch") no longer applies to $name $version:" >&2
            # git names the file and hunk ("error: patch failed: <file>:<line>") and
            # prints the context it searched for
            echo "$log" >&2
            exit 1
        fi
        (cd "$WORK/$stem" && git apply "$patch")
        echo "applied patches/$patch_dir/$(basename "$patch")"
    done
done

step "3. install the patched packages into a separate venv"
base_python="$("$PLUGIN_PYTHON" -c 'import sys; print(sys._base_executable)')"
key="$("$base_python" -c 'import sys; print("py%d.%d" % sys.version_info[:2])')-${TORCH_PIN#torch==}-sparsify1.3.3-ct0.5.0"
VENV="$CACHE/venv-$key"
if [ "$FRESH" = 1 ]; then rm -rf "$VENV"; fi
if [ ! -f "$VENV/.complete" ]; then
    rm -rf "$VENV"
    "$base_python" -m venv "$VENV"
    echo "$TORCH_PIN" >"$VENV/constraints.txt"
    pip_q "$VENV/bin/python" install "$TORCH_PIN"
    # The stock releases bring every dependency; the patched sources replace them below.
    pip_q "$VENV/bin/python" install -c "$VENV/constraints.txt" \
        eai-sparsify==1.3.3 circuit-tracer==0.5.0 pytest hypothesis pyyaml setuptools hatchling
    touch "$VENV/.complete"
fi
PY="$VENV/bin/python"
pip_q "$PY" install --no-deps --no-build-isolation --force-reinstall \
    "$WORK/eai_sparsify-1.3.3" "$WORK/circuit_tracer-0.5.0"
"$PY" - <<'PY'
import importlib.metadata as md
from circuit_tracer.transcoder.activation_functions import PrefixTruncation  # patched in
from circuit_tracer.frontend.local_server import allowed_hosts  # patched in (0006)
from sparsify import SparseCoderConfig
assert "matryoshka" in SparseCoderConfig.__dataclass_fields__, "stock sparsify installed"
print("patched:", "eai-sparsify", md.version("eai-sparsify"), "| circuit-tracer", md.version("circuit-tracer"))
PY

step "4. upstream's own CPU-capable tests and the tests the patches add"
export SPARSIFY_DISABLE_TRITON=1
# test_decode.py / test_encode.py compare against the Triton kernels and
# test_micro_acc_steps.py / test_multiple_saes.py move their models to "cuda": CUDA only.
(cd "$WORK/eai_sparsify-1.3.3" && "$VENV/bin/pytest" -q -p no:cacheprovider tests \
    --ignore=tests/test_decode.py --ignore=tests/test_encode.py \
    --ignore=tests/test_micro_acc_steps.py --ignore=tests/test_multiple_saes.py)
# The circuit-tracer sdist ships no tests: these are the ones the patches add.
(cd "$WORK/circuit_tracer-0.5.0" && "$VENV/bin/pytest" -q -p no:cacheprovider -W ignore::UserWarning tests)

step "5. parity: patched upstream vs the plugin (two processes, safetensors in between)"
PLUGIN_PYTHON="$PLUGIN_PYTHON" PATCHED_PYTHON="$PY" \
    "$VENV/bin/pytest" -q -p no:cacheprovider -W ignore::UserWarning "$ROOT/integration_tests"

step "done"
