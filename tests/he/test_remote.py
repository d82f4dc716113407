"""The remote key holder: auth, revocation, budgets, failure modes, audit, CLI."""

from __future__ import annotations

import datetime
import http.client
import ipaddress
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import numpy as np
import pytest
import tenseal.sealapi as seal

from tests.he.helpers import make_lora, ref
from vllm_tensafe.errors import (
    AdapterRevokedError,
    BudgetExhaustedError,
    ConfigError,
    ForeignCiphertextError,
    KeyHolderAuthError,
    KeyHolderError,
    KeyHolderUnavailableError,
)
from vllm_tensafe.he import (
    DeltaEngine,
    EncryptedMatrix,
    KeyHolderService,
    LocalKeyHolder,
    PublicContext,
    RemoteKeyHolder,
    SecretKeySet,
    encrypt_matrix,
    key_holder_from_settings,
)
from vllm_tensafe.he.keyholder import ciphertext_size, encode_ciphertext
from vllm_tensafe.settings import TenSafeSettings

TOKEN = "host-token-0123456789abcdef"


@pytest.fixture(scope="module")
def matrix(ctx: PublicContext) -> EncryptedMatrix:
    return encrypt_matrix(ctx, np.random.default_rng(7).normal(size=(896, 8)) * 0.05)


@pytest.fixture
def service(secret: SecretKeySet, tmp_path: Path) -> Iterator[KeyHolderService]:
    revoked = tmp_path / "revoked.txt"
    revoked.write_text("# revoked adapters\n")
    svc = KeyHolderService(secret, {TOKEN}, budgets={"metered": 3}, revoked_file=revoked)
    svc.start()
    yield svc
    svc.stop()


@pytest.fixture
def remote(service: KeyHolderService) -> Iterator[RemoteKeyHolder]:
    holder = RemoteKeyHolder(service.url, TOKEN, timeout=5.0)
    yield holder
    holder.close()


def _u(rows: int) -> np.ndarray:
    return np.random.default_rng(rows).normal(size=(rows, 8))


def test_remote_delta_is_correct(
    ctx: PublicContext, remote: RemoteKeyHolder, rng: np.random.Generator
) -> None:
    lora = make_lora(rng, 896, 8, rslora=True)
    x = rng.normal(size=(9, 48))
    engine = DeltaEngine(ctx, remote)
    (delta,) = engine.compute(
        ref(engine.ctx, "a"), [(lora.u(x), encrypt_matrix(ctx, lora.b_mixed))]
    )
    assert np.abs(delta - lora.delta(x)).max() <= ctx.profile.tolerance
    assert engine.stats.decrypt_calls == 1 and engine.stats.ciphertexts_sent == 3
    # Large batches are split into several HTTP requests; order and values are kept.
    remote.max_request_bytes = 1
    (split,) = engine.compute(
        ref(engine.ctx, "a"), [(lora.u(x), encrypt_matrix(ctx, lora.b_mixed))]
    )
    assert np.abs(split - lora.delta(x)).max() <= ctx.profile.tolerance


def test_health(service: KeyHolderService, ctx: PublicContext) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", service.port, timeout=5)
    conn.request("GET", "/health")
    resp = conn.getresponse()
    assert resp.status == 200
    assert json.loads(resp.read()) == {"status": "ok", "key_id": ctx.key_id, "profile": "default"}
    assert RemoteKeyHolder(service.url, TOKEN).health()["key_id"] == ctx.key_id


def test_wrong_or_missing_token_gets_401_and_no_decryption(
    service: KeyHolderService, ctx: PublicContext, matrix: EncryptedMatrix
) -> None:
    before = service.holder.ciphertexts_decrypted
    with pytest.raises(KeyHolderAuthError, match="refused the host's token"):
        DeltaEngine(ctx, RemoteKeyHolder(service.url, "not-the-token-xxxxxxxx")).compute(
            ref(ctx), [(_u(4), matrix)]
        )
    conn = http.client.HTTPConnection("127.0.0.1", service.port, timeout=5)
    conn.request("POST", "/v1/decrypt", body=b"x" * 100)
    resp = conn.getresponse()
    assert resp.status == 401 and json.loads(resp.read())["error"] == "unauthorized"
    for path in ("/v1/adapters/a", "/v1/adapters/a/revoke"):
        conn = http.client.HTTPConnection("127.0.0.1", service.port, timeout=5)
        conn.request("POST" if path.endswith("revoke") else "GET", path)
        assert conn.getresponse().status == 401
    # A large body is still answered with 401 (read and dropped), not a connection reset.
    blob = bytes(ciphertext_size(ctx.profile))
    with pytest.raises(KeyHolderAuthError):
        RemoteKeyHolder(service.url, "not-the-token-xxxxxxxx").decrypt(ref(ctx), [blob] * 24)
    assert service.holder.ciphertexts_decrypted == before
    assert not service.is_revoked("a")


