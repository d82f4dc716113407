"""vllm-tensafe: serve signed, CKKS-encrypted LoRA adapters (TSSP packages) with stock vLLM."""

from __future__ import annotations

__version__ = "0.1.0"
