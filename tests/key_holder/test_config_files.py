"""The key holder's configuration files and helpers: token lines, JSON policy, certificates,
trusted-key pins, one adapter-name rule."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.key_holder.conftest import cli
from vllm_tensafe.errors import ConfigError


def test_token_lines(tmp_path: Path) -> None:
    from vllm_tensafe.keyholder.server.tokens import TokenStore

    path = tmp_path / "tokens"
    path.write_text(
        "# comment\n"
        "aaaaaaaaaaaaaaaaaaaaaaaa\n"  # bare: decrypt, every adapter
        "bbbbbbbbbbbbbbbbbbbbbbbb decrypt host=gpu-2 adapters=sql-*,billing\n"
        "cccccccccccccccccccccccc admin host=owner\n"
    )
    path.chmod(0o600)
    store = TokenStore.from_file(path)
    bare = store.authenticate("Bearer aaaaaaaaaaaaaaaaaaaaaaaa")
    scoped = store.authenticate("Bearer bbbbbbbbbbbbbbbbbbbbbbbb")
    admin = store.authenticate("Bearer cccccccccccccccccccccccc")
    assert bare is not None and bare.may_decrypt("anything")
    assert scoped is not None and scoped.may_decrypt("sql-x") and not scoped.may_decrypt("hr")
    assert scoped.host == "gpu-2"
    assert admin is not None and admin.is_admin and not admin.may_decrypt("billing")
    assert store.authenticate("Bearer nope") is None and store.authenticate(None) is None
    for bad, message in (
        ("short decrypt\n", "at least 16"),
        ("dddddddddddddddddddddddd root\n", "unknown role"),
        ("dddddddddddddddddddddddd admin adapters=x\n", "decrypt tokens only"),
        ("dddddddddddddddddddddddd decrypt adapters=a/b\n", "pattern"),
        ("dddddddddddddddddddddddd decrypt colour=red\n", "unknown option"),
        ("aaaaaaaaaaaaaaaaaaaaaaaa\naaaaaaaaaaaaaaaaaaaaaaaa admin\n", "listed twice"),
        ("# nothing\n", "holds no token"),
    ):
        path.write_text(bad)
        with pytest.raises(ConfigError, match=message):
            TokenStore.from_file(path)


def test_json_policy(tmp_path: Path) -> None:
    import json

    from vllm_tensafe.keyholder.server import AdapterPolicy

    key, digest = "ab" * 32, "cd" * 32
    path = tmp_path / "adapters.json"
    entry = {"name": "sql-adapter", "key_id": key, "budget": 5,
             "manifests": [{"digest": digest, "adapter_version": 3}]}  # fmt: skip
    path.write_text(json.dumps({"adapters": [entry]}))
    policy = AdapterPolicy.load(path, None)
    binding = policy.binding("sql-adapter")
    assert binding is not None and binding.budget == 5 and binding.latest_version == 3
    for change, message in (
        ({"name": "sql\u2028adapter"}, "not allowed"),
        ({"key_id": "AB" * 32}, "key_id"),
        ({"manifests": []}, "lists no manifest"),
        ({"budget": -1}, "budget"),
        ({"extra": 1}, "unknown fields"),
    ):
        path.write_text(json.dumps({"adapters": [{**entry, **change}]}))
        with pytest.raises(ConfigError, match=message):
            AdapterPolicy.load(path, None)


def test_cert_command_names_every_host(tmp_path: Path) -> None:
    from cryptography import x509

    from vllm_tensafe.keyholder.server.tls import certificate_names

    cli("key-holder", "cert", "--out", tmp_path, "--host", "kh.example.com", "--host", "10.1.2.3",
        "--client", "gpu-1")  # fmt: skip
    assert sorted(certificate_names(tmp_path / "server.pem")) == ["10.1.2.3", "kh.example.com"]
    server = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.pem").read_bytes())
    assert server.issuer == ca.subject
    assert (tmp_path / "server.key").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "client-gpu-1.pem").is_file()
    before = (tmp_path / "ca.pem").read_bytes()
    cli("key-holder", "cert", "--out", tmp_path, "--host", "kh2.example.com", "--force")
    assert (tmp_path / "ca.pem").read_bytes() == before  # the CA is kept: hosts still trust it


def test_trusted_key_specs(tmp_path: Path) -> None:
    from vllm_tensafe.tssp.signing import parse_trusted_key

    assert parse_trusted_key("owner.pub") == (Path("owner.pub"), None)
    assert parse_trusted_key("owner.pub=sql-*") == (Path("owner.pub"), "sql-*")
    # A path with "=" whose tail is no name pattern stays a path.
    assert parse_trusted_key("keys/a=b/owner.pub") == (Path("keys/a=b/owner.pub"), None)


@pytest.mark.parametrize("name", ["sql-adapter", "a", "A.b_c-9", "x" * 128])
def test_adapter_names_accepted(name: str) -> None:
    from vllm_tensafe.keyholder.wire import AdapterRef

    assert AdapterRef(name, "ab" * 32, "cd" * 32).name == name


@pytest.mark.parametrize(
    "name", ["", "-x", ".x", "a b", "a/b", "sql\u2028adapter", "sql-adapter\n", "é", "x" * 129]
)
def test_adapter_names_refused_everywhere(name: str) -> None:
    from vllm_tensafe.errors import HEError
    from vllm_tensafe.keyholder.server.revocation import parse_revocations
    from vllm_tensafe.keyholder.wire import AdapterRef
    from vllm_tensafe.tssp.manifest import is_adapter_name

    assert not is_adapter_name(name)
    with pytest.raises(HEError):
        AdapterRef(name, "ab" * 32, "cd" * 32)
    if name.strip() and "\n" not in name:
        with pytest.raises(ConfigError):
            parse_revocations(name + "\n", "revocation file")


def test_flags_command_is_instant_and_shows_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    from vllm_tensafe.cli import main

    assert main(["flags"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--tensafe-key-holder-timeout" in out and "default: 10.0]" in out
    assert "(default: None)" not in out
