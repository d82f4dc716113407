"""The torch HE engine (vllm_tensafe/he/gpu_engine.py) inside a real CPU ``vllm serve``.

``--tensafe-he-device cpu`` runs the engine that serves encrypted adapters on GPUs, here on CPU
tensors, through vLLM's LoRA layers (layers.py's eager path, device_he.py). One server for the
module, tiny Llama with tensor parallelism 2 (each rank's engines keep the output rows vLLM's
slice_lora_b gives it; row-parallel layers sum partial deltas), ``--max-loras 2`` with more
adapters than slots (vLLM evicts and re-binds them): encrypted adapters must give the greedy
tokens of vLLM's plaintext LoRA of the same weights and of transformers + peft (as the TenSEAL
engine does in test_serve_llama.py, with the same tolerances), alone and in mixed batches; a
package of another CKKS key fails its requests with the key holder's error and nothing else;
the status route names the engine.
"""

from __future__ import annotations

import json
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
    complete_all,
)
from tests.support.clients import openai_client
from tests.support.server_process import VllmServer

pytestmark = pytest.mark.vllm

BASE = "tiny-llama"
PAIRS = {"p8": "e8", "pall": "eall"}  # plaintext name -> encrypted name (same adapter)


@pytest.fixture(scope="module")
def torch_adapters(
    tiny_llama: Path, adapters: AdapterFactory, owner_keys: Keys, stranger_keys: Keys
) -> dict[str, Path]:
    # e8 is test_serve_llama.py's (same seed: the package is shared). The all-linear one has
    # rank 16 here: the torch engine's float64 GEMM tables take ~2.4 MB per column and worker
    # on the CPU, which at rank 64 and two tensor-parallel workers is more memory than CI has.
    p8 = adapters.peft(tiny_llama, "llama-r8-qv", rank=8, alpha=16, seed=11)
    pall = adapters.peft(
        tiny_llama,
        "llama-r16-all-rslora",
        rank=16,
        alpha=8,
        targets="all-linear",
        use_rslora=True,
        seed=14,
    )
    # Signed by the trusted owner but encrypted under another CKKS key than the server holds.
    foreign = AdapterFactory(adapters.root / "foreign", Keys(
        signing_key=owner_keys.signing_key,
        signing_pub=owner_keys.signing_pub,
        he_secret=stranger_keys.he_secret,
        he_public=stranger_keys.he_public,
    ))  # fmt: skip
    return {
        "p8": p8,
        "pall": pall,
        "e8": adapters.package(p8, tiny_llama, "e8"),
        "eall": adapters.package(pall, tiny_llama, "eall16"),
        "foreign": foreign.package(p8, tiny_llama, "foreign-key"),
    }


