"""What survives a restart (revocations, budgets, version high-water marks), the audit chain,
and the revocation file."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.key_holder.conftest import ADMIN_TOKEN, DECRYPT_TOKEN, Adapter, digest_of, policy_for
from vllm_tensafe.cli import main
from vllm_tensafe.errors import (
    AdapterRevokedError,
    BudgetExhaustedError,
    ConfigError,
    KeyHolderForbiddenError,
)
from vllm_tensafe.keyholder.remote import RemoteKeyHolder
from vllm_tensafe.keyholder.wire import AdapterRef


def _policy(sql: Adapter, billing: Adapter) -> Any:
    policy = policy_for(sql, billing, budgets={"sql-adapter": 5})
    policy.bind_manifest(sql.name, sql.ctx.key_id, digest_of("sql-adapter-v2"), 2)
    return policy


def test_restart_keeps_revocations_budgets_and_versions(
    make_service: Callable[..., Any], sql: Adapter, billing: Adapter, tmp_path: Path
) -> None:
    audit = tmp_path / "restart.jsonl"
    v2 = AdapterRef(sql.name, sql.ctx.key_id, digest_of("sql-adapter-v2"))
    first = make_service(policy=_policy(sql, billing), audit_log=audit)
    holder = RemoteKeyHolder(first.url, DECRYPT_TOKEN)
    holder.decrypt(v2, [sql.blob] * 4)
    RemoteKeyHolder(first.url, ADMIN_TOKEN).revoke("billing")
    first.close()

    second = make_service(policy=_policy(sql, billing), audit_log=audit)
    holder = RemoteKeyHolder(second.url, DECRYPT_TOKEN)
    with pytest.raises(AdapterRevokedError):
        holder.decrypt(billing.ref, [billing.blob])
    with pytest.raises(BudgetExhaustedError, match="used 4 of its 5"):
        holder.decrypt(v2, [sql.blob] * 2)
    with pytest.raises(KeyHolderForbiddenError, match="version 2 was already served"):
        holder.decrypt(sql.ref, [sql.blob])  # v1, older than the v2 served before the restart
    status = RemoteKeyHolder(second.url, ADMIN_TOKEN).adapter_status("sql-adapter")
    assert status["used"] == 4 and status["highest_version_served"] == 2
    RemoteKeyHolder(second.url, ADMIN_TOKEN).unrevoke("billing")
    second.close()

    third = make_service(policy=_policy(sql, billing), audit_log=audit)
    RemoteKeyHolder(third.url, DECRYPT_TOKEN).decrypt(billing.ref, [billing.blob])
    third.close()
    assert main(["key-holder", "audit", "verify", str(audit)]) == 0


def test_audit_verify_detects_a_tampered_line(
    make_service: Callable[..., Any],
    sql: Adapter,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    audit = tmp_path / "tamper.jsonl"
    service = make_service(audit_log=audit)
    holder = RemoteKeyHolder(service.url, DECRYPT_TOKEN)
    for _ in range(3):
        holder.decrypt(sql.ref, [sql.blob])
    service.close()
    assert main(["key-holder", "audit", "verify", str(audit)]) == 0
    out = capsys.readouterr().out
    assert "chain intact" in out and "head " in out

    lines = audit.read_text().splitlines()
    # Lower the ciphertext count of one decryption (as if to hide use): the line's hash breaks.
    record = json.loads(lines[2])
    assert record["event"]["route"] == "decrypt"
    record["event"]["ciphertexts"] = 0
    tampered = tmp_path / "edited.jsonl"
    edited = json.dumps(record, sort_keys=True, separators=(",", ":"))
    tampered.write_text("\n".join([*lines[:2], edited, *lines[3:]]) + "\n")
    assert main(["key-holder", "audit", "verify", str(tampered)]) == 1
    assert "line 3 does not match its hash" in capsys.readouterr().err

    # Re-hashing the edited line does not help: the next line no longer chains to it.
    from vllm_tensafe.keyholder.server.audit import _line_hash

    body = {k: v for k, v in record.items() if k != "hash"}
    record["hash"] = _line_hash(record["prev"], body)
    rehashed = json.dumps(record, sort_keys=True, separators=(",", ":"))
    tampered.write_text("\n".join([*lines[:2], rehashed, *lines[3:]]) + "\n")
    assert main(["key-holder", "audit", "verify", str(tampered)]) == 1
    assert "line 4 does not chain" in capsys.readouterr().err

    # A deleted line, and a start on a tampered log, are refused too.
    tampered.write_text("\n".join([*lines[:2], *lines[3:]]) + "\n")
    assert main(["key-holder", "audit", "verify", str(tampered)]) == 1
    assert "line 3 has sequence number" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="refusing to start"):
        make_service(audit_log=tampered)


def test_unwritable_audit_log_refuses_the_request(
    make_service: Callable[..., Any], sql: Adapter, tmp_path: Path
) -> None:
    from vllm_tensafe.errors import KeyHolderUnavailableError

    service = make_service(audit_log=tmp_path / "full.jsonl")
    seen: list[int] = []
    holder_obj = service.holders[sql.ctx.key_id]
    original = holder_obj.decrypt

    def spy(ref: Any, blobs: Any) -> Any:
        seen.append(len(blobs))
        return original(ref, blobs)

    holder_obj.decrypt = spy  # type: ignore[method-assign]
    os.close(service.audit._fd)  # the disk "fails": every write raises EBADF
    service.audit._fd = os.open(os.devnull, os.O_RDONLY)
    with pytest.raises(KeyHolderUnavailableError, match="cannot write its audit log"):
        RemoteKeyHolder(service.url, DECRYPT_TOKEN, retries=0).decrypt(sql.ref, [sql.blob])
    assert seen == [1]  # decrypted, but the reply was withheld
    assert service.status("sql-adapter")["used"] == 0


def test_revocation_file_lines_are_adapter_names_only(
    make_service: Callable[..., Any], sql: Adapter, tmp_path: Path
) -> None:
    revoked = tmp_path / "revoked.txt"
    # U+2028 is a line break for str.splitlines(): the old service read this line as two ids.
    revoked.write_text("# revoked\nsql-adapter\u2028billing\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"line 2: .* is neither an adapter name"):
        make_service(revoked_file=revoked)
    revoked.write_text("# revoked\nsql-adapter\n", encoding="utf-8")
    service = make_service(revoked_file=revoked)
    holder = RemoteKeyHolder(service.url, DECRYPT_TOKEN)
    with pytest.raises(AdapterRevokedError):
        holder.decrypt(sql.ref, [sql.blob])
    RemoteKeyHolder(service.url, ADMIN_TOKEN).unrevoke("sql-adapter")
    assert "sql-adapter" not in revoked.read_text().split("\n")
    holder.decrypt(sql.ref, [sql.blob])
    RemoteKeyHolder(service.url, ADMIN_TOKEN).revoke("billing")
    assert "billing" in revoked.read_text().split("\n")
    # An edit that breaks the file keeps the last good list (nothing is un-revoked).
    revoked.write_text("billing\nnot a name\n", encoding="utf-8")
    stamp = revoked.stat().st_mtime_ns + 10**9
    os.utime(revoked, ns=(stamp, stamp))
    assert service.core.is_revoked("billing")


def test_revocation_by_key(make_service: Callable[..., Any], sql: Adapter, tmp_path: Path) -> None:
    revoked = tmp_path / "revoked.txt"
    revoked.write_text(f"key:{sql.ctx.key_id}\n")
    service = make_service(revoked_file=revoked)
    with pytest.raises(AdapterRevokedError):
        RemoteKeyHolder(service.url, DECRYPT_TOKEN).decrypt(sql.ref, [sql.blob])
