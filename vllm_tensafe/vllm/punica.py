"""Treat LoRA index -1 as "no adapter" in vLLM's CPU (torch) punica ops.

vLLM 0.32's torch ops index the stacked adapter weights with each token's slot index, and
"no LoRA" is -1, which Python indexing reads as the LAST slot: when every ``--max-loras`` slot
is occupied, base-model tokens batched with LoRA tokens get the last slot's adapter. Masking
the shrink and expand inputs of -1 tokens makes their LoRA contribution exactly zero, for
plaintext and encrypted adapters alike. (GPU Triton kernels already skip -1.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

_PATCHED_ATTR = "_tensafe_no_lora_fix"


def _masked(op: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(
        inputs: torch.Tensor,
        weights: torch.Tensor,
        output_tensor: torch.Tensor,
        lora_indices_tensor: torch.Tensor,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        no_lora = lora_indices_tensor < 0
        # The ops broadcast a single-row input over the batch; mask only row-aligned inputs.
        if inputs.shape[0] == lora_indices_tensor.shape[0]:
            inputs = inputs.masked_fill(no_lora.unsqueeze(-1), 0)
        return op(
            inputs,
            weights,
            output_tensor,
            lora_indices_tensor.clamp(min=0),
            *args,
            **kwargs,
        )

    setattr(wrapper, _PATCHED_ATTR, True)
    wrapper.__name__ = op.__name__
    wrapper.__doc__ = op.__doc__
    return wrapper


def install_no_lora_fix() -> bool:
    """Patch the CPU torch ops and the CPU punica wrapper's references to them. Idempotent."""
    try:
        from vllm.lora.ops.torch_ops import lora_ops
        from vllm.lora.punica_wrapper import punica_cpu
    except ImportError:
        return False
    for name in ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice"):
        original = getattr(lora_ops, name)
        if getattr(original, _PATCHED_ATTR, False):
            continue
        fixed = _masked(original)
        # sgmv_* call bgmv_* through the module globals; punica_cpu imported the names.
        setattr(lora_ops, name, fixed)
        if hasattr(punica_cpu, name):
            setattr(punica_cpu, name, fixed)
    return True
