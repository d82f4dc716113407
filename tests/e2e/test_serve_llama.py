"""Stock ``vllm serve --enable-tensafe`` on a tiny Llama: encrypted adapters answer exactly as
vLLM's own plaintext LoRA (and transformers + peft) answer for the same adapters.

One server for the whole module. It holds, side by side, PEFT adapters served in plaintext
(p*) and the same adapters packed as TSSP packages (e*), with ``--max-loras 2`` so that
slots are full while base-model requests run (the vLLM 0.32 CPU "-1 is the last slot" bug).
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import AdapterFactory, Keys
from tests.e2e.helpers import (
    LOGPROB_TOL,
    MAX_TOKENS,
    PROMPTS,
    REFERENCE_LOGPROB_TOL,
    assert_same_completion,
    complete,
    complete_all,
)
from tests.support.clients import openai_client
from tests.support.server_process import VllmServer

pytestmark = pytest.mark.vllm

BASE = "tiny-llama"
# name of plaintext adapter -> name of the same adapter served encrypted
PAIRS = {"p8": "e8", "p1": "e1", "pall": "eall"}


@pytest.fixture(scope="module")
def llama_adapters(tiny_llama: Path, adapters: AdapterFactory) -> dict[str, Path]:
    p8 = adapters.peft(tiny_llama, "llama-r8-qv", rank=8, alpha=16, seed=11)
    p1 = adapters.peft(tiny_llama, "llama-r1-o", rank=1, alpha=4, targets=("o_proj",), seed=12)
    pall = adapters.peft(
        tiny_llama,
        "llama-r64-all-rslora",
        rank=64,
        alpha=8,
        targets="all-linear",
        use_rslora=True,
        seed=13,
    )
    return {
        "p8": p8,
        "p1": p1,
        "pall": pall,
        "e8": adapters.package(p8, tiny_llama, "e8"),
        "e1": adapters.package(p1, tiny_llama, "e1"),
        "eall": adapters.package(pall, tiny_llama, "eall"),
    }


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory: pytest.TempPathFactory, llama_adapters: dict[str, Path]) -> Path:
    folder = tmp_path_factory.mktemp("adapter-dir")
    shutil.copy(llama_adapters["e8"], folder / "r8.tssp")
    outside = tmp_path_factory.mktemp("outside")
    shutil.copy(llama_adapters["e1"], outside / "secret.tssp")
    (folder / "escape.tssp").symlink_to(outside / "secret.tssp")
    return folder


@pytest.fixture(scope="module")
def server(
    tiny_llama: Path,
    owner_keys: Keys,
    llama_adapters: dict[str, Path],
    demo: Any,
    adapters: AdapterFactory,
    adapter_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[VllmServer]:
    demo_package = adapters.package(demo.demo_adapter_dir, demo.model_dir, "demo")
    modules = [f"{name}={path}" for name, path in llama_adapters.items()]
    log = tmp_path_factory.mktemp("logs") / "vllm-llama.log"
    srv = VllmServer(
        tiny_llama,
        [
            "--served-model-name",
            BASE,
            "--enable-tensafe",
            "--tensafe-trusted-keys",
            str(owner_keys.signing_pub),
            "--tensafe-he-secret",
            str(owner_keys.he_secret),
            "--tensafe-key-holder-timeout",
            "7",
            "--max-lora-rank",
            "64",
            "--max-loras",
            "2",
            "--max-cpu-loras",
            "16",
            "--lora-modules",
            *modules,
            f"demo={demo_package}",
        ],
        env={
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1",
            "TENSAFE_ADAPTER_DIR": str(adapter_dir),
            # The flag above must win over this in every process.
            "TENSAFE_KEY_HOLDER_TIMEOUT": "3",
        },
        log_path=log,
    )
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def client(server: VllmServer) -> Any:
    return openai_client(f"{server.base_url}/v1")


@pytest.fixture(scope="module")
def sequential(client: Any) -> dict[tuple[str, str], Any]:
    jobs = [(m, p) for m in [BASE, *PAIRS, *PAIRS.values()] for p in PROMPTS]
    return complete_all(client, jobs, at_once=False)


def _post(server: VllmServer, path: str, body: dict[str, Any]) -> tuple[int, str]:
    request = urllib.request.Request(
        f"{server.base_url}{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


# --- startup --------------------------------------------------------------------------------


def test_plugin_registered_in_api_server_and_worker(server: VllmServer) -> None:
    log = server.log()
    assert "plugin registered in process" in log and "(API server)" in log
    assert "TenSafe enabled in process" in log
    worker_lines = [
        line
        for line in log.splitlines()
        if "TenSafe enabled in process" in line and "Worker" in line
    ]
    assert worker_lines, "the worker process did not activate TenSafe"
    # --tensafe-key-holder-timeout 7 beat TENSAFE_KEY_HOLDER_TIMEOUT=3 in the worker too.
    assert all("timeout 7.0s" in line for line in worker_lines)
    # The graph guard saw the engine config before the engine existed, and the worker
    # checked it again (on CPU vLLM runs no CUDA graphs: NONE).
    assert "TenSafe graph guard: cudagraph_mode NONE" in log
    assert "additional_config['tensafe'] is part of its key" in log
    assert "TenSafe graph check in worker: cudagraph_mode=NONE" in log


def test_health_and_models(server: VllmServer, client: Any) -> None:
    assert server.healthy()
    ids = {model.id for model in client.models.list().data}
    assert {BASE, "demo", *PAIRS, *PAIRS.values()} <= ids


# --- correctness ----------------------------------------------------------------------------


@pytest.mark.parametrize(("plain", "encrypted"), sorted(PAIRS.items()))
def test_encrypted_equals_plaintext_lora(
    sequential: dict[tuple[str, str], Any], plain: str, encrypted: str
) -> None:
    for prompt in PROMPTS:
        ours = sequential[(encrypted, prompt)]
        theirs = sequential[(plain, prompt)]
        assert_same_completion(ours, theirs, LOGPROB_TOL)
        # The adapter matters: otherwise equality above would prove nothing.
        assert ours.token_ids != sequential[(BASE, prompt)].token_ids or ours.logprobs != (
            sequential[(BASE, prompt)].logprobs
        )


def test_concurrent_batches_equal_one_at_a_time(
    client: Any, sequential: dict[tuple[str, str], Any]
) -> None:
    # Base, plaintext and encrypted requests all at once: batches mix, slots are full.
    jobs = list(sequential)
    for _ in range(2):
        together = complete_all(client, jobs, at_once=True)
        for job in jobs:
            assert_same_completion(together[job], sequential[job], LOGPROB_TOL)


@pytest.mark.parametrize("name", ["e8", "eall"])
def test_encrypted_equals_transformers_peft(
    tiny_llama: Path,
    llama_adapters: dict[str, Path],
    sequential: dict[tuple[str, str], Any],
    name: str,
) -> None:
    from tests.support.builders import greedy_reference

    peft_dir = llama_adapters["p8" if name == "e8" else "pall"]
    for prompt in PROMPTS[:2]:
        ids, logprobs = greedy_reference(
            tiny_llama, peft_dir, prompt, MAX_TOKENS, stop_at_eos=False
        )
        ours = sequential[(name, prompt)]
        assert list(ours.token_ids) == ids
        worst = max(abs(a - b) for a, b in zip(ours.logprobs, logprobs, strict=True))
        assert worst <= REFERENCE_LOGPROB_TOL


def test_demo_adapter_streaming_chat(client: Any) -> None:
    from tests.support.builders import DEMO_ANSWER, DEMO_PROMPT

    def chat(model: str) -> str:
        stream = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": DEMO_PROMPT}],
            max_tokens=16,
            temperature=0,
            stream=True,
        )
        pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
        assert len(pieces) > 2, "expected a streamed answer in several chunks"
        return "".join(pieces)

    assert chat("demo").strip() == DEMO_ANSWER
    assert chat(BASE).strip() != DEMO_ANSWER
    completion = complete(client, "demo", DEMO_PROMPT, max_tokens=12)
    assert completion.text.startswith(" " + DEMO_ANSWER) or completion.text.startswith(DEMO_ANSWER)


# --- runtime loading, resolver ----------------------------------------------------------------


def test_runtime_load_and_unload(
    server: VllmServer,
    client: Any,
    llama_adapters: dict[str, Path],
    sequential: dict,
    adapter_dir: Path,
) -> None:
    # With TENSAFE_ADAPTER_DIR set, runtime loads come from that folder only
    # (tests/e2e/test_hostile_input.py attacks that).
    shutil.copy(llama_adapters["e8"], adapter_dir / "late-package.tssp")
    status, body = _post(
        server,
        "/v1/load_lora_adapter",
        {"lora_name": "late", "lora_path": "late-package.tssp"},
    )
    assert status == 200, body
    prompt = PROMPTS[0]
    assert_same_completion(
        complete(client, "late", prompt), sequential[("p8", prompt)], LOGPROB_TOL
    )
    status, body = _post(server, "/v1/unload_lora_adapter", {"lora_name": "late"})
    assert status == 200, body
    assert "late" not in {m.id for m in client.models.list().data}


def test_runtime_load_refuses_bad_packages(
    server: VllmServer,
    llama_adapters: dict[str, Path],
    adapters: AdapterFactory,
    stranger_keys: Keys,
    tiny_llama: Path,
    tiny_qwen2: Path,
    adapter_dir: Path,
) -> None:
    tampered = adapter_dir / "tampered.tssp"  # inside the folder: runtime loads come from it
    data = bytearray(llama_adapters["e8"].read_bytes())
    data[len(data) // 2] ^= 0x01
    tampered.write_bytes(bytes(data))
    untrusted = adapters.package(
        llama_adapters["p8"], tiny_llama, "stranger-e8", keys=stranger_keys
    )
    qwen_adapter = adapters.peft(tiny_qwen2, "qwen2-r8-qv", seed=21)
    for_qwen = adapters.package(qwen_adapter, tiny_qwen2, "qwen-e8")
    shutil.copy(untrusted, adapter_dir / "untrusted.tssp")
    shutil.copy(for_qwen, adapter_dir / "for-qwen.tssp")
    cases = {
        "tampered": (tampered, "digest"),
        "untrusted": (adapter_dir / "untrusted.tssp", "not trusted"),
        "wrong base": (adapter_dir / "for-qwen.tssp", "base model"),
        "missing": (adapter_dir / "nope.tssp", "does not exist"),
    }
    for label, (path, needle) in cases.items():
        status, body = _post(
            server,
            "/v1/load_lora_adapter",
            {"lora_name": f"bad-{label.replace(' ', '-')}", "lora_path": str(path)},
        )
        assert status in (400, 404), (label, status, body)
        message = json.loads(body)["error"]["message"]
        assert needle.lower() in message.lower(), (label, message)
    assert server.healthy()


def test_resolver_loads_by_name(client: Any, sequential: dict) -> None:
    prompt = PROMPTS[1]
    assert_same_completion(complete(client, "r8", prompt), sequential[("p8", prompt)], LOGPROB_TOL)


@pytest.mark.parametrize(
    "name", ["../outside/secret", "/etc/hostname", "sub/r8", "escape", "r8.tssp/..", "..", ".r8"]
)
def test_resolver_refuses_names_that_leave_the_folder(client: Any, name: str) -> None:
    from openai import NotFoundError

    with pytest.raises(NotFoundError):
        client.completions.create(model=name, prompt="hi", max_tokens=2)


def test_server_still_healthy(server: VllmServer) -> None:
    assert server.healthy()
    assert os.path.exists(server._log_file.name)
