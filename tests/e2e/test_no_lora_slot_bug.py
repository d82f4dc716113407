"""Regression: vLLM 0.32's CPU LoRA ops read slot index -1 ("no adapter") as the LAST slot.

With every ``--max-loras`` slot occupied, base-model requests batched with LoRA requests are
answered with the last slot's adapter. Stock vLLM (plugin installed but not enabled, so
nothing is patched) shows the bug; with ``--enable-tensafe`` the same requests are right.
Comparisons are against the same requests sent one at a time.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import AdapterFactory, Keys
from tests.e2e.helpers import complete_all
from tests.support.server_process import VllmServer

pytestmark = pytest.mark.vllm

BASE = "tiny-llama"
PROMPTS = ("Once upon a time", "The garden")


def _mismatches(server: VllmServer, rounds: int = 3) -> list[tuple[str, str]]:
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
    jobs = [(m, p) for m in (BASE, "a", "b") for p in PROMPTS]
    alone = complete_all(client, jobs, at_once=False)
    bad = []
    for _ in range(rounds):
        # Base requests in the middle, twice, so they share batches with both adapters.
        together = complete_all(client, jobs + [(BASE, p + " ") for p in PROMPTS], at_once=True)
        bad += [job for job in jobs if together[job].token_ids != alone[job].token_ids]
    return bad


def _args(adapters: dict[str, Path]) -> list[str]:
    return [
        "--served-model-name",
        BASE,
        "--enable-lora",
        "--max-loras",
        "2",
        "--max-lora-rank",
        "8",
        "--lora-modules",
        f"a={adapters['a']}",
        f"b={adapters['b']}",
    ]


@pytest.fixture(scope="module")
def two_adapters(tiny_llama: Path, adapters: AdapterFactory) -> dict[str, Path]:
    return {
        "a": adapters.peft(tiny_llama, "llama-r8-qv", rank=8, alpha=16, seed=11),
        "b": adapters.peft(tiny_llama, "bug-b", rank=8, alpha=16, seed=31),
    }


def test_stock_vllm_has_the_bug(tiny_llama: Path, two_adapters: dict[str, Path]) -> None:
    with VllmServer(tiny_llama, _args(two_adapters)) as server:
        bad = _mismatches(server)
    assert bad, "stock vLLM 0.32 no longer shows the -1 slot bug: drop the fix and this test"
    assert all(model == BASE for model, _ in bad), bad


def test_plugin_fixes_it(tiny_llama: Path, two_adapters: dict[str, Path], owner_keys: Keys) -> None:
    args = [
        *_args(two_adapters),
        "--enable-tensafe",
        "--tensafe-trusted-keys",
        str(owner_keys.signing_pub),
        "--tensafe-he-secret",
        str(owner_keys.he_secret),
    ]
    with VllmServer(tiny_llama, args) as server:
        assert _mismatches(server) == []
        assert "TenSafe enabled" in server.log()
