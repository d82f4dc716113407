"""Real software TPMs (Debian's swtpm) for the attestation tests, one pair per test module.

Host A has an RSA attestation key (tpm2_createak's default), host B an ECC P-256 one; host A's
TPM also holds a rogue AK that no policy enrols. Every test starts from a fresh "boot" with
known measurements, so the PCR values are known independently of the TPM (expected_pcrs).
"""

from __future__ import annotations

from collections.abc import Iterator
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
