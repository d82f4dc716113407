"""``require_attestation`` end to end, through the guide's ``TenSafeAsyncEngine`` and through
``vllm serve --tensafe-require-attestation true``, against a remote key holder that checks TPM
quotes: a host with a software TPM in the approved boot state is served; a refused quote or a
missing TPM stops start-up with one clear line; once the key holder's policy stops accepting
the host, its encrypted requests fail (never answered from the base model).

The key holder is the stock service behind ``AttestingKeyHolder`` (tests/attestation/harness.py),
which mounts the attestation routes and checks the session before forwarding each decryption,
as the service does once it mounts them. Plain HTTP on loopback: the session is bound to the
host's token and AK (no TLS channel), so the workers' decryptions ride on the session the
start-up attestation made.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import AdapterFactory, Keys
from tests.e2e.helpers import LOGPROB_TOL, PROMPTS, assert_same_completion, complete
from vllm_tensafe.attestation import AttestationPolicy, AttestationVerifier, TpmQuoter
from vllm_tensafe.attestation.routes import AttestationRoutes
from vllm_tensafe.server_process import CPU_ARGS, CPU_ENV, VllmServer, vllm_executable

from .conftest import GOOD_BOOT, Host, host_policy
from .harness import AttestingKeyHolder, CliKeyHolder, fingerprint

pytestmark = pytest.mark.vllm

BASE = "tiny-llama"
TOKEN = "attested-host-token-0123"


@pytest.fixture(scope="module")
def booted(tpms: dict[str, Any]) -> Host:
    """Host A booted once for the module (a reboot would move its TPM to new ports)."""
    host = tpms["a"]
    host.tpm.boot(GOOD_BOOT)
    return Host(host.name, host.tpm, host.key, TpmQuoter(host.tpm.tools(), host.key.ak))


@pytest.fixture(scope="module")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("attested-host") / "token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def stock_key_holder(owner_keys: Keys, token_file: Path) -> Iterator[CliKeyHolder]:
    with CliKeyHolder(owner_keys.he_secret, token_file) as holder:
        yield holder


def _routes(host: Host, **overrides: Any) -> AttestationRoutes:
    policy = AttestationPolicy.from_mapping(
        {"hosts": {fingerprint(TOKEN): host_policy(host, max_quote_age=120, **overrides)}}
    )
    return AttestationRoutes(AttestationVerifier(policy))


@pytest.fixture(scope="module")
def key_holder(booted: Host, stock_key_holder: CliKeyHolder) -> Iterator[AttestingKeyHolder]:
    with AttestingKeyHolder(_routes(booted), {TOKEN}, upstream=stock_key_holder.url) as holder:
        yield holder


@pytest.fixture(scope="module")
def packages(tiny_llama: Path, adapters: AdapterFactory) -> dict[str, Path]:
    peft = adapters.peft(tiny_llama, "llama-r8-qv", rank=8, alpha=16, seed=11)
    return {"p8": peft, "e8": adapters.package(peft, tiny_llama, "e8")}


def _args(owner_keys: Keys, url: str, token_file: Path, tcti: str, ak: str) -> list[str]:
    return [
        "--enable-tensafe",
        "--tensafe-trusted-keys", str(owner_keys.signing_pub),
        "--tensafe-key-holder", "remote",
        "--tensafe-key-holder-url", url,
        "--tensafe-key-holder-token-file", str(token_file),
        "--tensafe-require-attestation", "true",
        "--tensafe-tpm-tcti", tcti,
        "--tensafe-tpm-ak", ak,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def server(
    tiny_llama: Path,
    owner_keys: Keys,
    packages: dict[str, Path],
    key_holder: AttestingKeyHolder,
    token_file: Path,
    booted: Host,
) -> Iterator[VllmServer]:
    args = [
        "--served-model-name", BASE,
        *_args(owner_keys, key_holder.url, token_file, booted.tpm.tcti, booted.key.ak),
        "--max-lora-rank", "8",
        "--lora-modules", *(f"{name}={path}" for name, path in packages.items()),
    ]  # fmt: skip
    with VllmServer(tiny_llama, args) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: VllmServer) -> Any:
    from openai import OpenAI

    return OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=120)


def _serve_refused(tiny_llama: Path, args: list[str]) -> str:
    import os

    clean = {k: v for k, v in os.environ.items() if not k.startswith("TENSAFE_")}
    proc = subprocess.run(
        [vllm_executable(), "serve", str(tiny_llama), *CPU_ARGS, *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**clean, **CPU_ENV},
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode != 0
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    return lines[-1] if lines else ""


GUIDE_SCRIPT = """
import asyncio, json, sys
from vllm import SamplingParams
from vllm_tensafe import TenSafeAsyncEngine, TenSafeVLLMConfig

