"""Regression: vLLM 0.32's CPU LoRA ops read slot index -1 ("no adapter") as the LAST slot.

With every ``max_loras`` slot occupied, base-model tokens batched with LoRA tokens are
computed with the last slot's adapter. Stock vLLM (plugin installed but not enabled, so
nothing is patched) shows the bug; with TenSafe enabled the same batch is right. Each answer
is compared with the same request answered alone.

The batch is forced, not hoped for (slot_batch.py): one ``LLM.generate`` call with an
in-process engine core admits every request in its first step, and vLLM's own LoRA mapping of
that step is checked to hold -1 tokens while every slot is full. A setup that does not
produce the condition fails here instead of passing (or flipping) by chance.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import AdapterFactory, Keys

pytestmark = pytest.mark.vllm

PROMPTS = ("Once upon a time", "The garden")
ADAPTERS = ("a", "b")
# Base requests first, between and last: -1 tokens on both sides of every adapter's tokens.
JOBS: list[tuple[str | None, str]] = [
    (None, PROMPTS[0]),
    ("a", PROMPTS[0]),
    (None, PROMPTS[1]),
    ("b", PROMPTS[0]),
    ("a", PROMPTS[1]),
    ("b", PROMPTS[1]),
    (None, PROMPTS[0] + " "),
]
MAX_TOKENS = 8
DRIVER = Path(__file__).with_name("slot_batch.py")


@pytest.fixture(scope="module")
def two_adapters(tiny_llama: Path, adapters: AdapterFactory) -> dict[str, Path]:
    return {
        "a": adapters.peft(tiny_llama, "llama-r8-qv", rank=8, alpha=16, seed=11),
        "b": adapters.peft(tiny_llama, "bug-b", rank=8, alpha=16, seed=31),
    }


def _run_batch(
    model: Path, adapters: dict[str, Path], tmp_path: Path, env: dict[str, str] | None = None
) -> dict[str, Any]:
    config = tmp_path / "batch.json"
    config.write_text(
        json.dumps(
            {
                "model": str(model),
                "adapters": {name: str(path) for name, path in adapters.items()},
                "jobs": JOBS,
                "max_tokens": MAX_TOKENS,
            }
        )
    )
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TENSAFE_")}
    proc = subprocess.run(
        [sys.executable, str(DRIVER), str(config)],
        capture_output=True,
        text=True,
        env={**clean, **(env or {})},
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(lines[-1])
    _assert_bug_condition(result)
    return result


def _assert_bug_condition(result: dict[str, Any]) -> None:
    """The first step of the joint batch held every request, every slot full, -1 tokens."""
    step = result["first_step"]
    assert step is not None, "vLLM never set a LoRA mapping for the joint batch"
    ids = result["lora_ids"]
    want = [0 if adapter is None else ids[adapter] for adapter, _ in JOBS]
    assert step["requests"] == len(JOBS), f"first step admitted {step['requests']} requests"
    assert sorted(step["request_lora_ids"]) == sorted(want), step["request_lora_ids"]
    assert None not in step["slots"] and sorted(step["slots"]) == sorted(ids.values()), (
        f"not every LoRA slot is occupied: {step['slots']}"
    )
    indices = set(step["token_lora_indices"])
    assert -1 in indices and indices - {-1} == set(range(len(ids))), indices


def _mismatches(result: dict[str, Any]) -> list[tuple[str | None, str]]:
    return [
        job
        for job, alone, together in zip(JOBS, result["alone"], result["together"], strict=True)
        if alone != together
    ]


def test_stock_vllm_has_the_bug(
    tiny_llama: Path, two_adapters: dict[str, Path], tmp_path: Path
) -> None:
    result = _run_batch(tiny_llama, two_adapters, tmp_path)
    bad = _mismatches(result)
    assert bad, "stock vLLM 0.32 no longer shows the -1 slot bug: drop the fix and this test"
    # Every base request is hit (all of them share the step with both full slots), and only
    # base requests are.
    assert bad == [job for job in JOBS if job[0] is None], bad
    assert not result["no_lora_fix"]


def test_plugin_fixes_it(
    tiny_llama: Path, two_adapters: dict[str, Path], owner_keys: Keys, tmp_path: Path
) -> None:
    env = {
        "TENSAFE_ENABLED": "true",
        "TENSAFE_TRUSTED_KEYS": str(owner_keys.signing_pub),
        "TENSAFE_HE_SECRET": str(owner_keys.he_secret),
    }
    result = _run_batch(tiny_llama, two_adapters, tmp_path, env)
    assert _mismatches(result) == []
    assert result["no_lora_fix"]
