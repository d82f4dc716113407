"""The runnable examples, run as a user would (each starts its own real vLLM)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import AdapterFactory, Keys
from tests.e2e.helpers import LOGPROB_TOL

pytestmark = pytest.mark.vllm

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _run(script: str, *args: str, timeout: float = 600) -> dict:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**__import__("os").environ, "VLLM_CPU_KVCACHE_SPACE": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # stdout holds the one JSON result and nothing else (vLLM's logs go to stderr).
    lines = proc.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("{"), proc.stdout[-3000:]
    return json.loads(lines[0])


@pytest.fixture(scope="module")
def pair(tiny_llama: Path, adapters: AdapterFactory) -> tuple[Path, Path]:
    peft = adapters.peft(tiny_llama, "llama-r8-qv", rank=8, alpha=16, seed=11)
    return peft, adapters.package(peft, tiny_llama, "e8")


def test_python_llm_api(tiny_llama: Path, owner_keys: Keys, pair: tuple[Path, Path]) -> None:
    peft, package = pair
    out = _run(
        "python_llm_api.py",
        "--model", str(tiny_llama),
        "--package", str(package),
        "--trusted-key", str(owner_keys.signing_pub),
        "--he-secret", str(owner_keys.he_secret),
        "--plain-adapter", str(peft),
    )  # fmt: skip
    assert out["encrypted"]["token_ids"] == out["plaintext"]["token_ids"]
    assert out["encrypted"]["token_ids"] != out["base"]["token_ids"]
    diffs = [
        abs(a - b)
        for a, b in zip(out["encrypted"]["logprobs"], out["plaintext"]["logprobs"], strict=True)
    ]
    assert max(diffs) <= LOGPROB_TOL


def test_python_async_llm(tiny_llama: Path, owner_keys: Keys, pair: tuple[Path, Path]) -> None:
    from tests.support.builders import greedy_reference

    peft, package = pair
    out = _run(
        "python_async_llm.py",
        "--model", str(tiny_llama),
        "--package", str(package),
        "--trusted-key", str(owner_keys.signing_pub),
        "--he-secret", str(owner_keys.he_secret),
    )  # fmt: skip
    ids, _ = greedy_reference(tiny_llama, peft, "Once upon a time", 10, stop_at_eos=False)
    assert out["token_ids"] == ids
    assert out["streamed_steps"] > 1
