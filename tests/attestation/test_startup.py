"""The host's start-up check with require_attestation (``check_key_holder``, what ``vllm serve``
and the guide's API run before loading the model) against the real key holder: a good host
passes and its packages are checked over the attested connection; no TPM, a refused quote, or
a key holder that does not check quotes stops start-up with one clear line; a host that does
not attest is stopped by a key holder that requires it. Also ``vllm-tensafe key-holder serve
--attestation-policy`` and ``vllm-tensafe attestation attest``."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import AdapterFactory, Keys, adapter_keys
from vllm_tensafe.errors import (
    AttestationError,
    AttestationRequiredError,
    ConfigError,
    PcrMismatchError,
    TpmError,
)
from vllm_tensafe.keyholder.remote import check_key_holder
from vllm_tensafe.settings import TenSafeSettings

from .conftest import Host, a_policy, write_policy
from .service import TOKEN, RunningKeyHolder

MakeKeyHolder = Callable[..., RunningKeyHolder]


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "host.token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture(autouse=True)
def fresh_gate(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test is a new host process: the start-up gate has not run."""
    from vllm_tensafe.attestation import client

    monkeypatch.setattr(client, "_gate_passed", False)


def settings_for(
    running: RunningKeyHolder, token_file: Path, host: Host | None, *, tcti: str | None = None
) -> TenSafeSettings:
    attest = host is not None or tcti is not None
    return TenSafeSettings(
        key_holder="remote",
        key_holder_url=running.url,
        key_holder_token_file=token_file,
        key_holder_ca=running.ca,
        require_attestation=attest,
        tpm_tcti=tcti or (host.tpm.tcti if host else "device:/dev/tpmrm0"),
        tpm_ak=host.key.ak if host else ("0x81010002" if attest else None),
    )


@pytest.fixture(scope="module")
def package(tiny_llama: Path, adapters: AdapterFactory, artifacts: Path, owner_keys: Keys) -> Any:
    """A real package (its own CKKS key), and the key holder's adapter policy for it."""
    from vllm_tensafe.he import SecretKeySet
    from vllm_tensafe.keyholder.server import AdapterPolicy
    from vllm_tensafe.tssp import TrustStore

    keys = adapter_keys(artifacts, owner_keys, "att-startup")
    peft = adapters.peft(tiny_llama, "llama-r8-qv", rank=8, alpha=16, seed=11)
    path = adapters.package(peft, tiny_llama, "att-startup", keys=keys, folder="att")

    def key_holder_side() -> tuple[list[Any], Any]:
        trust = TrustStore.from_files([str(keys.signing_pub)])
        return [SecretKeySet.load(keys.he_secret)], AdapterPolicy.from_packages([path], trust)

    return path, key_holder_side


def test_good_host_passes_and_its_packages_are_checked_attested(
    make_key_holder: MakeKeyHolder, host_a: Host, token_file: Path, package: Any
) -> None:
    path, key_holder_side = package
    secrets, adapters = key_holder_side()
    running = make_key_holder(a_policy(host_a), secrets, adapters)
    health = check_key_holder(settings_for(running, token_file, host_a), [str(path)])
    assert health["attestation"] is True
    assert running.outcomes("attestation_quote") == ["ok"]
    (check,) = running.events("check")
    assert check["outcome"] == "ok" and check["adapter"] == "att-startup"
    # Same connection as the quote: the check rode on the session it bound.
    assert check["client"] == running.events("attestation_quote")[0]["client"]


def test_host_without_attestation_is_stopped_by_a_key_holder_that_requires_it(
    make_key_holder: MakeKeyHolder, host_a: Host, token_file: Path, package: Any
) -> None:
    path, key_holder_side = package
    running = make_key_holder(a_policy(host_a), *key_holder_side())
    with pytest.raises(AttestationRequiredError) as info:
        check_key_holder(settings_for(running, token_file, None), [str(path)])
    message = str(info.value)
    assert "decrypts only for attested hosts" in message
    assert "--tensafe-require-attestation true" in message and "\n" not in message


def test_no_tpm_stops_startup(
    make_key_holder: MakeKeyHolder, host_a: Host, token_file: Path, tmp_path: Path
) -> None:
    running = make_key_holder(a_policy(host_a))
    settings = settings_for(running, token_file, None, tcti=f"device:{tmp_path}/tpmrm0")
    with pytest.raises(TpmError, match=r"no TPM on this host: .*tpmrm0 does not exist"):
        check_key_holder(settings, [])
    assert running.events("attestation_nonce") == []  # refused before asking the key holder


