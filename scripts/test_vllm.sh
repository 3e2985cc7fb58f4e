#!/usr/bin/env bash
# The vLLM stage: the real vLLM engine serving a phivision export (tests/vllm/). Builds (once) or reuses vLLM's
# own environment with scripts/vllm_env.sh, then runs the stage's tests from phivision's environment (README:
# "Run the tests"). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}

start=$(date +%s)
PHIVISION_VLLM_ENV=$(bash scripts/vllm_env.sh | tail -n 1)
export PHIVISION_VLLM_ENV
echo "== vLLM environment: $PHIVISION_VLLM_ENV ($(( $(date +%s) - start )) s)"

echo "== pytest tests/vllm"
"$PY" -m pytest tests/vllm -n 0 -p no:cacheprovider -rA "$@"
echo "vLLM stage finished in $(( $(date +%s) - start )) s"
