"""The attestation policy file: TOML and JSON, key files next to it, clear refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vllm_tensafe.attestation import AttestationPolicy
from vllm_tensafe.errors import ConfigError

from .helpers import SoftAk

PCR0 = "9ef814b42fa0be12d197c44d3e8e03441a4b1118237658368ba1351090e556ed"


def test_toml_policy_with_relative_key_file(tmp_path: Path) -> None:
    ak = SoftAk()
    (tmp_path / "node1.ak.pem").write_text(ak.key.pem())
    (tmp_path / "policy.toml").write_text(
        f"""
nonce_lifetime = 90
[hosts.gpu-node-1]
attestation_keys = ["node1.ak.pem"]
tokens = ["3f2a9c0d11b7"]
max_quote_age = 20
[hosts.gpu-node-1.pcrs]
0 = "{PCR0}"
7 = ["{"00" * 32}", "0x{"AB" * 32}"]
"""
    )
    policy = AttestationPolicy.load(tmp_path / "policy.toml")
    host = policy.host("gpu-node-1")
    assert host is not None and policy.nonce_lifetime == 90
    assert host.selection == (0, 7) and host.key(ak.key.fingerprint) is not None
    assert host.accepted_values(7) == {bytes(32), b"\xab" * 32}
    assert host.session_lifetime == 3600 and host.pcr_bank == "sha256"


def test_json_policy_with_inline_pem(tmp_path: Path) -> None:
    path = tmp_path / "policy.json"
    ecc = SoftAk("ecc")
    path.write_text(
        json.dumps({"hosts": {"h": {"attestation_keys": [ecc.key.pem()], "pcrs": {"0": PCR0}}}})
    )
    assert AttestationPolicy.load(path).host("h") is not None


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"pcrs": {"0": PCR0}}, r"hosts\.h\.attestation_keys: Field required"),
        ({"attestation_keys": ["missing.pem"], "pcrs": {"0": PCR0}}, r"cannot be read"),
        ({"attestation_keys": ["KEY"], "pcrs": {"24": PCR0}}, r"PCR 24 does not exist"),
        ({"attestation_keys": ["KEY"], "pcrs": {"0": "abcd"}}, r"is not 64 hex characters"),
        ({"attestation_keys": ["KEY"], "pcrs": {"0": PCR0}, "tokens": ["x"]}, r"fingerprint"),
        ({"attestation_keys": ["KEY"], "pcrs": {"0": PCR0}, "max_quote_age": 0}, r"greater"),
        ({"attestation_keys": ["KEY"], "pcrs": {"0": PCR0}, "pcr": {}}, r"Extra inputs"),
    ],
)
def test_bad_entries_are_refused_with_the_field(
    tmp_path: Path, entry: dict[str, object], message: str
) -> None:
    pem = SoftAk().key.pem()
    entry = {k: ([pem] if v == ["KEY"] else v) for k, v in entry.items()}
    with pytest.raises(ConfigError, match=message) as err:
        AttestationPolicy.from_mapping({"hosts": {"h": entry}}, base_dir=tmp_path)
    assert "docs/attestation.md" in str(err.value)


def test_weak_keys_are_refused() -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    weak = rsa.generate_private_key(65537, 1024).public_key()
    pem = weak.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    with pytest.raises(ConfigError, match=r"RSA-1024; at least 2048 bits"):
        AttestationPolicy.from_mapping(
            {"hosts": {"h": {"attestation_keys": [pem], "pcrs": {"0": PCR0}}}}
        )


def test_unreadable_and_unparsable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot be read"):
        AttestationPolicy.load(tmp_path / "nope.toml")
    (tmp_path / "bad.toml").write_text("hosts = [")
    with pytest.raises(ConfigError, match=r"does not parse"):
        AttestationPolicy.load(tmp_path / "bad.toml")
    (tmp_path / "empty.toml").write_text("")
    with pytest.raises(ConfigError, match=r"hosts: Field required"):
        AttestationPolicy.load(tmp_path / "empty.toml")
