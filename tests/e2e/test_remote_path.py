"""The documented remote path, end to end, as a new user runs it from examples/README.md.

Owner: examples/pack_adapter.sh twice (two adapters, a CKKS key each), then
``examples/remote_key_holder.sh owner`` (TLS with a certificate made by
``vllm-tensafe key-holder cert``, tokens, audit log, revocation file). Host:
``examples/remote_key_holder.sh host`` with extra vLLM flags after ``--`` (one more adapter,
one LoRA slot so adapters get evicted). Queried with the official openai client; revoked with
``vllm-tensafe key-holder revoke`` (403), un-revoked, answering again. One vLLM server for the
module; the start-up check's refusal runs a second ``vllm serve`` that stops before the model
loads.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.test_examples_serving import ENV, EXAMPLES, Background, _get_json, _run
from tests.support.clients import openai_client
from tests.support.server_process import CPU_ARGS, free_port

pytestmark = pytest.mark.vllm

TENSAFE = str(Path(sys.executable).with_name("vllm-tensafe"))


@dataclass
class Deployment:
    out: Path
    model: Path
    kh_url: str
    url: str
    owner: Background
    host: Background

    @property
    def state(self) -> Path:
        return self.out / "key-holder"

    def admin(self, action: str, *args: str) -> subprocess.CompletedProcess[str]:
        """The documented command: vllm-tensafe key-holder ACTION ... --url --token-file --ca."""
        return subprocess.run(
            [TENSAFE, "key-holder", action, *args, "--url", self.kh_url,
             "--token-file", str(self.state / "admin.token"),
             "--ca", str(self.state / "tls" / "ca.pem")],
            capture_output=True, text=True, timeout=120, env=ENV, check=False,
        )  # fmt: skip


def _wait_https(background: Background, url: str, ca: Path, timeout: float = 120) -> None:
    import ssl
    import time
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if background.process.poll() is not None:
            raise AssertionError(
                f"exited with {background.process.returncode}:\n{background.tail()}"
            )
        try:
            context = ssl.create_default_context(cafile=str(ca)) if ca.is_file() else None
            if context is not None:
                with urllib.request.urlopen(url, timeout=2, context=context):
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {timeout:.0f}s:\n{background.tail()}")


@pytest.fixture(scope="module")
def owner_out(demo: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.support.builders import make_adapter

    out = tmp_path_factory.mktemp("owner")
    script = str(EXAMPLES / "pack_adapter.sh")
    _run(["bash", script, str(demo.demo_adapter_dir), str(demo.model_dir), str(out), "demo"])
    other = make_adapter(demo.model_dir, out.parent / "other-peft", seed=5)
    _run(["bash", script, str(other), str(demo.model_dir), str(out), "other"])
    return out


@pytest.fixture(scope="module")
def deployment(
    demo: Any, owner_out: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    logs = tmp_path_factory.mktemp("logs")
    kh_port, port = free_port(), free_port()
    script = str(EXAMPLES / "remote_key_holder.sh")
    owner = Background(
        ["bash", script, "owner", str(owner_out), str(kh_port)], logs / "key_holder.log"
    )
    kh_url = f"https://127.0.0.1:{kh_port}"
    host: Background | None = None
    try:
        _wait_https(owner, kh_url + "/health", owner_out / "key-holder" / "tls" / "ca.pem")
        host = Background(
            ["bash", script, "host", str(demo.model_dir), str(owner_out / "demo.tssp"),
             str(owner_out / "owner.pub"), kh_url, str(owner_out / "key-holder" / "host.token"),
             str(owner_out / "key-holder" / "tls" / "ca.pem"), str(port), "--", *CPU_ARGS,
             # Appended, not replacing the encrypted adapter: one more, and a single LoRA
             # slot in the worker's cache so that serving one evicts the other.
             "--lora-modules", f"other={owner_out / 'other.tssp'}",
             "--max-loras", "1", "--max-cpu-loras", "1"],
            logs / "host.log",
        )  # fmt: skip
        host.wait_http(f"http://127.0.0.1:{port}/health")
        yield Deployment(owner_out, demo.model_dir, kh_url, f"http://127.0.0.1:{port}", owner, host)
    finally:
        if host is not None:
            host.stop()
        owner.stop()


@pytest.fixture(scope="module")
def client(deployment: Deployment) -> Any:
    return openai_client(f"{deployment.url}/v1", timeout=300)


def _chat(client: Any, model: str) -> str:
    reply = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "What is the secret word?"}],
        max_tokens=16,
        temperature=0,
    )
    return reply.choices[0].message.content or ""


def _status(deployment: Deployment) -> dict[str, dict[str, Any]]:
    status = _get_json(f"{deployment.url}/v1/tensafe/adapters")
    assert status["key_holder"] == "remote"
    return {a["name"]: a for a in status["adapters"]}


def test_encrypted_adapter_through_a_tls_key_holder(deployment: Deployment, client: Any) -> None:
    from tests.support.builders import DEMO_ANSWER

    assert _chat(client, "demo").strip() == DEMO_ANSWER
    models = {m.id for m in client.models.list().data}
    assert {"demo", "other"} <= models  # the extra --lora-modules added, not replaced
    host_log = deployment.host.log.read_text(errors="replace")
    assert "accepts the packages" in host_log  # the start-up check ran
    assert "Loading encrypted adapter 'demo' in this worker" in host_log  # the work is named


def test_status_route_keeps_adapters_after_eviction(deployment: Deployment, client: Any) -> None:
    _chat(client, "demo")
    before = _status(deployment)["demo"]["usage"]["decrypt_calls"]
    _chat(client, "other")  # one slot: demo is evicted
    status = _status(deployment)
    assert set(status) == {"demo", "other"}
    assert status["demo"]["resident"] is False and status["other"]["resident"] is True
    assert status["demo"]["usage"]["decrypt_calls"] == before  # still counted
    _chat(client, "demo")  # reloaded: its counters continue
    assert _status(deployment)["demo"]["usage"]["decrypt_calls"] > before


def test_revoke_then_unrevoke_with_the_documented_command(
    deployment: Deployment, client: Any
) -> None:
    from openai import PermissionDeniedError

    from tests.support.builders import DEMO_ANSWER

    revoked = deployment.admin("revoke", "demo")
    assert revoked.returncode == 0, revoked.stderr
    assert json.loads(revoked.stdout)["revoked"] is True
    with pytest.raises(PermissionDeniedError) as info:
        _chat(client, "demo")
    error = info.value
    assert error.status_code == 403
    body = error.body if isinstance(error.body, dict) else {}
    assert body.get("type") == "Forbidden", body  # not "InternalServerError"
    assert "revoked" in str(error) and "demo" in str(error)
    assert "Nothing was generated from the base model" in str(error)
    assert _status(deployment)["demo"]["revoked"] is True
    assert _chat(client, "other")  # other adapters are still served

    unrevoked = deployment.admin("unrevoke", "demo")
    assert unrevoked.returncode == 0, unrevoked.stderr
    assert _chat(client, "demo").strip() == DEMO_ANSWER
    assert _status(deployment)["demo"]["revoked"] is False
    listed = json.loads(deployment.admin("status").stdout)["adapters"]
    assert {a["adapter"] for a in listed} == {"demo", "other"}


def test_key_holder_log_and_audit(deployment: Deployment) -> None:
    log = deployment.owner.log.read_text(errors="replace")
    host_token = (deployment.state / "host.token").read_text().strip()
    assert "Traceback" not in log and host_token not in log
    verified = subprocess.run(
        [TENSAFE, "key-holder", "audit", "verify", str(deployment.state / "audit.jsonl")],
        capture_output=True, text=True, env=ENV, check=False,
    )  # fmt: skip
    assert verified.returncode == 0 and "chain intact" in verified.stdout


def test_start_up_refused_before_the_model_loads(deployment: Deployment, tmp_path: Path) -> None:
    """A host whose CA does not match the key holder's certificate stops at once."""
    wrong = tmp_path / "tls"
    subprocess.run([TENSAFE, "key-holder", "cert", "--out", str(wrong), "--host", "127.0.0.1"],
                   check=True, capture_output=True, env=ENV)  # fmt: skip
    proc = subprocess.run(
        ["bash", str(EXAMPLES / "remote_key_holder.sh"), "host", str(deployment.model),
         str(deployment.out / "demo.tssp"), str(deployment.out / "owner.pub"), deployment.kh_url,
         str(deployment.state / "host.token"), str(wrong / "ca.pem"), str(free_port()),
         "--", *CPU_ARGS],
        capture_output=True, text=True, timeout=600, env=ENV, check=False,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    last = [line for line in out.splitlines() if line.strip()][-1]
    assert proc.returncode != 0
    assert last.startswith("vllm-tensafe: error:") and "is not trusted by" in last, last
    assert "Initializing a V1 LLM engine" not in out  # refused before vLLM started the engine
