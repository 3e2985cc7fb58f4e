#!/usr/bin/env bash
# Issue 9's GPU benchmark, one command, under 8 minutes on one H100/H200:
#   full-size Phi-3-Vision (random weights, bf16, LoRA r 64, gradient checkpointing as configs/lora.yaml) at 16 and
#   4 crops: padded batch 8 vs the same 8 samples packed vs batch 1 eager, answer-only logits on and off, Liger on
#   and off -> samples/s, tokens/s, MFU, peak memory (benchmarks/bench_model.py perf; its --help explains).
#
#   bash benchmarks/gpu_train_perf.sh                 # on the GPU machine, from anywhere
#   bash benchmarks/gpu_train_perf.sh --iters 3       # extra arguments go to `bench_model.py perf`
#
# Runs from a checkout without installing it (PYTHONPATH=src) where torch, transformers, peft, pillow, pandas and
# pyyaml are installed. Wheels in ./.whl (e.g. liger-kernel, which the Liger rows need) are installed into
# /tmp/site first; without liger-kernel those rows print "n/a". No new row starts after 420 s (--budget-s).
source "$(dirname "$0")/gpu_env.sh"
"$PY" - <<'EOF'
import importlib.util, torch, transformers, peft
extras = {name: importlib.util.find_spec(name) is not None for name in ("flash_attn", "liger_kernel")}
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}, "
      f"peft {peft.__version__}, installed: {extras}")
EOF
timeout 470 "$PY" benchmarks/bench_model.py perf "$@"
