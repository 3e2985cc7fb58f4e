#!/usr/bin/env bash
# The oracle stage: phivision's processor, logits and greedy tokens against Microsoft's official Phi-3-Vision code,
# run from ../shared/reference/ (or $PHIVISION_SHARED_REFERENCE) in a transformers 4.48 environment that the stage
# builds once and caches (tests/serve/standalone_env.py). Run it inside the environment where phivision is
# installed, after scripts/test.sh (which installs the test extras).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}

echo "== pytest tests/oracle"
"$PY" -m pytest tests/oracle -n 0 --timeout 1800 "$@"