def test_revocation_takes_effect_on_the_next_request(
    ctx: PublicContext, remote: RemoteKeyHolder, matrix: EncryptedMatrix
) -> None:
    engine = DeltaEngine(ctx, remote)
    engine.compute(ref(engine.ctx, "to-revoke"), [(_u(4), matrix)])
    assert remote.revoke("to-revoke") == {"adapter_id": "to-revoke", "revoked": True}
    with pytest.raises(AdapterRevokedError, match="revoked"):
        engine.compute(ref(engine.ctx, "to-revoke"), [(_u(4), matrix)])
    assert remote.adapter_status("to-revoke")["revoked"] is True
    engine.compute(ref(engine.ctx, "other"), [(_u(4), matrix)])  # others unaffected


def test_revocation_file_is_watched(
    service: KeyHolderService, ctx: PublicContext, remote: RemoteKeyHolder, matrix: EncryptedMatrix
) -> None:
    engine = DeltaEngine(ctx, remote)
    engine.compute(ref(engine.ctx, "by-file"), [(_u(4), matrix)])
    path = service._revoked_file
    assert path is not None
    with path.open("a") as fh:
        fh.write("by-file\n")
    stamp = path.stat().st_mtime_ns + 10**9  # a distinct mtime even on coarse clocks
    os.utime(path, ns=(stamp, stamp))
    with pytest.raises(AdapterRevokedError):
        engine.compute(ref(engine.ctx, "by-file"), [(_u(4), matrix)])
    # An API revocation is persisted to the file.
    remote.revoke("by-api")
    assert "by-api" in path.read_text().split()


def test_budget(ctx: PublicContext, remote: RemoteKeyHolder, matrix: EncryptedMatrix) -> None:
    engine = DeltaEngine(ctx, remote)
    engine.compute(ref(engine.ctx, "metered"), [(_u(8), matrix)])  # k=4: 2 ciphertexts
    with pytest.raises(BudgetExhaustedError, match="used 2 of its 3"):
        engine.compute(ref(engine.ctx, "metered"), [(_u(8), matrix)])
    engine.compute(ref(engine.ctx, "metered"), [(_u(4), matrix)])  # exactly the last one
    status = remote.adapter_status("metered")
    assert status == {"adapter_id": "metered", "budget": 3, "used": 3, "revoked": False}


def test_foreign_ciphertexts(
    ctx: PublicContext,
    remote: RemoteKeyHolder,
    other_keys: tuple[SecretKeySet, PublicContext],
) -> None:
    other_ctx = other_keys[1]
    foreign = encrypt_matrix(other_ctx, np.ones((896, 8)) * 0.1)
    with pytest.raises(ForeignCiphertextError, match="declare key"):
        DeltaEngine(other_ctx, remote).compute(ref(other_ctx), [(_u(4), foreign)])
    # A fresh B' column is not at a product scale: refused before decryption.
    fresh = encode_ciphertext(foreign.ciphertexts[0][0])
    with pytest.raises(ForeignCiphertextError, match="not a protocol ciphertext"):
        remote.decrypt(ref(ctx), [fresh])
    # A foreign product declared as ours is well-formed, and under protocol v2 the key holder
    # cannot tell (every request decrypts to a uniform polynomial): it replies. The reply
    # decodes to noise, which the host's engine refuses.
    product = seal.Ciphertext(other_ctx.context)
    plain = seal.Plaintext()
    other_ctx.encoder.encode(1.0, other_ctx.parms_id, other_ctx.profile.u_scale, plain)
    other_ctx.evaluator.multiply_plain(foreign.ciphertexts[0][0], plain, product)
    (reply,) = remote.decrypt(ref(ctx), [encode_ciphertext(product)])
    engine = DeltaEngine(ctx, remote)
    with pytest.raises(KeyHolderError, match="outside the protocol range"):
        engine._read_replies([reply], [None], [ctx.profile.product_scale_bits])


def test_service_stopped_mid_run(
    secret: SecretKeySet, ctx: PublicContext, matrix: EncryptedMatrix
) -> None:
    svc = KeyHolderService(secret, {TOKEN})
    svc.start()
    engine = DeltaEngine(ctx, RemoteKeyHolder(svc.url, TOKEN, timeout=2.0, retries=1))
    engine.compute(ref(engine.ctx, "a"), [(_u(4), matrix)])  # leaves a keep-alive connection open
    svc.stop()
    with pytest.raises(KeyHolderUnavailableError):
        engine.compute(ref(engine.ctx, "a"), [(_u(4), matrix)])


def test_hung_key_holder_times_out(ctx: PublicContext, matrix: EncryptedMatrix) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)  # accepts connections into the backlog, never answers
    try:
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        engine = DeltaEngine(ctx, RemoteKeyHolder(url, TOKEN, timeout=0.5, retries=3))
        with pytest.raises(KeyHolderUnavailableError, match="did not answer"):
            engine.compute(ref(engine.ctx, "a"), [(_u(4), matrix)])
    finally:
        listener.close()


