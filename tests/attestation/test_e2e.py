"""``require_attestation=True`` end to end, against the real remote key holder.

The owner's side as a user runs it: ``vllm-tensafe attestation enrol`` on the host (a real
software TPM in an approved boot state) prints the policy entry; ``vllm-tensafe key-holder
cert`` makes the TLS certificates; ``vllm-tensafe key-holder serve --attestation-policy`` runs
the key holder. The host's side: the guide's ``TenSafeVLLMConfig(require_attestation=True)``
and ``TenSafeVLLMServer``, which builds vLLM's own OpenAI server from ``vllm serve``'s own
argument parser (``--tensafe-*`` flags, start-up check, engine hooks), queried with the
official openai client. Its start-up check attests on its connection, and the engine's worker
attests again on its own TLS connection before its first decryption (the key holder binds each
session to its connection). One vLLM server for the module; ``vllm serve`` itself is run for
the refusals, which stop start-up before vLLM loads the model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import AdapterFactory, Keys, adapter_keys
from tests.e2e.helpers import PROMPTS, REFERENCE_LOGPROB_TOL, complete
from tests.e2e.test_examples_serving import ENV, Background
from tests.support.clients import openai_client
from tests.support.server_process import CPU_ARGS, CPU_ENV, free_port, vllm_executable
from vllm_tensafe.attestation import TpmQuoter

from .conftest import GOOD_BOOT, Host, _unrelated_pem

pytestmark = pytest.mark.vllm

TENSAFE = str(Path(sys.executable).with_name("vllm-tensafe"))
TOKEN = "gpu-node-1-token-0123456789abcdef"
HOST = "gpu-node-1"
ADAPTER = "att-e8"


@dataclass
class Owner:
    """What the adapter owner runs: the key holder, its policy and audit log, the TLS CA."""

    root: Path
    key_holder: Background
    url: str
    policy: Path
    good_policy: str
    token_file: Path

    @property
    def ca(self) -> Path:
        return self.root / "tls" / "ca.pem"

    def events(self, route: str) -> list[dict[str, Any]]:
        lines = (self.root / "audit.jsonl").read_text().splitlines()
        return [e for e in (json.loads(line)["event"] for line in lines) if e["route"] == route]

    def set_policy(self, text: str) -> None:
        tmp = self.policy.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.policy)  # one step: the key holder never reads half a file


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [TENSAFE, *args], capture_output=True, text=True, timeout=300, env=ENV, check=False
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def booted(tpms: dict[str, Any]) -> Host:
    """Host A booted once for the module (a reboot would move its TPM to new ports)."""
    host = tpms["a"]
    host.tpm.boot(GOOD_BOOT)
    return Host(host.name, host.tpm, host.key, TpmQuoter(host.tpm.tools(), host.key.ak))


@pytest.fixture(scope="module")
def keys(artifacts: Path, owner_keys: Keys) -> Keys:
    return adapter_keys(artifacts, owner_keys, ADAPTER)


@pytest.fixture(scope="module")
def packages(tiny_llama: Path, adapters: AdapterFactory, keys: Keys) -> dict[str, Path]:
    peft = adapters.peft(tiny_llama, "llama-r8-qv", rank=8, alpha=16, seed=11)
    return {
        "peft": peft,
        "e8": adapters.package(peft, tiny_llama, ADAPTER, keys=keys, folder="att"),
    }


@pytest.fixture(scope="module")
def owner(
    booted: Host, keys: Keys, packages: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Owner]:
    root = tmp_path_factory.mktemp("owner")
    # On the host, in the approved boot: the policy entry of its (already created) AK.
    entry = _cli("attestation", "enrol", "--host", HOST, "--out", str(root / f"{HOST}.ak.pem"),
                 "--tcti", booted.tpm.tcti, "--handle", booted.key.ak, "--reuse",
                 "--pcrs", "sha256:0,4,7").stdout  # fmt: skip
    good = f"nonce_lifetime = 120\n\n{entry}"  # quotes up to 60 s old, sessions of 3600 s
    policy = root / "attestation.toml"
    policy.write_text(good)
    _cli("attestation", "check-policy", str(policy))
    _cli("key-holder", "cert", "--out", str(root / "tls"), "--host", "127.0.0.1")
    tokens = root / "tokens"
    tokens.write_text(f"{TOKEN} decrypt host={HOST}\n")
    tokens.chmod(0o600)
    token_file = root / "host.token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    log = root / "key-holder.log"
    key_holder = Background(
        [TENSAFE, "key-holder", "serve", "--he-secret", str(keys.he_secret),
         "--adapters", str(packages["e8"]), "--trusted-keys", str(keys.signing_pub),
         "--token-file", str(tokens), "--audit-log", str(root / "audit.jsonl"),
         "--tls-cert", str(root / "tls" / "server.pem"),
         "--tls-key", str(root / "tls" / "server.key"),
         "--attestation-policy", str(policy), "--port", "0"],
        log,
    )  # fmt: skip
    try:
        url = _listening_url(key_holder, log)
        yield Owner(root, key_holder, url, policy, good, token_file)
    finally:
        key_holder.stop()


def _listening_url(process: Background, log: Path, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in log.read_text(errors="replace").splitlines():
            if "listening on " in line:
                assert "TPM attestation required, policy" in line, line
                return line.split("listening on ", 1)[1].split()[0]
        if process.process.poll() is not None:
            raise AssertionError(f"the key holder exited:\n{process.tail()}")
        time.sleep(0.2)
    raise AssertionError(f"the key holder did not start:\n{process.tail()}")


SERVER_SCRIPT = """
import asyncio, json, sys
from vllm_tensafe import TenSafeVLLMConfig, TenSafeVLLMServer
from tests.support.clients import openai_client

