#!/usr/bin/env bash
# Issue 16's GPU part, one command on one H100/H200: the whole path at the real size (4.15B parameters, bf16).
#   1. bench_full_size.py with SDPA: write the full-size stand-in, train 20 LoRA steps at 16 crops (bf16, batch 1,
#      on 8 examples: the loss must fall), evaluate 2 items (constrained), export, greedy answers with phivision,
#      the export loaded WITHOUT phivision (this interpreter with `import phivision` blocked: the GPU machine has
#      no package index to build a clean venv), predict; serve too where fastapi is installed.
#   2. With FlashAttention-2 where flash_attn imports (carry its wheel in ./.whl): the same 20 steps on the same
#      stand-in, train only.
#
#   bash benchmarks/gpu_full_size.sh             # on the GPU machine, from anywhere; tables on stdout
#
# Runs from a checkout without installing it (PYTHONPATH=src). Wheels in ./.whl (flash-attn, fastapi, uvicorn,
# openai, llguidance: whatever the machine lacks) are installed into /tmp/site first.
source "$(dirname "$0")/gpu_env.sh"
WORK=${WORK:-/tmp/phivision-gpu-full-size}
rm -rf "$WORK" "$WORK-fa2"

have() { "$PY" -c "import $1" 2>/dev/null; }
SKIP=none
have fastapi && have uvicorn && have openai || SKIP=serve
COMMON=(--device cuda --num-crops 16 --steps 20 --train-samples 8 --lr 5e-4 --clean-python same)

timeout 420 "$PY" benchmarks/bench_full_size.py run --work "$WORK" "${COMMON[@]}" --attn sdpa --skip "$SKIP"
if have flash_attn; then
  timeout 150 "$PY" benchmarks/bench_full_size.py run --work "$WORK-fa2" --checkpoint "$WORK/standin" \
    "${COMMON[@]}" --attn flash_attention_2 --until train
else
  echo "flash_attn does not import here: the FlashAttention-2 row was not run"
fi
