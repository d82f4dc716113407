"""Run one ``vllm.LLM`` batch whose first engine step holds base tokens next to full LoRA slots.

    python tests/e2e/slot_batch.py CONFIG.json  ->  one JSON line on stdout

Used by test_no_lora_slot_bug.py (in a subprocess, so that a stock run and a TenSafe run never
share patched vLLM classes). Deterministic by construction, not by hoping for a schedule:

* ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` keeps the engine core in this process, so
  ``LLM.generate`` adds every request to the scheduler before the first ``step()`` (with an
  engine-core process, the first requests could be stepped before the others arrive);
* ``max_num_seqs`` equals the number of prompts and ``max_loras`` the number of adapters, so
  the first step admits every request and fills every LoRA slot;
* ``PunicaWrapperBase.update_metadata`` is recorded, so the caller can check from vLLM's own
  state that the step really held "no LoRA" (-1) tokens while the last slot was occupied,
  which is the condition of the bug, instead of trusting that it did.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _record_steps(steps: list[dict[str, Any]]) -> None:
    from vllm.lora.punica_wrapper.punica_base import PunicaWrapperBase

    original = PunicaWrapperBase.update_metadata

    def update_metadata(self: Any, mapping: Any, lora_index_to_id: list, *args: Any, **kw: Any):
        result = original(self, mapping, lora_index_to_id, *args, **kw)
        steps.append(
            {
                "requests": len(mapping.prompt_mapping),
                "request_lora_ids": [int(x) for x in mapping.prompt_mapping],
                "slots": [None if x is None else int(x) for x in lora_index_to_id],
                "token_lora_indices": self.token_lora_indices.tolist(),
            }
        )
        return result

    PunicaWrapperBase.update_metadata = update_metadata  # type: ignore[method-assign]


def main(config_path: str) -> None:
    with open(config_path, encoding="utf-8") as handle:
        config = json.load(handle)
    steps: list[dict[str, Any]] = []
    _record_steps(steps)

    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    adapters: dict[str, str] = config["adapters"]
    jobs: list[tuple[str | None, str]] = [tuple(job) for job in config["jobs"]]  # type: ignore[misc]
    llm = LLM(
        config["model"],
        enable_lora=True,
        max_loras=len(adapters),
        max_lora_rank=8,
        max_num_seqs=len(jobs),
        dtype="float32",
        gpu_memory_utilization=0.5,
        max_model_len=512,
        seed=0,
    )
    ids = {name: index for index, name in enumerate(sorted(adapters), start=1)}
    requests = {name: LoRARequest(name, ids[name], path) for name, path in sorted(adapters.items())}
    params = SamplingParams(temperature=0, max_tokens=config["max_tokens"], ignore_eos=True)

    def lora(adapter: str | None) -> LoRARequest | None:
        return None if adapter is None else requests[adapter]

    alone = []
    for adapter, prompt in jobs:
        output = llm.generate([prompt], params, lora_request=lora(adapter), use_tqdm=False)
        alone.append(list(output[0].outputs[0].token_ids))

    first_together = len(steps)
    outputs = llm.generate(
        [prompt for _, prompt in jobs],
        params,
        lora_request=[lora(adapter) for adapter, _ in jobs],
        use_tqdm=False,
    )
    together = [list(output.outputs[0].token_ids) for output in outputs]
    from vllm_tensafe.vllm import patches

    print(
        json.dumps(
            {
                "lora_ids": ids,
                "alone": alone,
                "together": together,
                "first_step": steps[first_together] if len(steps) > first_together else None,
                # Whether punica.py's wrapper is in place (the plugin is active here).
                "no_lora_fix": patches.is_installed("torch_ops.bgmv_shrink"),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main(sys.argv[1])