def test_refused_quote_stops_startup(
    make_key_holder: MakeKeyHolder, host_a: Host, token_file: Path
) -> None:
    running = make_key_holder(a_policy(host_a))
    host_a.tpm.extend(7, b"secure boot: disabled")
    with pytest.raises(PcrMismatchError) as info:
        check_key_holder(settings_for(running, token_file, host_a), [])
    assert f"key holder {running.url} refused the attestation: host 'host-a' booted" in str(
        info.value
    )
    assert running.outcomes("attestation_quote") == ["attestation_pcr_mismatch"]


def test_key_holder_without_attestation_stops_startup(
    make_key_holder: MakeKeyHolder, host_a: Host, token_file: Path
) -> None:
    running = make_key_holder(None)
    with pytest.raises(AttestationError, match=r"does not check TPM attestation .*--attestation"):
        check_key_holder(settings_for(running, token_file, host_a), [])


def test_startup_gate_attests_once_per_process(
    make_key_holder: MakeKeyHolder, host_a: Host, token_file: Path
) -> None:
    from vllm_tensafe.attestation.client import startup_gate

    running = make_key_holder(a_policy(host_a))
    settings = settings_for(running, token_file, host_a)
    startup_gate(settings)
    startup_gate(settings)  # vllm serve's check and the engine-config hook in one process
    assert running.outcomes("attestation_quote") == ["ok"]
    startup_gate(settings_for(running, token_file, None))  # attestation off: nothing to do


def test_attest_command(
    make_key_holder: MakeKeyHolder,
    host_a: Host,
    token_file: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from vllm_tensafe.cli import main as tensafe_cli

    running = make_key_holder(a_policy(host_a))
    for name in [n for n in os.environ if n.startswith("TENSAFE_")]:
        monkeypatch.delenv(name)
    for key, value in {
        "TENSAFE_KEY_HOLDER_URL": running.url,
        "TENSAFE_KEY_HOLDER_TOKEN_FILE": str(token_file),
        "TENSAFE_KEY_HOLDER_CA": str(running.ca),
        "TENSAFE_TPM_TCTI": host_a.tpm.tcti,
        "TENSAFE_TPM_AK": host_a.key.ak,
    }.items():
        monkeypatch.setenv(key, value)
    assert tensafe_cli(["attestation", "attest"]) == 0
    out = capsys.readouterr().out
    assert "attested: host host-a" in out and "(bound to the TLS connection)" in out


# --- vllm-tensafe key-holder serve --attestation-policy -------------------------------------------


def _serve_args(tmp_path: Path, package: Path, keys: Keys, *extra: str) -> Any:
    from vllm_tensafe.cli import build_parser

    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKEN} decrypt host=host-a\n")
    tokens.chmod(0o600)
    return build_parser().parse_args(
        ["key-holder", "serve", "--he-secret", str(keys.he_secret),
         "--adapters", str(package), "--trusted-keys", str(keys.signing_pub),
         "--token-file", str(tokens), "--audit-log", str(tmp_path / "audit.jsonl"),
         "--port", "0", *extra]
    )  # fmt: skip


def test_serve_option_loads_the_policy_and_refuses_a_bad_one(
    host_a: Host, tmp_path: Path, package: Any, artifacts: Path, owner_keys: Keys
) -> None:
    from vllm_tensafe.cli.key_holder import build_service

    keys = adapter_keys(artifacts, owner_keys, "att-startup")
    path, _ = package
    policy = write_policy(tmp_path / "attestation.json", a_policy(host_a))
    args = _serve_args(tmp_path, path, keys, "--attestation-policy", str(policy))
    service = build_service(args)
    try:
        assert service.attestation is not None and service.health()["attestation"] is True
        assert service.attestation.verifier.policy.host("host-a") is not None
    finally:
        service.close()
    (tmp_path / "broken.toml").write_text("[hosts.x]\npcrs = 3\n")
    args = _serve_args(tmp_path, path, keys, "--attestation-policy", str(tmp_path / "broken.toml"))
    with pytest.raises(ConfigError, match=r"attestation policy .*broken.toml: hosts.x"):
        build_service(args)
