"""A second architecture (Qwen2: q/k/v carry a bias) under ``--tensor-parallel-size 2``.

Each tensor-parallel rank computes the encrypted delta for its own shard (column-parallel
layers: its rows of B'; row-parallel layers: its partial U, summed by vLLM's all-reduce),
and the answers equal vLLM's plaintext LoRA for the same adapters, sent one at a time and all
at once.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import AdapterFactory, Keys
from tests.e2e.helpers import LOGPROB_TOL, PROMPTS, assert_same_completion, complete_all
from tests.support.clients import openai_client
from tests.support.server_process import VllmServer

pytestmark = pytest.mark.vllm

BASE = "tiny-qwen2"
PAIRS = {"p8": "e8", "pall": "eall"}


@pytest.fixture(scope="module")
def qwen_adapters(tiny_qwen2: Path, adapters: AdapterFactory) -> dict[str, Path]:
    p8 = adapters.peft(tiny_qwen2, "qwen2-r8-qv", seed=21)
    pall = adapters.peft(
        tiny_qwen2, "qwen2-r16-all", rank=16, alpha=32, targets="all-linear", seed=22
    )
    return {
        "p8": p8,
        "pall": pall,
        "e8": adapters.package(p8, tiny_qwen2, "qwen-e8"),
        "eall": adapters.package(pall, tiny_qwen2, "qwen-eall"),
    }


@pytest.fixture(scope="module")
def client(tiny_qwen2: Path, owner_keys: Keys, qwen_adapters: dict[str, Path]) -> Iterator[Any]:

    server = VllmServer(
        tiny_qwen2,
        [
            "--served-model-name",
            BASE,
            "--tensor-parallel-size",
            "2",
            "--enable-tensafe",
            "--max-lora-rank",
            "16",
            "--max-loras",
            "4",
            "--lora-modules",
            *(f"{name}={path}" for name, path in qwen_adapters.items()),
        ],
        # Settings from the environment only, this time.
        env={
            # One OpenMP thread per worker, each on its own core: vLLM's automatic binding
            # wants one NUMA node per tensor-parallel worker.
            "VLLM_CPU_OMP_THREADS_BIND": "0|1",
            "TENSAFE_TRUSTED_KEYS": str(owner_keys.signing_pub),
            "TENSAFE_HE_SECRET": str(owner_keys.he_secret),
        },
    )
    with server:
        log = server.log()
        assert "TP1" in log or "rank 1" in log.lower() or "Worker_TP1" in log, (
            "expected two tensor-parallel workers"
        )
        yield openai_client(f"{server.base_url}/v1")


def test_qwen2_tp2_encrypted_equals_plaintext(client: Any) -> None:
    jobs = [(m, p) for m in (BASE, *PAIRS, *PAIRS.values()) for p in PROMPTS]
    alone = complete_all(client, jobs, at_once=False)
    together = complete_all(client, jobs, at_once=True)
    for plain, encrypted in PAIRS.items():
        for prompt in PROMPTS:
            assert_same_completion(alone[(encrypted, prompt)], alone[(plain, prompt)], LOGPROB_TOL)
            assert alone[(encrypted, prompt)].token_ids != alone[(BASE, prompt)].token_ids
    for job in jobs:
        assert_same_completion(together[job], alone[job], LOGPROB_TOL)
