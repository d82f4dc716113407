"""Stock ``vllm serve`` with ``VLLM_PLUGINS=tensafe``: the adapter status route and the
OpenTelemetry metrics, read from a real server.

``VLLM_PLUGINS=tensafe`` is the one setting a user adds for the route (vLLM loads endpoint
plugins only when named there); the same name must keep the general plugin (encrypted adapters
at all) and the stat logger (request metrics) working, which this module relies on. Metrics
are read as a deployment reads them: every process exports over OTLP
(``TENSAFE_OTLP_ENDPOINT``) to a collector the test runs (tests/support/otlp.py).
"""

from __future__ import annotations

import base64
import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import AdapterFactory, Keys
from tests.e2e.helpers import complete
from tests.support.clients import openai_client
from tests.support.otlp import OtlpCollector
from tests.support.server_process import VllmServer

pytestmark = pytest.mark.vllm

# No request of this module can have taken longer than the module has existed: an upper bound
# for the latency histogram that holds however slow the machine is.
_MODULE_START = time.monotonic()

BASE = "tiny-llama"
REQUESTS_E8 = 3
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def packages(tiny_llama: Path, adapters: AdapterFactory) -> dict[str, Path]:
    p8 = adapters.peft(tiny_llama, "llama-r8-qv", rank=8, alpha=16, seed=11)
    p1 = adapters.peft(tiny_llama, "llama-r1-o", rank=1, alpha=4, targets=("o_proj",), seed=12)
    return {
        "e8": adapters.package(p8, tiny_llama, "e8"),
        "e1": adapters.package(p1, tiny_llama, "e1"),
    }


@pytest.fixture(scope="module")
def collector() -> Iterator[OtlpCollector]:
    with OtlpCollector() as running:
        yield running


@pytest.fixture(scope="module")
def server(
    tiny_llama: Path,
    owner_keys: Keys,
    packages: dict[str, Path],
    collector: OtlpCollector,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[VllmServer]:
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
            "--max-lora-rank",
            "8",
            "--max-loras",
            "2",
            "--lora-modules",
            *(f"served-{name}={path}" for name, path in packages.items()),
        ],
        env={"VLLM_PLUGINS": "tensafe", **collector.environment()},
        log_path=tmp_path_factory.mktemp("logs") / "vllm-metrics.log",
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
def traffic(client: Any) -> dict[str, int]:
    """The requests every test below reads the effects of: 3 to e8, 1 to e1, 1 to the base."""
    for i in range(REQUESTS_E8):
        complete(client, "served-e8", f"Once upon a time {i}", max_tokens=MAX_TOKENS)
    complete(client, "served-e1", "The secret of the garden", max_tokens=MAX_TOKENS)
    complete(client, BASE, "What is the secret word?", max_tokens=MAX_TOKENS)
    return {"served-e8": REQUESTS_E8, "served-e1": 1, BASE: 1}


def _get(server: VllmServer, path: str) -> tuple[int, str]:
    with urllib.request.urlopen(f"{server.base_url}{path}", timeout=60) as response:
        return response.status, response.read().decode()


def _status(server: VllmServer) -> dict[str, Any]:
    code, body = _get(server, "/v1/tensafe/adapters")
    assert code == 200, body
    return json.loads(body)


def test_route_lists_the_encrypted_adapters(
    server: VllmServer, traffic: dict[str, int], owner_keys: Keys, packages: dict[str, Path]
) -> None:
    from vllm_tensafe.tssp import load_public_key
    from vllm_tensafe.tssp.signing import key_id

    body = _status(server)
    assert body["tensafe_enabled"] is True and body["key_holder"] == "local"
    assert body["workers"] == 1
    by_name = {a["name"]: a for a in body["adapters"]}
    assert set(by_name) == {"e8", "e1"}
    owner = key_id(load_public_key(owner_keys.signing_pub))
    for name, adapter in by_name.items():
        assert adapter["served_names"] == [f"served-{name}"]
        assert adapter["path"] == str(packages[name])
        assert adapter["signer_key_id"] == owner and adapter["signature_verified"] is True
        assert adapter["base_model"]["architecture"] == "LlamaForCausalLM"
        assert len(adapter["base_model"]["fingerprint"]) == 64
        assert adapter["he_profile"] == "default" and adapter["key_holder"] == "local"
    assert by_name["e8"]["rank"] == 8 and by_name["e1"]["rank"] == 1

    e8, e1 = by_name["e8"]["usage"], by_name["e1"]["usage"]
    # Every engine step with e8 tokens calls the key holder once per LoRA layer that e8
    # targets (q and v share vLLM's merged qkv_proj: 2 layers), and a request takes one prefill
    # and MAX_TOKENS - 1 decode steps.
    assert e8["decrypt_calls"] >= REQUESTS_E8 * MAX_TOKENS * 2
    assert e8["ciphertexts_sent"] >= e8["decrypt_calls"]
    assert e8["tokens"] > 0 and e8["he_seconds"] > 0 and e8["failures"] == 0
    assert 0 < e1["decrypt_calls"] < e8["decrypt_calls"]


