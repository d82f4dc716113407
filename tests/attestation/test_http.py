"""The attestation exchange over real HTTP(S) with a real software TPM: the routes a key holder
mounts, the host's attest()/Attester, and the start-up gate's refusals."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from vllm_tensafe.attestation import AttestationPolicy, AttestationVerifier
from vllm_tensafe.attestation.client import (
    Attester,
    JsonPoster,
    attest,
    check_at_startup,
    is_attestation_refusal,
)
from vllm_tensafe.attestation.routes import AttestationRoutes
from vllm_tensafe.errors import AttestationError, PcrMismatchError, TpmError
from vllm_tensafe.settings import TenSafeSettings

from .conftest import FakeClock, Host, host_policy
from .harness import AttestingKeyHolder, CliKeyHolder, fingerprint

TOKEN = "host-a-token-0123456789"


def _tls(tmp: Path) -> tuple[ssl.SSLContext, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "key holder")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp / "kh.crt", tmp / "kh.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    return context, cert_file


def _routes(host: Host, clock: FakeClock, **overrides: object) -> AttestationRoutes:
    policy = AttestationPolicy.from_mapping(
        {"hosts": {fingerprint(TOKEN): host_policy(host, **overrides)}}
    )
    return AttestationRoutes(AttestationVerifier(policy, clock=clock))


@pytest.fixture
def https_holder(
    host_a: Host, clock: FakeClock, tmp_path: Path
) -> Iterator[tuple[AttestingKeyHolder, Path]]:
    context, ca = _tls(tmp_path)
    with AttestingKeyHolder(_routes(host_a, clock), {TOKEN}, tls=context) as holder:
        yield holder, ca


def test_attest_over_tls_binds_the_session_to_the_connection(
    https_holder: tuple[AttestingKeyHolder, Path], host_a: Host
) -> None:
    holder, ca = https_holder
    first = JsonPoster(holder.url, TOKEN, ca_file=str(ca))
    grant = attest(first, host_a.quoter)
    assert grant.channel_bound and grant.host == fingerprint(TOKEN)
    assert grant.ak == host_a.key.key.fingerprint
    # The attested connection gets past the check (502: this harness has no decrypter).
    status, _ = first("/v1/decrypt", {})
    assert status == 502
    # Another connection with the same token has no session: its tls-unique differs.
    second = JsonPoster(holder.url, TOKEN, ca_file=str(ca))
    status, payload = second("/v1/decrypt", {})
    assert is_attestation_refusal(status, payload), payload
    assert "no attestation session on this connection" in payload["cause"]
    assert [outcome for _, _, outcome in holder.audit] == [
        "ok",
        "ok",
        "forwarded",
        "attestation_required",
    ]
    first.close()
    second.close()


def test_attester_attests_once_renews_near_expiry_and_after_a_reconnect(
    https_holder: tuple[AttestingKeyHolder, Path], host_a: Host, clock: FakeClock
) -> None:
    holder, ca = https_holder
    poster = JsonPoster(holder.url, TOKEN, ca_file=str(ca))
    attester = Attester(host_a.quoter, clock=clock)
    attester.ensure(poster)
    attester.ensure(poster)
    assert [route for route, _, _ in holder.audit].count("/v1/attestation/quote") == 1
    clock.advance(600 * 0.8)  # 80% of the session's 600 s: renew before it expires
    attester.ensure(poster)
    assert [route for route, _, _ in holder.audit].count("/v1/attestation/quote") == 2
    attester.connection_reset()  # a channel-bound session does not survive a new connection
    assert attester.grant is None
    poster.close()


def test_refusals_reach_the_host_typed_with_the_key_holders_reason(
    host_a: Host, clock: FakeClock
) -> None:
    host_a.tpm.extend(7, b"secure boot: disabled")
    with AttestingKeyHolder(_routes(host_a, clock), {TOKEN}) as holder:
        with pytest.raises(PcrMismatchError, match=r"refused the attestation: host .* booted"):
            attest(JsonPoster(holder.url, TOKEN), host_a.quoter, url="key holder")


def _settings(url: str, token_file: Path, tcti: str, ak: str = "0x81010002") -> TenSafeSettings:
    return TenSafeSettings(
        require_attestation=True,
        key_holder="remote",
        key_holder_url=url,
        key_holder_token_file=token_file,
        tpm_tcti=tcti,
        tpm_ak=ak,
    )


def test_startup_gate_accepts_a_good_host(host_a: Host, clock: FakeClock, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    with AttestingKeyHolder(_routes(host_a, clock), {TOKEN}) as holder:
        grant = check_at_startup(_settings(holder.url, token_file, host_a.tpm.tcti, host_a.key.ak))
    assert grant is not None and grant.host == fingerprint(TOKEN) and not grant.channel_bound


def test_startup_gate_refuses_without_a_tpm(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    settings = _settings("http://127.0.0.1:9", token_file, f"device:{tmp_path}/tpmrm0")
    with pytest.raises(TpmError, match=r"no TPM on this host: .*tpmrm0 does not exist"):
        check_at_startup(settings)


def test_startup_gate_refuses_a_key_holder_without_attestation(
    host_a: Host, tmp_path: Path
) -> None:
    # The stock key holder (no attestation policy) answers the attestation routes with 404.
    from vllm_tensafe.cli import main as tensafe_cli

    prefix = tmp_path / "owner"
    assert tensafe_cli(["keygen", "he", "--out", str(prefix)]) == 0
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    with CliKeyHolder(Path(f"{prefix}.secret"), token_file) as stock:
        with pytest.raises(AttestationError, match=r"does not offer attestation"):
            check_at_startup(_settings(stock.url, token_file, host_a.tpm.tcti, host_a.key.ak))
