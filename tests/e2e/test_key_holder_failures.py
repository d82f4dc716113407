"""Stock ``vllm serve`` with a REMOTE key holder: it works, and when the key holder refuses or
fails, only the affected requests fail, with a clear error; the rest keep being served and
nothing is answered from the base model in place of the encrypted adapter.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import AdapterFactory, Keys, adapter_keys
from tests.e2e.helpers import LOGPROB_TOL, PROMPTS, assert_same_completion, complete
from tests.support.clients import openai_client
from tests.support.server_process import VllmServer, free_port

pytestmark = pytest.mark.vllm

BASE = "tiny-llama"
TOKEN = "host-token-for-tests"
# Generous: a decrypt on a busy 2-core CI machine must never hit it by accident; only the
# blackholed key holder below does (one wait, timeouts are not retried).
TIMEOUT = 10.0
ENCRYPTED = ("e8", "e-budget", "e-revoke")


class KeyHolderHarness:
    """The owner's key-holder service on loopback, which the tests can stop and replace.

    It holds one CKKS key per adapter (the key holder refuses a key shared by two adapters)
    and keeps its audit log across restarts, so budgets and revocations survive them.
    """

    def __init__(self, keys: dict[str, Keys], packages: list[Path], audit: Path, port: int) -> None:
        from vllm_tensafe.he import SecretKeySet

        self.secrets = [SecretKeySet.load(k.he_secret) for k in keys.values()]
        self.signing_pub = next(iter(keys.values())).signing_pub
        self.packages = packages
        self.audit = audit
        self.port = port
        self.service: Any = None
        self._blackhole: socket.socket | None = None
        self._held: list[socket.socket] = []

    def start(self) -> None:
        from vllm_tensafe.keyholder.server import AdapterPolicy, KeyHolderService, TokenStore
        from vllm_tensafe.tssp import TrustStore

        policy = AdapterPolicy.from_packages(
            self.packages, TrustStore.from_files([self.signing_pub])
        )
        policy.adapters["e-budget"].budget = 10
        self.service = KeyHolderService(
            self.secrets,
            policy,
            TokenStore.from_secrets([TOKEN]),
            port=self.port,
            audit_log=self.audit,
        )
        assert self.service.start() == self.port

    def stop(self) -> None:
        if self.service is not None:
            self.service.close()
            self.service = None

    def blackhole(self) -> None:
        """Accept connections and never answer: a key holder slower than any timeout."""
        self.stop()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(64)
        self._blackhole = sock
        held = self._held

        def accept() -> None:
            while self._blackhole is not None:
                try:
                    conn, _ = sock.accept()
                    held.append(conn)
                except OSError:
                    return

        threading.Thread(target=accept, daemon=True).start()

    def end_blackhole(self) -> None:
        if self._blackhole is not None:
            sock, self._blackhole = self._blackhole, None
            # shutdown() wakes the thread blocked in accept(); close() alone leaves the port
            # listening until accept() returns.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for conn in self._held:
            conn.close()
        self._held.clear()


@pytest.fixture(scope="module")
def keys(artifacts: Path, owner_keys: Keys) -> dict[str, Keys]:
    return {name: adapter_keys(artifacts, owner_keys, f"kh-{name}") for name in ENCRYPTED}


@pytest.fixture(scope="module")
def packages(tiny_llama: Path, adapters: AdapterFactory, keys: dict[str, Keys]) -> dict[str, Path]:
    peft = adapters.peft(tiny_llama, "llama-r8-qv", rank=8, alpha=16, seed=11)
    return {
        "p8": peft,
        **{
            name: adapters.package(peft, tiny_llama, name, keys=keys[name], folder="kh")
            for name in ENCRYPTED
        },
    }


@pytest.fixture(scope="module")
def key_holder(
    keys: dict[str, Keys], packages: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[KeyHolderHarness]:
    audit = tmp_path_factory.mktemp("key-holder") / "audit.jsonl"
    harness = KeyHolderHarness(keys, [packages[n] for n in ENCRYPTED], audit, free_port())
    harness.start()
    yield harness
    harness.end_blackhole()
    harness.stop()


@pytest.fixture(scope="module")
def server(
    tiny_llama: Path,
    owner_keys: Keys,
    packages: dict[str, Path],
    key_holder: KeyHolderHarness,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[VllmServer]:
    token_file = tmp_path_factory.mktemp("host") / "token"
    token_file.write_text(TOKEN + "\n")
    args = [
        "--served-model-name",
        BASE,
        "--enable-tensafe",
        "--tensafe-trusted-keys",
        str(owner_keys.signing_pub),
        "--tensafe-key-holder",
        "remote",
        "--tensafe-key-holder-url",
        f"http://127.0.0.1:{key_holder.port}",
        "--tensafe-key-holder-token-file",
        str(token_file),
        "--tensafe-key-holder-timeout",
        str(TIMEOUT),
        "--tensafe-key-holder-retries",
        "1",
        "--max-lora-rank",
        "8",
        "--max-loras",
        "4",
        "--lora-modules",
        *(f"{name}={path}" for name, path in packages.items()),
    ]
    with VllmServer(tiny_llama, args) as srv:
        assert "--tensafe-he-secret" not in " ".join(srv.command)  # the host holds no key
        yield srv


@pytest.fixture(scope="module")
def client(server: VllmServer) -> Any:
    return openai_client(f"{server.base_url}/v1", timeout=120)


def _fails(client: Any, model: str) -> Any:
    from openai import APIStatusError

    with pytest.raises(APIStatusError) as info:
        # ignore_eos: 10 steps whatever the text, so the e-budget request needs > 10 ciphertexts
        # (one per layer per step once q and v share a tile, plus the prefill's).
        client.completions.create(
            model=model,
            prompt=PROMPTS[0],
            max_tokens=10,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
    return info.value


def _others_still_served(client: Any, reference: dict[str, Any]) -> None:
    for model in (BASE, "p8"):
        assert complete(client, model, PROMPTS[0]).token_ids == reference[model].token_ids


@pytest.fixture(scope="module")
def reference(client: Any) -> dict[str, Any]:
    return {model: complete(client, model, PROMPTS[0]) for model in (BASE, "p8", "e8")}


def test_remote_key_holder_serves_the_adapter(reference: dict[str, Any]) -> None:
    assert_same_completion(reference["e8"], reference["p8"], LOGPROB_TOL)
    assert reference["e8"].token_ids != reference[BASE].token_ids


def test_streaming_chat_through_remote_key_holder(client: Any) -> None:
    stream = client.chat.completions.create(
        model="e8",
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=6,
        temperature=0,
        stream=True,
    )
    assert sum(1 for chunk in stream if chunk.choices) >= 2


def test_revoked_adapter_fails_clearly(
    client: Any, key_holder: KeyHolderHarness, reference: dict[str, Any], server: VllmServer
) -> None:
    complete(client, "e-revoke", PROMPTS[0])  # works before
    key_holder.service.revoke("e-revoke")
    error = _fails(client, "e-revoke")
    assert error.status_code == 403
    assert "revoked" in str(error).lower() and "e-revoke" in str(error)
    _others_still_served(client, reference)
    assert complete(client, "e8", PROMPTS[0]).token_ids == reference["e8"].token_ids
    assert server.healthy()


def test_budget_exhausted_fails_clearly(
    client: Any, reference: dict[str, Any], server: VllmServer
) -> None:
    error = _fails(client, "e-budget")
    assert error.status_code == 403
    assert "budget" in str(error).lower()
    _others_still_served(client, reference)
    assert server.healthy()


def test_key_holder_down_then_back(
    client: Any, key_holder: KeyHolderHarness, reference: dict[str, Any], server: VllmServer
) -> None:
    key_holder.stop()
    error = _fails(client, "e8")
    assert error.status_code == 503
    assert "key holder" in str(error).lower()
    _others_still_served(client, reference)
    assert server.healthy()
    key_holder.start()
    assert complete(client, "e8", PROMPTS[0]).token_ids == reference["e8"].token_ids


def test_key_holder_slower_than_timeout(
    client: Any, key_holder: KeyHolderHarness, reference: dict[str, Any], server: VllmServer
) -> None:
    key_holder.blackhole()
    try:
        # A 503 is the server's answer: a hang ended by the client's own 120 s timeout would
        # raise APITimeoutError, which _fails does not accept.
        error = _fails(client, "e8")
        assert error.status_code == 503
        assert "key holder" in str(error).lower()
        _others_still_served(client, reference)
    finally:
        key_holder.end_blackhole()
        key_holder.start()
    assert complete(client, "e8", PROMPTS[0]).token_ids == reference["e8"].token_ids
    assert server.healthy()
