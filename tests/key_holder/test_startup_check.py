"""The host's start-up check against the key holder: each misconfiguration refuses start-up
with its own message (the old host reported healthy and failed at the first request)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.key_holder.conftest import DECRYPT_TOKEN, Owner, cli, tokens
from tests.support.server_process import free_port
from vllm_tensafe.errors import (
    KeyHolderAuthError,
    KeyHolderForbiddenError,
    KeyHolderUnavailableError,
)
from vllm_tensafe.keyholder.remote import check_key_holder
from vllm_tensafe.settings import TenSafeSettings


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    good = tmp_path_factory.mktemp("tls")
    cli("key-holder", "cert", "--out", good, "--host", "127.0.0.1")
    other = tmp_path_factory.mktemp("other")
    cli("key-holder", "cert", "--out", other, "--host", "kh.example")
    return {"good": good, "other": other}


def _service(owner: Owner, folder: Path, audit: Path) -> Any:
    from vllm_tensafe.he import SecretKeySet
    from vllm_tensafe.keyholder.server import AdapterPolicy, KeyHolderService, TLSConfig
    from vllm_tensafe.tssp import TrustStore

    policy = AdapterPolicy.load(
        owner.packages, TrustStore.from_files([owner.signing.with_suffix(".pub")])
    )
    secrets = [SecretKeySet.load(owner.root / f"{n}.secret") for n in ("sql", "billing")]
    return KeyHolderService(
        secrets,
        policy,
        tokens(),
        audit_log=audit,
        tls=TLSConfig(folder / "server.pem", folder / "server.key"),
    )


@pytest.fixture(scope="module")
def good(
    owner: Owner, tls: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    service = _service(owner, tls["good"], tmp_path_factory.mktemp("a") / "audit.jsonl")
    service.start()
    yield service
    service.close()


@pytest.fixture(scope="module")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("host") / "token"
    path.write_text(DECRYPT_TOKEN + "\n")
    return path


def _settings(url: str, token_file: Path, ca: Path | None) -> TenSafeSettings:
    return TenSafeSettings(
        key_holder="remote",
        key_holder_url=url,
        key_holder_token_file=token_file,
        key_holder_ca=ca,
        key_holder_retries=0,
    )


def test_a_correct_setup_passes(
    good: Any, owner: Owner, tls: dict[str, Path], token_file: Path
) -> None:
    health = check_key_holder(
        _settings(good.url, token_file, tls["good"] / "ca.pem"),
        [str(owner.sql_v2), str(owner.billing)],
    )
    assert health["protocol_version"] == 2


def test_wrong_ca(good: Any, owner: Owner, tls: dict[str, Path], token_file: Path) -> None:
    with pytest.raises(KeyHolderUnavailableError, match="is not trusted by") as info:
        check_key_holder(
            _settings(good.url, token_file, tls["other"] / "ca.pem"), [str(owner.sql_v2)]
        )
    assert "subjectAltName" in str(info.value)  # the fix names both requirements


def test_no_ca_at_all(good: Any, owner: Owner, token_file: Path) -> None:
    with pytest.raises(KeyHolderUnavailableError, match="TENSAFE_KEY_HOLDER_CA is not set"):
        check_key_holder(_settings(good.url, token_file, None), [str(owner.sql_v2)])


def test_wrong_subject_alt_name(
    owner: Owner, tls: dict[str, Path], token_file: Path, tmp_path: Path
) -> None:
    service = _service(owner, tls["other"], tmp_path / "audit.jsonl")  # a cert for kh.example
    service.start()
    try:
        with pytest.raises(KeyHolderUnavailableError, match=r"does not name 127.0.0.1 in its"):
            check_key_holder(
                _settings(service.url, token_file, tls["other"] / "ca.pem"), [str(owner.sql_v2)]
            )
    finally:
        service.close()


def test_key_holder_down(owner: Owner, tls: dict[str, Path], token_file: Path) -> None:
    url = f"https://127.0.0.1:{free_port()}"
    with pytest.raises(KeyHolderUnavailableError, match="is unreachable"):
        check_key_holder(_settings(url, token_file, tls["good"] / "ca.pem"), [str(owner.sql_v2)])


def test_wrong_key_id(
    good: Any, owner: Owner, tls: dict[str, Path], token_file: Path, tmp_path: Path
) -> None:
    """A package encrypted under a key the key holder does not hold (another owner's)."""
    from tests.support.builders import build_tiny_model, make_adapter

    model = build_tiny_model(owner.root / "model", "llama")
    cli("keygen", "he", "--out", tmp_path / "stranger")
    package = tmp_path / "sql-adapter.tssp"
    cli("pack", make_adapter(model, owner.root / "peft"), "--base-model", model,
        "--signing-key", owner.root / "owner.key", "--he-public", tmp_path / "stranger.public",
        "-o", package, "-q")  # fmt: skip
    with pytest.raises(KeyHolderForbiddenError, match=r"which key holder .* does not hold"):
        check_key_holder(_settings(good.url, token_file, tls["good"] / "ca.pem"), [str(package)])


def test_package_the_key_holder_does_not_accept(
    good: Any, owner: Owner, tls: dict[str, Path], token_file: Path
) -> None:
    # sql-adapter version 1: right name, right key, but not a package the key holder was given.
    with pytest.raises(KeyHolderForbiddenError, match="not one this key holder accepts"):
        check_key_holder(
            _settings(good.url, token_file, tls["good"] / "ca.pem"), [str(owner.sql_v1)]
        )


def test_token_refused(good: Any, owner: Owner, tls: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "token"
    bad.write_text("not-a-token-of-this-key-holder\n")
    with pytest.raises(KeyHolderAuthError, match="refused the host's token"):
        check_key_holder(_settings(good.url, bad, tls["good"] / "ca.pem"), [str(owner.sql_v2)])
