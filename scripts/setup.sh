#!/usr/bin/env bash
# Set up alignlab in ./.venv. Idempotent: re-running only checks what is already installed.
# torch is installed first and pinned (constraints.txt) so pip never swaps in a multi-GB CUDA build
# on a CPU-only machine; on a GPU machine, install your CUDA build of torch first and it is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
pip() {  # quiet install; hide only the harmless notes about this machine's absent local indexes
  .venv/bin/python -m pip install --quiet --disable-pip-version-check "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }
  return "${PIPESTATUS[0]}"
}
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  pip -c constraints.txt torch==2.13.0
fi
pip -c constraints.txt -e ".[dev]"
.venv/bin/python -c "import alignlab, torch, transformers, trl; print(f'alignlab {alignlab.__version__} ready: torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}')"
