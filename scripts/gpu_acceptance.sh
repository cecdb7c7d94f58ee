#!/usr/bin/env bash
# GPU acceptance check for a fresh single-GPU node, before launching a 3B run (see docs/planning.md).
#
#   scripts/gpu_acceptance.sh [--wheels DIR] [--venv DIR] [--out FILE] [-- ARGS for python -m fusedit.tools.acceptance]
#   scripts/gpu_acceptance.sh --download-wheels DIR      # on a machine with internet: fill DIR for offline nodes
#
# The node's own PyTorch is used (any recent 2.x; it is never reinstalled): the check runs in a venv
# made with --system-site-packages, and every other package of requirements.lock is installed into it
# without dependencies, from DIR with --wheels (no network) or from the index otherwise. Writes one JSON
# (default output/acceptance/acceptance.json); exit code 0 when every stage passed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
WHEELS=""
VENV="$ROOT/.venv-acceptance"
OUT="$ROOT/output/acceptance/acceptance.json"
DOWNLOAD=""
PRINT=""
ARGS=()

usage() { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "error: $*" >&2; exit 2; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --wheels) WHEELS="${2:?--wheels needs a folder}"; shift 2 ;;
    --venv) VENV="${2:?--venv needs a folder}"; shift 2 ;;
    --out) OUT="${2:?--out needs a file}"; shift 2 ;;
    --download-wheels) DOWNLOAD="${2:?--download-wheels needs a folder}"; shift 2 ;;
    --print-requirements) PRINT=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; ARGS+=("$@"); break ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done

# requirements.lock without what the node brings itself: torch, torchvision, triton and the CUDA libraries
node_requirements() {
  grep -v -E '^(#|$|torch==|torchvision==|triton==|nvidia-)' "$ROOT/requirements.lock"
}

if [[ -n "$PRINT" ]]; then node_requirements; exit 0; fi

if [[ -n "$DOWNLOAD" ]]; then
  mkdir -p "$DOWNLOAD"
  node_requirements > "$DOWNLOAD/requirements.txt"
  # pip wheel, not download: a package published only as an sdist (deepspeed) is built into a wheel here
  "$PYTHON" -m pip wheel -q --no-deps -r "$DOWNLOAD/requirements.txt" -w "$DOWNLOAD"
  echo "wheels for an offline node are in $DOWNLOAD (copy it there; run with --wheels $DOWNLOAD)"
  exit 0
fi

"$PYTHON" -c 'import torch, sys; sys.exit(0 if int(torch.__version__.split(".")[0]) >= 2 else 1)' 2>/dev/null \
  || die "$PYTHON has no PyTorch 2.x; load the node's PyTorch module (or set PYTHON=...) first"
[[ -z "$WHEELS" || -d "$WHEELS" ]] || die "--wheels: folder not found: $WHEELS"

# A PyTorch that itself lives in a venv (not conda, not a system or module install) would not be seen
# by a --system-site-packages venv made from it: then its own environment is used directly.
if "$PYTHON" -c 'import sys; sys.exit(0 if sys.prefix != sys.base_prefix else 1)'; then
  VENV="$("$PYTHON" -c 'import sys; print(sys.prefix)')"
  echo "note: $PYTHON runs in the venv $VENV; installing the missing packages there (--no-deps, torch untouched)"
elif [[ ! -x "$VENV/bin/python" ]]; then
  "$PYTHON" -m venv --system-site-packages "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install -q --no-deps)
[[ -n "$WHEELS" ]] && PIP+=(--no-index --find-links "$WHEELS")
REQS="$(mktemp)"
node_requirements > "$REQS"
"${PIP[@]}" -r "$REQS"
"$VENV/bin/python" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.is_available())'

cd "$ROOT"
# this checkout is the code under test: run from it (no install of the project itself)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$VENV/bin/python" -m fusedit.tools.acceptance --out "$OUT" "${ARGS[@]}"
