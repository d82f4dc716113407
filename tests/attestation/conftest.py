"""Real software TPMs (Debian's swtpm) for the attestation tests, one pair per test module.

Host A has an RSA attestation key (tpm2_createak's default), host B an ECC P-256 one; host A's
TPM also holds a rogue AK that no policy enrols. Every test starts from a fresh "boot" with
known measurements, so the PCR values are known independently of the TPM (expected_pcrs).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from vllm_tensafe.attestation import (
    AttestationPolicy,
    AttestationVerifier,
    EnrolledKey,
    TpmQuoter,
    create_attestation_key,
)
from vllm_tensafe.attestation.swtpm import APT_PACKAGES, SoftwareTpm, expected_pcrs, missing_tools

# A measured boot: firmware, boot loader and kernel, Secure Boot state (PC Client PCR usage).
GOOD_BOOT: dict[int, list[bytes]] = {
    0: [b"firmware 1.2.3"],
    4: [b"boot loader", b"kernel 6.1.0-tensafe"],
    7: [b"secure boot: enabled, db=vendor"],
}
AK_A, AK_B, AK_ROGUE = "0x81010002", "0x81010003", "0x81010004"


@dataclass
class Host:
    name: str
    tpm: SoftwareTpm
    key: EnrolledKey
    quoter: TpmQuoter


@dataclass
class FakeClock:
    """Monotonic seconds that only move when a test says so: no sleeps, no load effects."""

    now: float = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def _need_swtpm() -> None:
    missing = missing_tools()
    if missing:
        pytest.skip(
            f"software TPM tests need Debian's {', '.join(APT_PACKAGES)} "
            f"(apt-get install {' '.join(APT_PACKAGES)}); missing: {', '.join(missing)}"
        )


def _host(name: str, state: Path, handle: str, key_type: str) -> tuple[SoftwareTpm, Host]:
    tpm = SoftwareTpm(state).start()
    key = create_attestation_key(tpm.tools(), handle, key_type=key_type)
    return tpm, Host(name, tpm, key, TpmQuoter(tpm.tools(), handle))


@pytest.fixture(scope="module")
def tpms(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    _need_swtpm()
    started: list[SoftwareTpm] = []
    try:
        tpm_a, host_a = _host("host-a", tmp_path_factory.mktemp("tpm-a"), AK_A, "rsa")
        started.append(tpm_a)
        rogue = create_attestation_key(tpm_a.tools(), AK_ROGUE, key_type="rsa")
        tpm_b, host_b = _host("host-b", tmp_path_factory.mktemp("tpm-b"), AK_B, "ecc")
        started.append(tpm_b)
        yield {"a": host_a, "b": host_b, "rogue": rogue}
    finally:
        for tpm in started:
            tpm.stop()


def _rebind(host: Host) -> Host:
    # boot() restarts swtpm on new ports: the quoter follows the TCTI.
    return Host(host.name, host.tpm, host.key, TpmQuoter(host.tpm.tools(), host.key.ak))


@pytest.fixture
def host_a(tpms: dict[str, Any]) -> Host:
    tpms["a"].tpm.boot(GOOD_BOOT)
    return _rebind(tpms["a"])


@pytest.fixture
def host_b(tpms: dict[str, Any]) -> Host:
    tpms["b"].tpm.boot(GOOD_BOOT)
    return _rebind(tpms["b"])


@pytest.fixture
def rogue(tpms: dict[str, Any], host_a: Host) -> TpmQuoter:
    """A quoter with the rogue AK in host A's (booted) TPM."""
    return TpmQuoter(host_a.tpm.tools(), tpms["rogue"].ak)


def host_policy(host: Host, **overrides: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "attestation_keys": [host.key.key.pem()],
        "pcrs": {str(i): v.hex() for i, v in expected_pcrs(GOOD_BOOT).items()},
        "max_quote_age": 30,
        "session_lifetime": 600,
    }
    entry.update(overrides)
    return entry


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def verifier(host_a: Host, host_b: Host, clock: FakeClock) -> AttestationVerifier:
    policy = AttestationPolicy.from_mapping(
        {
            "nonce_lifetime": 120,
            "hosts": {"host-a": host_policy(host_a), "host-b": host_policy(host_b)},
        }
    )
    return AttestationVerifier(policy, clock=clock)


# --- the real key holder with attestation --------------------------------------------------------


@pytest.fixture(scope="session")
def sql() -> Any:
    """One adapter of the key holder, its CKKS key and a ciphertext to decrypt."""
    from tests.key_holder.conftest import _adapter

    return _adapter("sql-adapter", 1)


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``vllm-tensafe key-holder cert``'s CA and server certificate for 127.0.0.1."""
    from vllm_tensafe.keyholder.server.tls import make_certificates

    return make_certificates(tmp_path_factory.mktemp("tls"), ["127.0.0.1"])


def write_policy(path: Path, data: dict[str, Any]) -> Path:
    """Write a policy file in one step (a new inode: the key holder sees the change)."""
    import json
    import os

    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)
    return path


@pytest.fixture
def make_key_holder(
    tmp_path: Path, sql: Any, tls_files: dict[str, Path], clock: FakeClock
) -> Iterator[Callable[..., Any]]:
    """make_key_holder(attestation policy mapping | None, [secrets, adapter policy], **kwargs)
    -> a started key holder serving TLS (for sql-adapter unless told otherwise), its
    attestation policy in a file it watches, its verifier on the test's clock."""
    from tests.attestation.service import RunningKeyHolder, token_store
    from tests.key_holder.conftest import policy_for
    from vllm_tensafe.attestation.routes import AttestationRoutes
    from vllm_tensafe.keyholder.server import KeyHolderService, TLSConfig

    started: list[Any] = []

    def make(
        policy: dict[str, Any] | None,
        secrets: list[Any] | None = None,
        adapters: Any = None,
        **kwargs: Any,
    ) -> RunningKeyHolder:
        routes = None
        if policy is not None:
            path = write_policy(tmp_path / "attestation.json", policy)
            verifier = AttestationVerifier(AttestationPolicy.load(path), clock=clock)
            routes = AttestationRoutes(verifier, path)
        audit = tmp_path / f"audit-{len(started)}.jsonl"
        service = KeyHolderService(
            secrets or [sql.secret],
            adapters or policy_for(sql),
            token_store(),
            audit_log=audit,
            tls=TLSConfig(tls_files["server"], tls_files["server_key"]),
            attestation=routes,
            **kwargs,
        )
        service.start()
        running = RunningKeyHolder(service, tls_files["ca"], audit)
        started.append(running)
        return running

    yield make
    for running in started:
        running.close()


def a_policy(host: Host, **overrides: Any) -> dict[str, Any]:
    """Host A's policy as its file says it (host identity: the token's host label)."""
    top = {k: overrides.pop(k) for k in ("unlisted_hosts", "nonce_lifetime") if k in overrides}
    return {"hosts": {"host-a": host_policy(host, **overrides)}, **top}


def _unrelated_pem() -> str:
    """A P-256 public key no TPM here holds (an AK the policy accepts instead of the host's)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    return (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