@pytest.fixture(scope="module")
def server(
    tiny_llama: Path,
    owner_keys: Keys,
    torch_adapters: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[VllmServer]:
    modules = [f"{name}={path}" for name, path in torch_adapters.items()]
    log = tmp_path_factory.mktemp("logs") / "vllm-torch-engine.log"
    srv = VllmServer(
        tiny_llama,
        [
            "--served-model-name",
            BASE,
            "--tensor-parallel-size",
            "2",
            "--enable-tensafe",
            "--tensafe-trusted-keys",
            str(owner_keys.signing_pub),
            "--tensafe-he-secret",
            str(owner_keys.he_secret),
            "--tensafe-he-device",
            "cpu",
            "--max-lora-rank",
            "16",
            "--max-loras",
            "2",
            "--max-cpu-loras",
            "8",
            "--lora-modules",
            *modules,
        ],
        env={
            "VLLM_PLUGINS": "tensafe",  # also the status route
            # One OpenMP thread per worker, each on its own core (as test_serve_qwen2_tp.py).
            "VLLM_CPU_OMP_THREADS_BIND": "0|1",
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


def _status(server: VllmServer) -> dict[str, Any]:
    with urllib.request.urlopen(f"{server.base_url}/v1/tensafe/adapters", timeout=60) as reply:
        return {a["name"]: a for a in json.loads(reply.read())["adapters"]}


def test_the_workers_run_the_torch_engine(server: VllmServer, sequential: dict) -> None:
    log = server.log()
    for rank in ("Worker_TP0", "Worker_TP1"):
        assert any(
            rank in line and "TenSafe: HE engine torch-cpu, HE op outside CUDA graphs" in line
            for line in log.splitlines()
        ), rank
    status = _status(server)
    assert status["e8"]["he_engine"] == "torch-cpu"
    usage = status["e8"]["usage"]
    # One call per layer and step with e8's tokens: q/v layers of 2 decoder layers at least.
    assert usage["he_calls"] > 0 and usage["tokens"] > 0 and usage["ciphertexts_sent"] > 0
    assert usage["failures"] == 0


@pytest.mark.parametrize(("plain", "encrypted"), list(PAIRS.items()))
def test_encrypted_equals_plaintext_lora(
    sequential: dict[tuple[str, str], Any], plain: str, encrypted: str
) -> None:
    for prompt in PROMPTS:
        ours = sequential[(encrypted, prompt)]
        assert_same_completion(ours, sequential[(plain, prompt)], LOGPROB_TOL)
        base = sequential[(BASE, prompt)]
        assert ours.token_ids != base.token_ids or ours.logprobs != base.logprobs


def test_encrypted_equals_transformers_peft(
    tiny_llama: Path, torch_adapters: dict[str, Path], sequential: dict[tuple[str, str], Any]
) -> None:
    """The reference the TenSEAL engine is held to in test_serve_llama.py, same tolerance."""
    from tests.support.builders import greedy_reference

    for name, peft in (("e8", "p8"), ("eall", "pall")):
        ids, logprobs = greedy_reference(
            tiny_llama, torch_adapters[peft], PROMPTS[0], MAX_TOKENS, stop_at_eos=False
        )
        ours = sequential[(name, PROMPTS[0])]
        assert list(ours.token_ids) == ids
        worst = max(abs(a - b) for a, b in zip(ours.logprobs, logprobs, strict=True))
        assert worst <= REFERENCE_LOGPROB_TOL


# A prefill longer than any layer engine's columns (2 slots x up to 3 members x rank 16 = 96):
# those calls decode the columns once instead of decrypting every token's product (gpu_engine.py).
LONG_PROMPT = " ".join(["In the quiet garden the old gardener kept a secret word"] * 5)


def test_a_long_prefill_equals_plaintext_lora(server: VllmServer, client: Any) -> None:
    request = urllib.request.Request(
        f"{server.base_url}/tokenize",
        data=json.dumps({"model": BASE, "prompt": LONG_PROMPT}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as reply:
        assert json.loads(reply.read())["count"] > 2 * 3 * 16
    jobs = [(m, LONG_PROMPT) for m in (BASE, "p8", "e8", "pall", "eall")]
    got = complete_all(client, jobs, at_once=False)
    for plain, encrypted in PAIRS.items():
        ours = got[(encrypted, LONG_PROMPT)]
        assert_same_completion(ours, got[(plain, LONG_PROMPT)], LOGPROB_TOL)
        base = got[(BASE, LONG_PROMPT)]
        assert ours.token_ids != base.token_ids or ours.logprobs != base.logprobs


def test_mixed_batches_with_slot_eviction(
    client: Any, sequential: dict[tuple[str, str], Any]
) -> None:
    # Four adapters, two slots: vLLM moves them in and out (the engines are re-bound), while
    # base, plaintext and encrypted requests share batches.
    jobs = list(sequential)
    together = complete_all(client, jobs, at_once=True)
    for job in jobs:
        assert_same_completion(together[job], sequential[job], LOGPROB_TOL)


def test_a_package_of_another_key_fails_its_requests_only(
    server: VllmServer, client: Any, sequential: dict[tuple[str, str], Any]
) -> None:
    import openai

    with pytest.raises(openai.APIStatusError) as info:
        client.completions.create(model="foreign", prompt=PROMPTS[0], max_tokens=4, temperature=0)
    assert info.value.status_code == 403
    message = str(info.value)
    assert "this key holder holds" in message and "Nothing was generated" in message
    # The others are unaffected.
    again = complete_all(client, [("e8", PROMPTS[0])], at_once=False)[("e8", PROMPTS[0])]
    assert_same_completion(again, sequential[("e8", PROMPTS[0])], LOGPROB_TOL)
    assert _status(server)["foreign-key"]["usage"]["failures"] >= 1


def test_server_still_healthy(server: VllmServer) -> None:
    try:
        with urllib.request.urlopen(f"{server.base_url}/health", timeout=30) as reply:
            assert reply.status == 200
    except urllib.error.URLError as exc:  # pragma: no cover - failure path
        pytest.fail(f"server unhealthy: {exc}")
