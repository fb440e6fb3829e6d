#!/usr/bin/env bash
# Create one virtual environment per peer tool, beside ours (their pins differ from ours).
#   .venv-peers/llmcompressor : torch==2.13.0 first (CPU wheel), then llmcompressor
#   .venv-peers/deepspeed     : torch==2.13.0, deepspeed==0.19.6 (last release with
#                               deepspeed.compression), transformers; run with DS_ACCELERATOR=cpu
# Usage: benchmarks/setup_peers.sh [llmcompressor|deepspeed ...]   (default: both)
set -euo pipefail
PYTHON="${PYTHON:-python3}"
ROOT="${PEERS_DIR:-.venv-peers}"
TORCH="${TORCH:-torch==2.13.0}"
peers=("$@")
[ ${#peers[@]} -eq 0 ] && peers=(llmcompressor deepspeed)

make_venv() {  # name, then the packages to install after torch
  local name="$1"; shift
  local venv="$ROOT/$name"
  if [ -f "$venv/.install-stamp" ]; then echo "peer $name: ready in $venv"; return; fi
  echo "peer $name: creating $venv"
  test -x "$venv/bin/python" || "$PYTHON" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q "$TORCH"
  "$venv/bin/python" -m pip install -q "$@"
  touch "$venv/.install-stamp"
  echo "peer $name: ready in $venv"
}

for peer in "${peers[@]}"; do
  case "$peer" in
    llmcompressor) make_venv llmcompressor llmcompressor ;;
    # deepspeed's own dependencies (py-cpuinfo, ninja, ...) come with it; no ops are built on CPU.
    deepspeed) DS_BUILD_OPS=0 make_venv deepspeed "deepspeed==0.19.6" "transformers>=4.56,<6" accelerate ;;
    *) echo "unknown peer '$peer' (known: llmcompressor, deepspeed)" >&2; exit 2 ;;
  esac
done
