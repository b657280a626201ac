#!/usr/bin/env bash
# CLT training path 2: run tests/test_clt_training_fork.py against EleutherAI clt-training.
#
#   integration_tests/clt_training.sh /path/to/clt-training     # a checkout, or a bare git repo
#   CLT_TRAINING_SRC=/path/to/clt-training integration_tests/clt_training.sh
#
# clt-training is not on PyPI and installs as `eai-sparsify`/`sparsify`, replacing the
# PyPI package, so it goes into its own venv (CLT_VENV, default .venv-clt, git-ignored),
# with --no-deps: its pyproject pins torch==2.7.1 (a multi-GB CUDA download here), and
# the plugin would otherwise pull PyPI eai-sparsify back in. Nothing from the fork is
# committed. Its Triton kernels need CUDA; without a GPU this runs the loss checks under
# Triton's interpreter (TRITON_INTERPRET=1), and Trainer.fit, whose encoder backward is
# a Triton kernel the interpreter rejects, is skipped with that reason.
#
# Environment: CLT_VENV, PYTHON (default python3.11), TORCH_SPEC (default torch==2.13.0,
# a CPU wheel; on a GPU machine give a CUDA build), TRITON_SPEC (default triton==3.9.0),
# FRESH=1 to rebuild the venv.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
SRC="${1:-${CLT_TRAINING_SRC:-}}"
VENV="${CLT_VENV:-$ROOT/.venv-clt}"
PYTHON="${PYTHON:-python3.11}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
TRITON_SPEC="${TRITON_SPEC:-triton==3.9.0}"
if [[ -z "$SRC" ]]; then
    echo "clt_training.sh: give the clt-training source (checkout or bare git repo) as the first argument or CLT_TRAINING_SRC" >&2
    exit 2
fi
if [[ ! -d "$SRC" ]]; then
    echo "clt_training.sh: $SRC is not a directory; expected a clt-training checkout or bare git repo" >&2
    exit 2
fi
step() { printf '\n== %s (%ss)\n' "$1" "$SECONDS"; }

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
if [[ -f "$SRC/pyproject.toml" ]]; then
    TREE="$SRC"
elif git -C "$SRC" rev-parse --is-bare-repository >/dev/null 2>&1; then
    step "export a work tree of $SRC (HEAD: $(git -C "$SRC" rev-parse --short HEAD))"
    TREE="$WORK/clt-training"
    mkdir -p "$TREE"
    git -C "$SRC" archive HEAD | tar -x -C "$TREE"
else
    echo "clt_training.sh: $SRC has no pyproject.toml and is not a git repository" >&2
    exit 2
fi
if [[ ! -f "$TREE/sparsify/kernels.py" ]]; then
    echo "clt_training.sh: $TREE has no sparsify/kernels.py; it is not EleutherAI clt-training" >&2
    exit 2
fi

if [[ "${FRESH:-0}" == 1 ]]; then rm -rf "$VENV"; fi
if [[ ! -x "$VENV/bin/python" ]]; then
    step "build $VENV"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/pip" install -q "$TORCH_SPEC" "$TRITON_SPEC" \
        accelerate==1.15.0 datasets==5.0.1 einops==0.8.2 natsort==8.4.0 safetensors==0.8.0 \
        schedulefree==1.4.1 simple-parsing==0.1.9 transformers==4.57.3 tqdm pyyaml numpy \
        pytest==9.2.0 hypothesis==6.170.15
fi
step "install clt-training (--no-deps) and the plugin (--no-deps, editable)"
"$VENV/bin/pip" install -q --no-deps --force-reinstall "$TREE"
"$VENV/bin/pip" install -q --no-deps -e "$ROOT"
"$VENV/bin/python" -c "
from matryoshka_plugin.adapters.installed_sparsify import detect_clt_training
v = detect_clt_training()
assert v is not None, 'the installed sparsify is not clt-training'
print('installed sparsify: clt-training', v)"

cd "$ROOT"
if "$VENV/bin/python" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    step "CUDA: every test, Trainer.fit included"
    OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" "$VENV/bin/python" -m pytest -q -rs -p no:cacheprovider \
        tests/test_clt_training_fork.py
else
    step "no CUDA: loss checks under Triton's interpreter; Trainer.fit needs CUDA and is skipped"
    TRITON_INTERPRET=1 TORCH_COMPILE_DISABLE=1 SPARSIFY_NO_COMPILE=1 \
        OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" "$VENV/bin/python" -m pytest -q -rs -p no:cacheprovider \
        tests/test_clt_training_fork.py
fi
