#!/usr/bin/env bash
# Create the two TRL venvs the CPU benchmark compares against (idempotent).
#   benchmarks/.venv-trl112: trl 1.12.0 (experimental PPOTrainer)
#   benchmarks/.venv-trl116: trl 1.16.0 (GRPO / RLOO, for context)
# torch==2.13.0 is installed first so pip takes the local CPU wheel instead of the CUDA build.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
TORCH=${TORCH_PIN:-torch==2.13.0}
for v in trl112 trl116; do
  venv=".venv-$v"
  if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import trl, torch" 2>/dev/null; then
    echo "$venv: ok ($("$venv/bin/python" -c 'import trl, torch; print("trl", trl.__version__, "torch", torch.__version__)'))"
    continue
  fi
  "$PY" -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "$TORCH"
  "$venv/bin/pip" install -q --disable-pip-version-check -r "requirements-$v.txt"
  "$venv/bin/python" -c 'import trl, torch, transformers; print("'"$venv"'", "trl", trl.__version__, "torch", torch.__version__, "transformers", transformers.__version__)'
done