async def run(a):
    config = TenSafeVLLMConfig(
        model=a["model"], max_model_len=512, gpu_memory_utilization=0.5, dtype="float32",
        he_lora_adapter_path=a["package"], trusted_keys=[a["pub"]],
        key_holder="remote", key_holder_url=a["url"], key_holder_token_file=a["token"],
        require_attestation=True, tpm_tcti=a["tcti"], tpm_ak=a["ak"],
    )
    engine = TenSafeAsyncEngine(config)
    await engine.initialize()
    try:
        params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
        final = None
        async for output in engine.generate(a["prompt"], "req-1", params):
            final = output
        return list(final.outputs[0].token_ids)
    finally:
        engine.shutdown()

print("TOKENS", json.dumps(asyncio.run(run(json.loads(sys.argv[1])))))
"""


def test_guide_engine_with_require_attestation_serves_the_encrypted_adapter(
    tiny_llama: Path,
    owner_keys: Keys,
    packages: dict[str, Path],
    key_holder: AttestingKeyHolder,
    token_file: Path,
    booted: Host,
) -> None:
    import json
    import os
    import sys

    from vllm_tensafe.testing import greedy_reference

    job = {
        "model": str(tiny_llama),
        "package": str(packages["e8"]),
        "pub": str(owner_keys.signing_pub),
        "url": key_holder.url,
        "token": str(token_file),
        "tcti": booted.tpm.tcti,
        "ak": booted.key.ak,
        "prompt": PROMPTS[0],
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith("TENSAFE_")}
    proc = subprocess.run(
        [sys.executable, "-c", GUIDE_SCRIPT, json.dumps(job)],
        capture_output=True,
        text=True,
        timeout=900,
        env={**env, **CPU_ENV},
        stdin=subprocess.DEVNULL,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("TOKENS ")]
    assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-4000:]
    want, _ = greedy_reference(tiny_llama, packages["p8"], PROMPTS[0], 10, stop_at_eos=False)
    assert json.loads(lines[0].removeprefix("TOKENS ")) == want
    outcomes = [(route, outcome) for route, _, outcome in key_holder.audit]
    assert ("/v1/attestation/quote", "ok") in outcomes
    assert ("/v1/decrypt", "forwarded") in outcomes


def test_attested_host_serves_the_encrypted_adapter(
    client: Any, key_holder: AttestingKeyHolder
) -> None:
    encrypted = complete(client, "e8", PROMPTS[0])
    assert_same_completion(encrypted, complete(client, "p8", PROMPTS[0]), LOGPROB_TOL)
    assert encrypted.token_ids != complete(client, BASE, PROMPTS[0]).token_ids
    outcomes = [(route, outcome) for route, _, outcome in key_holder.audit]
    assert (
        outcomes.count(("/v1/attestation/quote", "ok")) >= 2
    )  # the guide's engine, then vllm serve
    assert ("/v1/decrypt", "forwarded") in outcomes


def test_refused_quote_stops_startup(
    tiny_llama: Path,
    owner_keys: Keys,
    booted: Host,
    stock_key_holder: CliKeyHolder,
    token_file: Path,
) -> None:
    wrong = {str(i): "00" * 32 for i in GOOD_BOOT}  # the policy expects another boot
    with AttestingKeyHolder(
        _routes(booted, pcrs=wrong), {TOKEN}, upstream=stock_key_holder.url
    ) as strict:
        last = _serve_refused(
            tiny_llama, _args(owner_keys, strict.url, token_file, booted.tpm.tcti, booted.key.ak)
        )
    assert last.startswith("vllm-tensafe: error:"), last
    assert "refused the attestation" in last and "booted something" in last, last


def test_missing_tpm_stops_startup(
    tiny_llama: Path, owner_keys: Keys, key_holder: AttestingKeyHolder, token_file: Path
) -> None:
    last = _serve_refused(
        tiny_llama,
        _args(owner_keys, key_holder.url, token_file, "device:/dev/tpmrm-absent", "0x81010002"),
    )
    assert "no TPM on this host: /dev/tpmrm-absent does not exist" in last, last


def test_policy_that_stops_accepting_the_host_stops_its_decryptions(
    client: Any, key_holder: AttestingKeyHolder, booted: Host, server: VllmServer
) -> None:
    from openai import APIStatusError

    reference = complete(client, BASE, PROMPTS[0])
    # The owner withdraws the host (say, its AK leaked): a policy without the host's AK.
    other = AttestationPolicy.from_mapping(
        {
            "hosts": {
                fingerprint(TOKEN): host_policy(
                    booted, attestation_keys=[_unrelated_pem()], max_quote_age=120
                )
            }
        }
    )
    key_holder.routes.verifier.replace_policy(other)
    with pytest.raises(APIStatusError) as info:
        client.completions.create(model="e8", prompt=PROMPTS[0], max_tokens=4, temperature=0)
    assert "no longer accepts" in str(info.value), str(info.value)
    assert ("/v1/decrypt", "attestation_required") in [
        (route, outcome) for route, _, outcome in key_holder.audit
    ]
    # The base model is still served; the adapter's request was not answered from it.
    assert complete(client, BASE, PROMPTS[0]).token_ids == reference.token_ids
    assert server.healthy()


def _unrelated_pem() -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    return (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
