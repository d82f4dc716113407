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

from vllm_tensafe.vllm import patches


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

    return wrapper


_OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")


def install_no_lora_fix() -> bool:
    """Patch the CPU torch ops and the CPU punica wrapper's references to them. Idempotent.

    Only on vLLM's CPU platform, where these ops run (GPU Triton kernels skip -1 already).
    There it is required: without it base-model tokens get an adapter's output.
    """
    if not patches.resolve("current_platform").is_cpu():
        return False
    for name in _OPS:
        # sgmv_* call bgmv_* through lora_ops' globals; punica_cpu imported the names, so
        # both get the same wrapper.
        fixed: list[Any] = []

        def factory(original: Callable[..., Any], fixed: list[Any] = fixed) -> Any:
            if not fixed:
                fixed.append(_masked(original))
            return fixed[0]

        patches.replace(f"torch_ops.{name}", factory)
        patches.replace(f"punica_cpu.{name}", factory)
    return True
