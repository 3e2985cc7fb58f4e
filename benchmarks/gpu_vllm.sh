#!/usr/bin/env bash
# vLLM's GPU build serving a phivision export, on a GPU machine where vLLM is installed: the vLLM stage's test
# (tests/vllm/: a LoRA run on a checkpoint vLLM can build, exported, `vllm serve EXPORT --trust-remote-code`, greedy
# tokens from the `openai` client equal to phivision's on three photos and a ~3,000-token text prompt, a
# json_schema answer), with vLLM on the GPU and phivision's reference answers computed on the CPU, both float32.
#
#   bash benchmarks/gpu_vllm.sh                    # extra arguments go to pytest
#
# Not run yet: no GPU was lent while it was written. vLLM is not in the GPU image and that machine has no
# internet; vLLM's wheel alone (336 MB for 0.33) is over what a run can carry, so this runs only where vLLM is
# installed (VLLM_PYTHON names that Python; default: the python3 on PATH). phivision runs from this checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VLLM_PYTHON=${VLLM_PYTHON:-$(command -v python3)}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
export PYTHONPATH="$PWD/src:${PYTHONPATH:-}"

if ! "$VLLM_PYTHON" -c "import vllm" 2>/dev/null; then
  echo "vLLM is not installed for $VLLM_PYTHON: nothing to run (set VLLM_PYTHON to a Python that has it)"
  exit 0
fi
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
"$VLLM_PYTHON" -c "import vllm, torch; print(f'vllm {vllm.__version__}, torch {torch.__version__} (CUDA {torch.version.cuda})')"
# The test starts `$PHIVISION_VLLM_ENV/bin/vllm`: the environment that Python belongs to.
PHIVISION_VLLM_ENV=$(dirname "$(dirname "$VLLM_PYTHON")")
export PHIVISION_VLLM_ENV
timeout 560 "$PY" -m pytest tests/vllm -n 0 -p no:cacheprovider -rA "$@"
