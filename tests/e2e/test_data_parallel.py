"""``vllm serve --data-parallel-size 2``: two engine cores, one failure board, no mix-up.

Both engine cores share one ``TENSAFE_RUN_DIR`` and give an adapter the same ``lora_int_id``.
An encrypted adapter whose every decryption fails (its package is signed by the trusted owner
but encrypted under a key the host's key holder does not hold) must fail every one of its
requests on BOTH engines, while the other requests of the same batches (another encrypted
adapter, a plaintext one, the base model) are answered exactly as when sent alone. Requests
are pinned to an engine with vLLM's ``X-data-parallel-rank`` header, and each engine core's
log shows that it failed its own requests (tests/test_failure_board.py shows the old keying
losing a record).
"""

from __future__ import annotations

import concurrent.futures
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import AdapterFactory, Keys
from tests.support.clients import openai_client
from tests.support.server_process import VllmServer
from vllm_tensafe.cli import main as tensafe_cli

pytestmark = pytest.mark.vllm

BASE = "tiny-llama"
FAILING = "e-foreign"
PROMPT = "Once upon a time"
MAX_TOKENS = 6
RANKS = (0, 1)
FAILURE_LINE = re.compile(
    r"\(EngineCore_DP(\d)\b[^)]*\).*Request \S+ failed: encrypted adapter '" + FAILING + "'"
)


@pytest.fixture(scope="module")
def packages(
    tiny_llama: Path, adapters: AdapterFactory, owner_keys: Keys, stranger_keys: Keys
) -> dict[str, Path]:
    peft = adapters.peft(tiny_llama, "llama-r8-qv", rank=8, alpha=16, seed=11)
    from vllm_tensafe.tssp.format import FORMAT_VERSION

    foreign = adapters.root / f"tssp-v{FORMAT_VERSION}" / f"{FAILING}.tssp"
    if not foreign.exists():
        foreign.parent.mkdir(parents=True, exist_ok=True)
        code = tensafe_cli(
            [
                "pack",
                str(peft),
                "--base-model",
                str(tiny_llama),
                "--signing-key",
                str(owner_keys.signing_key),  # trusted signer ...
                "--he-public",
                str(stranger_keys.he_public),  # ... key the host's key holder lacks
                "-o",
                str(foreign),
                "--name",
                FAILING,
                "--quiet",
                "--allow-shared-key",  # the stranger's key signs other test packages too
            ]
        )
        assert code == 0
    return {"p8": peft, "e8": adapters.package(peft, tiny_llama, "e8"), FAILING: foreign}


@pytest.fixture(scope="module")
def server(tiny_llama: Path, owner_keys: Keys, packages: dict[str, Path]) -> Iterator[VllmServer]:
    args = [
        "--served-model-name",
        BASE,
        "--data-parallel-size",
        "2",
        "--enable-tensafe",
        "--tensafe-trusted-keys",
        str(owner_keys.signing_pub),
        "--tensafe-he-secret",
        str(owner_keys.he_secret),
        "--max-lora-rank",
        "8",
        "--max-loras",
        "3",
        "--lora-modules",
        *(f"{name}={path}" for name, path in packages.items()),
    ]
    # Two engine cores and two API servers start on two cores: twice the usual time.
    with VllmServer(tiny_llama, args, startup_timeout=900) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: VllmServer) -> Any:
    return openai_client(f"{server.base_url}/v1", timeout=300)


def _ask(client: Any, rank: int, model: str) -> tuple[int, ...] | Exception:
    """Greedy token ids of one request on engine ``rank``, or the error it failed with."""
    from openai import APIStatusError

    try:
        reply = client.completions.create(
            model=model,
            prompt=PROMPT,
            max_tokens=MAX_TOKENS,
            temperature=0,
            extra_body={"return_token_ids": True, "ignore_eos": True},
            extra_headers={"X-data-parallel-rank": str(rank)},
        )
    except APIStatusError as exc:
        return exc
    return tuple(reply.choices[0].token_ids)


@pytest.fixture(scope="module")
def alone(client: Any) -> dict[tuple[int, str], tuple[int, ...]]:
    answers = {
        (rank, model): _ask(client, rank, model) for rank in RANKS for model in (BASE, "p8", "e8")
    }
    for key, answer in answers.items():
        assert isinstance(answer, tuple), (key, answer)
    # Both engines run the same weights: the same greedy answer.
    for model in (BASE, "p8", "e8"):
        assert answers[(0, model)] == answers[(1, model)], model
    assert answers[(0, "e8")] == answers[(0, "p8")] != answers[(0, BASE)]
    return answers  # type: ignore[return-value]


def _assert_refused(answer: Any) -> None:
    from openai import APIStatusError

    assert isinstance(answer, APIStatusError), f"{FAILING} answered {answer!r}"
    assert answer.status_code == 403, answer
    assert FAILING in str(answer) and "base model" in str(answer), answer


def test_failing_adapter_fails_on_both_engines_and_nothing_else(
    client: Any, server: VllmServer, alone: dict[tuple[int, str], tuple[int, ...]]
) -> None:
    for rank in RANKS:  # alone first: each engine fails it by itself
        _assert_refused(_ask(client, rank, FAILING))
    # Then mixed batches on both engines at once.
    jobs = [
        (rank, model)
        for rank in RANKS
        for model in (FAILING, "e8", FAILING, "p8", BASE, FAILING, "e8", BASE)
    ]
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        answers = list(pool.map(lambda job: _ask(client, *job), jobs))
    for (rank, model), answer in zip(jobs, answers, strict=True):
        if model == FAILING:
            _assert_refused(answer)
        else:
            assert answer == alone[(rank, model)], (rank, model, answer)

    # Each engine core failed exactly its own requests of the failing adapter.
    per_engine = Counter(
        int(m.group(1)) for m in map(FAILURE_LINE.search, server.log().splitlines()) if m
    )
    want = sum(1 for _, model in jobs if model == FAILING) // len(RANKS) + 1
    assert per_engine == {0: want, 1: want}, per_engine
    assert server.healthy()
