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
# DeepSpeed (deepspeed=zero1|zero2|zero3|zero3_offload, and the multi-process tests). Its build imports
# torch, so it is built without isolation; on a CPU-only machine its shared-memory collective op is
# compiled now rather than at the first multi-process run.
if ! .venv/bin/python -c "import deepspeed" 2>/dev/null; then
  pip setuptools wheel numpy  # numpy: torch imports it while DeepSpeed builds
  cpu_only=$(.venv/bin/python -c "import torch; print(int(not torch.cuda.is_available()))")
  DS_BUILD_OPS=0 DS_BUILD_SHM_COMM=$cpu_only pip -c constraints.txt --no-build-isolation deepspeed
fi
pip -c constraints.txt -e ".[dev]"
.venv/bin/python -c "import alignlab, torch, transformers, trl; print(f'alignlab {alignlab.__version__} ready: torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}')"