a = json.loads(sys.argv[1])
config = TenSafeVLLMConfig(
    model=a["model"], max_model_len=512, gpu_memory_utilization=0.5, dtype="float32",
    he_lora_adapter_path=a["package"], adapter_name=a["name"], trusted_keys=[a["pub"]],
    key_holder="remote", key_holder_url=a["url"], key_holder_token_file=a["token"],
    require_attestation=True, tpm_tcti=a["tcti"], tpm_ak=a["ak"],
)
# The guide's config has no CA field: a vllm serve flag, through vLLM's own parser.
server = TenSafeVLLMServer(config, extra_cli_args=("--tensafe-key-holder-ca", a["ca"]))
asyncio.run(server.serve(host="127.0.0.1", port=a["port"]))
"""


@pytest.fixture(scope="module")
def server(
    tiny_llama: Path,
    keys: Keys,
    packages: dict[str, Path],
    owner: Owner,
    booted: Host,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[str]:
    port = free_port()
    job = {
        "model": str(tiny_llama), "package": str(packages["e8"]), "name": "e8",
        "pub": str(keys.signing_pub), "url": owner.url, "token": str(owner.token_file),
        "ca": str(owner.ca), "tcti": booted.tpm.tcti, "ak": booted.key.ak, "port": port,
    }  # fmt: skip
    env = {k: v for k, v in ENV.items() if not k.startswith("TENSAFE_")}
    env["TENSAFE_VERSION_FILE"] = str(tmp_path_factory.mktemp("host") / "versions.json")
    log = tmp_path_factory.mktemp("logs") / "guide-server.log"
    process = Background([sys.executable, "-c", SERVER_SCRIPT, json.dumps(job)], log, env)
    try:
        process.wait_http(f"http://127.0.0.1:{port}/health", timeout=600)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.stop()


@pytest.fixture(scope="module")
def client(server: str) -> Any:
    return openai_client(f"{server}/v1", timeout=300)


def test_attested_host_serves_the_encrypted_adapter(
    client: Any, owner: Owner, tiny_llama: Path, packages: dict[str, Path]
) -> None:
    from tests.support.builders import greedy_reference

    encrypted = complete(client, "e8", PROMPTS[0])
    want, logprobs = greedy_reference(
        tiny_llama, packages["peft"], PROMPTS[0], 10, stop_at_eos=False
    )
    assert list(encrypted.token_ids) == want
    worst = max(abs(a - b) for a, b in zip(encrypted.logprobs, logprobs, strict=True))
    assert worst <= REFERENCE_LOGPROB_TOL
    assert encrypted.token_ids != complete(client, str(tiny_llama), PROMPTS[0]).token_ids
    quotes = [e for e in owner.events("attestation_quote") if e["outcome"] == "ok"]
    # The start-up check, then the worker on its own connection: each channel-bound.
    assert len({e["client"] for e in quotes}) >= 2 and all(e["channel_bound"] for e in quotes)
    assert {e["attested_as"] for e in quotes} == {HOST}
    decrypts = [e for e in owner.events("decrypt") if e["outcome"] == "ok"]
    assert decrypts and {e["client"] for e in decrypts} <= {e["client"] for e in quotes}
    checks = owner.events("check")  # the start-up check of the package, attested first
    assert checks and all(e["outcome"] == "ok" for e in checks)
    assert checks[0]["client"] == quotes[0]["client"]


def test_policy_that_stops_accepting_the_host_stops_its_decryptions(
    client: Any, owner: Owner, tiny_llama: Path, booted: Host
) -> None:
    from openai import APIStatusError

    base = str(tiny_llama)
    reference = complete(client, base, PROMPTS[1])
    served = complete(client, "e8", PROMPTS[1])
    # The owner withdraws the host's AK (say, it leaked): an edit of the policy file.
    withdrawn = owner.good_policy.replace(f'"{HOST}.ak.pem"', json.dumps(_unrelated_pem()))
    assert withdrawn != owner.good_policy
    owner.set_policy(withdrawn)
    try:
        with pytest.raises(APIStatusError) as info:
            client.completions.create(model="e8", prompt=PROMPTS[1], max_tokens=4, temperature=0)
        assert info.value.status_code == 403
        assert "refused the attestation" in str(info.value), str(info.value)
        assert "does not accept" in str(info.value), str(info.value)
        refused = [e for e in owner.events("decrypt") if e["outcome"] != "ok"]
        assert refused and "no longer accepts host" in refused[0]["cause"]
        assert "attestation_unknown_key" in [
            e["outcome"] for e in owner.events("attestation_quote")
        ]
        # The base model is still served; the adapter's request was not answered from it.
        assert complete(client, base, PROMPTS[1]).token_ids == reference.token_ids
    finally:
        owner.set_policy(owner.good_policy)
    # The AK enrolled again: the host attests once more and is served again.
    assert complete(client, "e8", PROMPTS[1]).token_ids == served.token_ids


def _serve_refused(tiny_llama: Path, owner: Owner, keys: Keys, tcti: str, ak: str) -> str:
    clean = {k: v for k, v in ENV.items() if not k.startswith("TENSAFE_")}
    proc = subprocess.run(
        [vllm_executable(), "serve", str(tiny_llama), *CPU_ARGS, "--enable-tensafe",
         "--tensafe-trusted-keys", str(keys.signing_pub),
         "--tensafe-key-holder", "remote", "--tensafe-key-holder-url", owner.url,
         "--tensafe-key-holder-token-file", str(owner.token_file),
         "--tensafe-key-holder-ca", str(owner.ca),
         "--tensafe-require-attestation", "true",
         "--tensafe-tpm-tcti", tcti, "--tensafe-tpm-ak", ak],
        capture_output=True, text=True, timeout=600, env={**clean, **CPU_ENV},
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.returncode != 0
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert "Initializing a V1 LLM engine" not in proc.stdout + proc.stderr  # before the model
    return lines[-1] if lines else ""


def test_vllm_serve_stops_when_the_key_holder_refuses_the_quote(
    tiny_llama: Path, owner: Owner, keys: Keys, booted: Host
) -> None:
    # Last but one in the module: booting something else changes this TPM's PCRs for good.
    booted.tpm.extend(7, b"secure boot: disabled")
    last = _serve_refused(tiny_llama, owner, keys, booted.tpm.tcti, booted.key.ak)
    assert last.startswith("vllm-tensafe: error: key holder"), last
    assert f"refused the attestation: host '{HOST}' booted something" in last, last


def test_vllm_serve_stops_without_a_tpm(tiny_llama: Path, owner: Owner, keys: Keys) -> None:
    last = _serve_refused(tiny_llama, owner, keys, "device:/dev/tpmrm-absent", "0x81010002")
    assert last.startswith("vllm-tensafe: error: no TPM on this host"), last
    assert "/dev/tpmrm-absent does not exist" in last, last
