#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py has what it runs). On the device machine diffusers (and wandb) are not
# installed: their wheels travel in .whl/ (git-ignored; README "GPU check" says how to fetch them) and are installed
# here into /tmp/site first. Usage: bash benchmarks/gpu_check.sh [--device cpu] [--tiny] [--out DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
python3 -c "import diffusers" 2>/dev/null || { echo "gpu_check: diffusers is not installed; put its wheel in .whl/ (README, GPU check)" >&2; exit 2; }
exec python3 benchmarks/gpu_check.py "$@"
