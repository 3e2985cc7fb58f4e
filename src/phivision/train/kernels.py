"""Optional fused kernels for training (Liger), CUDA only.

``liger_kernel`` imports Triton, so nothing here imports it unless a run asked for it on a CUDA machine:
:func:`require_liger` checks the machine and the package without importing either, :func:`apply_liger` imports
Liger and patches the model.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from phivision.errors import PhivisionError

LIGER_EXTRA = "pip install 'phivision[liger]'"


def require_liger(use_liger_kernel: bool) -> None:
    """Fail before the model loads when ``use_liger_kernel`` is set but cannot work here."""
    if not use_liger_kernel:
        return
    if not torch.cuda.is_available():
        raise PhivisionError(
            "config key 'use_liger_kernel': Liger kernels are Triton GPU kernels and need CUDA; "
            "this machine has no CUDA GPU (set use_liger_kernel=false)"
        )
    if importlib.util.find_spec("liger_kernel") is None:
        raise PhivisionError(
            f"config key 'use_liger_kernel': the liger-kernel package is not installed ({LIGER_EXTRA})"
        )


def apply_liger(model: Any) -> Any:
    """Swap the Phi-3 decoder's RMSNorm, SwiGLU MLP and rotary embedding for Liger's fused kernels, in place.

    Call it on the bare ``Phi3VForCausalLM`` before LoRA wraps it (LoRA layers inside the MLP keep working: the
    fused MLP still calls ``gate_up_proj`` and ``down_proj``). Liger's own fused linear cross-entropy is not used:
    the training loss computes logits only on the answer tokens already. Liger replaces transformers' Phi-3 rotary
    function module-wide, so every Phi-3 model in this process uses it afterwards.
    """
    require_liger(True)
    from liger_kernel.transformers import apply_liger_kernel_to_phi3

    apply_liger_kernel_to_phi3(
        rope=True,
        rms_norm=True,
        swiglu=True,
        cross_entropy=False,
        fused_linear_cross_entropy=False,
        model=model,
    )
    return model
