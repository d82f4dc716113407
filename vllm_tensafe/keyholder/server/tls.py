"""TLS for the key holder: its server context, optional client certificates, and certificates.

``vllm-tensafe key-holder cert`` makes what a first deployment needs without openssl: a small
CA (its certificate is what hosts pass as ``--tensafe-key-holder-ca``) and a server certificate
signed by it whose subjectAltName lists every DNS name and IP address hosts use in
``TENSAFE_KEY_HOLDER_URL`` (TLS clients check the subjectAltName, not the common name), and,
with ``--client NAME``, client certificates for mTLS (``--client-ca`` on the key holder,
``--tensafe-key-holder-client-cert/-key`` on the host).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from vllm_tensafe.errors import ConfigError
from vllm_tensafe.files import refuse_overwrite

LOOPBACK_NAMES = ("localhost",)


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class TLSConfig:
    cert: Path
    key: Path
    client_ca: Path | None = None  # require client certificates signed by this CA (mTLS)

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(self.cert, self.key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"cannot load TLS certificate {str(self.cert)!r} / key {str(self.key)!r}: {exc}",
                "pass a PEM certificate and its unencrypted PEM private key "
                "(vllm-tensafe key-holder cert makes both)",
            ) from None
        if self.client_ca is not None:
            try:
                ctx.load_verify_locations(cafile=str(self.client_ca))
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(
                    f"cannot load client CA {str(self.client_ca)!r}: {exc}",
                    "pass the PEM CA certificate that signed the hosts' client certificates",
                ) from None
            # OPTIONAL: a certificate that is presented must verify (else the handshake fails),
            # and a connection without one reaches the app, which answers 403 naming the fix
            # instead of a bare TLS alert the client cannot explain.
            ctx.verify_mode = ssl.CERT_OPTIONAL
        return ctx


# --- certificates ------------------------------------------------------------------------------


def _write(path: Path, data: bytes, mode: int) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    fd = os.open(path, flags, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.chmod(path, mode)


def _names(hosts: Sequence[str]) -> list[object]:
    from cryptography import x509

    out: list[object] = []
    for host in hosts:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(host.strip("[]"))))
        except ValueError:
            out.append(x509.DNSName(host))
    return out


def make_certificates(
    out_dir: str | os.PathLike[str],
    hosts: Sequence[str],
    *,
    days: int = 365,
    clients: Sequence[str] = (),
    force: bool = False,
) -> dict[str, Path]:
    """Write ca.pem/ca.key, server.pem/server.key and client-NAME.pem/.key into ``out_dir``.

    The CA key signs only these certificates; keep it offline or delete it once done. An
    existing CA in ``out_dir`` is reused, so adding ``--client`` later keeps hosts' trust.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if not hosts:
        raise ConfigError(
            "a server certificate needs at least one host name or IP address",
            "pass --host for each name hosts use in TENSAFE_KEY_HOLDER_URL",
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "ca": out / "ca.pem",
        "ca_key": out / "ca.key",
        "server": out / "server.pem",
        "server_key": out / "server.key",
    }
    for name in clients:
        paths[f"client:{name}"] = out / f"client-{name}.pem"
        paths[f"client_key:{name}"] = out / f"client-{name}.key"
    refuse_overwrite(
        (p for k, p in paths.items() if not k.startswith("ca")),
        force,
        "choose another --out folder, or pass --force",
    )
    now = datetime.datetime.now(datetime.UTC)
    pem = serialization.Encoding.PEM

    def private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    if paths["ca"].exists() and paths["ca_key"].exists():
        ca_cert = x509.load_pem_x509_certificate(paths["ca"].read_bytes())
        loaded = serialization.load_pem_private_key(paths["ca_key"].read_bytes(), None)
        if not isinstance(loaded, ec.EllipticCurvePrivateKey):
            raise ConfigError(
                f"{paths['ca_key']} is not the CA key this command wrote", "use --out"
            )
        ca_key = loaded
    else:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vllm-tensafe key-holder CA")])
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=max(days, 1) * 2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(ca_key, hashes.SHA256())
        )
        _write(paths["ca_key"], private_pem(ca_key), 0o600)
        _write(paths["ca"], ca_cert.public_bytes(pem), 0o644)

    def leaf(common_name: str, sans: list[object] | None, usage: object) -> tuple[bytes, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=max(days, 1)))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)  # type: ignore[list-item]
        )
        if sans:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(sans),  # type: ignore[arg-type]
                critical=False,
            )
        cert = builder.sign(ca_key, hashes.SHA256())
        return cert.public_bytes(pem), private_pem(key)

    cert_pem, key_pem = leaf(hosts[0], _names(hosts), ExtendedKeyUsageOID.SERVER_AUTH)
    _write(paths["server_key"], key_pem, 0o600)
    _write(paths["server"], cert_pem, 0o644)
    for name in clients:
        cert_pem, key_pem = leaf(name, None, ExtendedKeyUsageOID.CLIENT_AUTH)
        _write(paths[f"client_key:{name}"], key_pem, 0o600)
        _write(paths[f"client:{name}"], cert_pem, 0o644)
    return paths


def certificate_names(path: str | os.PathLike[str]) -> list[str]:
    """The subjectAltName entries of a PEM certificate (for messages)."""
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(v.value) for v in sans]