def test_server_error_is_unavailable(ctx: PublicContext, matrix: EncryptedMatrix) -> None:
    class Broken(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Broken)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        with pytest.raises(KeyHolderUnavailableError, match="HTTP 503"):
            DeltaEngine(ctx, RemoteKeyHolder(url, TOKEN)).compute(ref(ctx), [(_u(4), matrix)])
    finally:
        server.shutdown()
        server.server_close()


def test_audit_log(
    service: KeyHolderService,
    ctx: PublicContext,
    remote: RemoteKeyHolder,
    matrix: EncryptedMatrix,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="vllm_tensafe.key_holder"):
        DeltaEngine(ctx, remote).compute(ref(ctx, "audited"), [(_u(8), matrix)])
        with pytest.raises(KeyHolderAuthError):
            RemoteKeyHolder(service.url, "wrong-token-abcdefghijkl").decrypt(
                ref(ctx, "audited"), [b"x"]
            )
    lines = [r.getMessage() for r in caplog.records if r.name == "vllm_tensafe.key_holder"]
    ok = [line for line in lines if "outcome=ok" in line and "decrypt" in line]
    assert ok and 'adapter="audited"' in ok[0] and "ciphertexts=2" in ok[0]
    assert "caller=127.0.0.1:" in ok[0] and "token=" in ok[0]
    assert any("outcome=unauthorized" in line for line in lines)
    assert all(TOKEN not in line and "wrong-token" not in line for line in lines)


def _self_signed(tmp_path: Path) -> tuple[str, str]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(cert_path), str(key_path)


def test_tls(
    secret: SecretKeySet, ctx: PublicContext, matrix: EncryptedMatrix, tmp_path: Path
) -> None:
    cert, key = _self_signed(tmp_path)
    with KeyHolderService(secret, {TOKEN}, tls_cert=cert, tls_key=key) as svc:
        assert svc.url.startswith("https://")
        holder = RemoteKeyHolder(svc.url, TOKEN, ca_file=cert)
        (delta,) = DeltaEngine(ctx, holder).compute(ref(ctx), [(_u(4), matrix)])
        assert delta.shape == (4, 896)
        untrusted = RemoteKeyHolder(svc.url, TOKEN, retries=0)  # system CAs only
        with pytest.raises(KeyHolderUnavailableError, match="TLS"):
            untrusted.health()


def test_key_holder_from_settings(
    secret: SecretKeySet, service: KeyHolderService, tmp_path: Path
) -> None:
    secret_path = tmp_path / "k.secret"
    secret.save(secret_path, "pw")
    local = key_holder_from_settings(
        TenSafeSettings(key_holder="local", he_secret=secret_path, he_secret_passphrase="pw")
    )
    assert isinstance(local, LocalKeyHolder) and local.kind == "local" and local._flood
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    remote = key_holder_from_settings(
        TenSafeSettings(
            key_holder="remote", key_holder_url=service.url, key_holder_token_file=token_file
        )
    )
    assert isinstance(remote, RemoteKeyHolder) and remote.kind == "remote"
    assert remote.health()["status"] == "ok"
    token_file.write_text("")
    with pytest.raises(ConfigError, match="holds 0 tokens"):
        key_holder_from_settings(
            TenSafeSettings(
                key_holder="remote", key_holder_url=service.url, key_holder_token_file=token_file
            )
        )


SERVE = """
import argparse, sys
from vllm_tensafe.he.service import add_commands
parser = argparse.ArgumentParser(prog="vllm-tensafe")
add_commands(parser.add_subparsers(dest="command"))
args = parser.parse_args(sys.argv[1:])
sys.exit(args.handler(args))
"""


def test_cli_serve_until_sigterm(secret: SecretKeySet, tmp_path: Path) -> None:
    secret_path = tmp_path / "k.secret"
    secret.save(secret_path, "s3cret")
    token_file = tmp_path / "tokens"
    token_file.write_text(f"# hosts\n{TOKEN}\n")
    token_file.chmod(0o600)
    env = dict(os.environ, KH_PASS="s3cret")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            SERVE,
            "key-holder",
            "serve",
            "--he-secret",
            str(secret_path),
            "--passphrase-env",
            "KH_PASS",
            "--port",
            "0",
            "--token-file",
            str(token_file),
            "--budget",
            "10",
        ],
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        assert proc.stderr is not None
        url = None
        for _ in range(200):
            line = proc.stderr.readline()
            if not line:
                break
            if "listening on" in line:
                url = line.split("listening on ", 1)[1].split()[0]
                break
        assert url, "the service did not start"
        holder = RemoteKeyHolder(url, TOKEN)
        assert holder.health()["key_id"] == secret.key_id
        assert holder.adapter_status("x")["budget"] == 10
        holder.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_help_explains_options() -> None:
    out = subprocess.run(
        [sys.executable, "-c", SERVE, "key-holder", "serve", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for option in (
        "--he-secret",
        "--passphrase-env",
        "--token-file",
        "--budget",
        "--revoked-file",
        "--tls-cert",
        "--tls-key",
        "--host",
        "--port",
    ):
        assert option in out
    assert "SIGTERM" in out