def test_route_shows_no_secret(
    server: VllmServer, traffic: dict[str, int], owner_keys: Keys, packages: dict[str, Path]
) -> None:
    _, text = _get(server, "/v1/tensafe/adapters")
    secrets = {
        "CKKS secret key": owner_keys.he_secret.read_bytes(),
        "signing key": owner_keys.signing_key.read_bytes(),
        # The package's tail is ciphertext bytes (the B' member is stored last).
        "ciphertexts": packages["e8"].read_bytes()[-4096:],
    }
    for what, data in secrets.items():
        for offset in range(0, max(1, len(data) - 48), 97):
            chunk = data[offset : offset + 48]
            for form in (chunk.hex(), base64.b64encode(chunk).decode()[:40]):
                assert form not in text, f"{what} bytes appear in the status answer"
            if chunk.isascii():
                assert chunk.decode() not in text, f"{what} text appears in the status answer"


def test_vllm_own_routes_still_work(server: VllmServer) -> None:
    code, body = _get(server, "/v1/models")
    assert code == 200
    ids = {m["id"] for m in json.loads(body)["data"]}
    assert {BASE, "served-e8", "served-e1"} <= ids


def _total(dumps: dict[int, dict[str, Any]], name: str, **attributes: str) -> float:
    total = 0.0
    for record in dumps.values():
        for point in record["metrics"].get(name, []):
            if all(point["attributes"].get(k) == v for k, v in attributes.items()):
                total += point.get("value", point.get("count", 0))
    return total


def test_metrics_are_exported_from_every_process(
    server: VllmServer, traffic: dict[str, int], collector: OtlpCollector
) -> None:
    requests = sum(traffic.values())
    want = {
        ("tensafe_vllm_requests_total", ()): requests,
        ("tensafe_vllm_latency_seconds", ()): requests,
        ("tensafe_vllm_tokens_generated", ()): requests * MAX_TOKENS,
        ("tensafe_vllm_he_operations_total", (("adapter", "e8"),)): 1,
        ("tensafe_vllm_he_operations_total", (("adapter", "e1"),)): 1,
        ("tensafe_vllm_he_delta_seconds", ()): 1,
        ("tensafe_vllm_key_holder_seconds", (("key_holder", "local"),)): 1,
        # The API server checks each static package at startup, the worker opens it to load.
        ("tensafe_vllm_tssp_verifications_total", (("outcome", "ok"),)): 4,
    }
    # Every process exports twice a second: wait for the last requests to reach the collector
    # (generous deadline: a busy machine may delay the exporter threads; a pass never waits).
    deadline = time.monotonic() + 180
    while True:
        dumps = collector.by_process()
        got = {key: _total(dumps, key[0], **dict(key[1])) for key in want}
        if all(got[key] >= value for key, value in want.items()) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert all(got[key] >= value for key, value in want.items()), (got, sorted(dumps))

    api = dumps[server.process.pid]  # type: ignore[union-attr]
    statuses = {p["attributes"]["status"] for p in api["metrics"]["tensafe_vllm_requests_total"]}
    assert statuses == {"length"}  # ignore_eos: every request ran to max_tokens
    latency = api["metrics"]["tensafe_vllm_latency_seconds"][0]
    assert latency["count"] == requests and 0 < latency["min"] <= latency["max"]
    assert latency["max"] <= time.monotonic() - _MODULE_START  # seconds, not milliseconds
    kv = api["metrics"]["tensafe_vllm_kv_cache_utilization"][0]["value"]
    assert 0.0 <= kv <= 1.0
    # HE work happens in the engine's worker, not in the API server.
    assert "tensafe_vllm_he_operations_total" not in api["metrics"]
    workers = [r for pid, r in dumps.items() if pid != server.process.pid]  # type: ignore[union-attr]
    assert any("tensafe_vllm_he_operations_total" in r["metrics"] for r in workers)
    ciphertexts = _total(dumps, "tensafe_vllm_he_operations_total", adapter="e8")
    status = {a["name"]: a["usage"] for a in _status(server)["adapters"]}
    assert ciphertexts <= status["e8"]["ciphertexts_sent"]
