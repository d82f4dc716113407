"""``vllm-tensafe key-holder ...`` as an operator runs it, with real signed packages."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.key_holder.conftest import Owner, cli
from vllm_tensafe.cli import main
from vllm_tensafe.errors import ConfigError
from vllm_tensafe.keyholder.remote import RemoteKeyHolder

BIN = Path(sys.executable).with_name("vllm-tensafe")


def test_pack_recorded_versions_and_keys(owner: Owner) -> None:
    from vllm_tensafe.tssp.opener import read_manifest

    assert read_manifest(owner.sql_v1)["adapter_version"] == 1
    assert read_manifest(owner.sql_v2)["adapter_version"] == 2
    records = json.loads((owner.root / "sql.records.json").read_text())
    assert list(records["keys"].values()) == [["sql-adapter"]]
    assert records["versions"] == {"sql-adapter": 2}


def test_folder_of_packages_is_the_policy(owner: Owner) -> None:
    from vllm_tensafe.keyholder.server import AdapterPolicy
    from vllm_tensafe.tssp import TrustStore

    trust = TrustStore.from_files([owner.signing.with_suffix(".pub")])
    policy = AdapterPolicy.load(owner.packages, trust)
    assert policy.names() == ["billing", "sql-adapter"]
    # Both versions, when the old package is in the folder too.
    (owner.packages / "sql-adapter-v1.tssp").symlink_to(owner.sql_v1)
    try:
        policy = AdapterPolicy.load(owner.packages, trust)
        assert sorted(
            m.adapter_version for m in policy.adapters["sql-adapter"].manifests.values()
        ) == [1, 2]
    finally:
        (owner.packages / "sql-adapter-v1.tssp").unlink()


def test_signer_pinned_to_other_names_cannot_bind_an_adapter(owner: Owner) -> None:
    from vllm_tensafe.keyholder.server import AdapterPolicy
    from vllm_tensafe.tssp import TrustStore

    pinned = TrustStore.from_files([f"{owner.signing.with_suffix('.pub')}=billing*"])
    with pytest.raises(ConfigError, match="trusted only for adapter names billing"):
        AdapterPolicy.load(owner.packages, pinned)
    AdapterPolicy.load(owner.billing, pinned)  # its own name is fine


def test_one_key_for_two_adapters_is_refused_at_start(owner: Owner, tmp_path: Path) -> None:
    from tests.support.builders import build_tiny_model, make_adapter
    from vllm_tensafe.keyholder.server import AdapterPolicy
    from vllm_tensafe.tssp import TrustStore

    model = build_tiny_model(owner.root / "model", "llama")
    folder = tmp_path / "shared"
    folder.mkdir()
    adapter = make_adapter(model, owner.root / "peft")
    common = ["--base-model", model, "--signing-key", owner.root / "owner.key", "-q",
              "--he-public", owner.root / "sql.public"]  # fmt: skip
    # pack refuses the shared key unless told otherwise...
    assert main(["pack", str(adapter), *map(str, common), "-o", str(folder / "x.tssp")]) == 1
    cli("pack", adapter, *common, "--allow-shared-key", "-o", folder / "sql-copy.tssp")
    (folder / "sql-adapter.tssp").symlink_to(owner.sql_v2)
    # ...and the key holder refuses to bind one key to two adapters.
    with pytest.raises(ConfigError, match="bound to adapters"):
        AdapterPolicy.load(folder, TrustStore.from_files([owner.signing.with_suffix(".pub")]))


def _start_serve(argv: list[str], env: dict[str, str]) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [str(BIN), "key-holder", "serve", *argv],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        env=env,
        text=True,
    )
    assert proc.stderr is not None
    for _ in range(500):
        line = proc.stderr.readline()
        if not line:
            break
        if "listening on" in line:
            return proc, line.split("listening on ", 1)[1].split()[0]
    proc.kill()
    raise AssertionError(f"the key holder did not start: {proc.stderr.read()[-2000:]}")


def test_operator_workflow(
    owner: Owner, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """cert, token, serve (TLS), status/revoke/unrevoke, SIGTERM, audit verify."""
    kh = tmp_path / "kh"
    kh.mkdir()
    cli("key-holder", "cert", "--out", kh / "tls", "--host", "127.0.0.1")
    cli("key-holder", "token", "--token-file", kh / "tokens", "--out", kh / "host.token",
         "--host", "gpu-1")  # fmt: skip
    cli("key-holder", "token", "--token-file", kh / "tokens", "--out", kh / "admin.token",
         "--role", "admin")  # fmt: skip
    assert (kh / "tokens").stat().st_mode & 0o777 == 0o600
    (kh / "revoked.txt").write_text("")
    secret_env = dict(os.environ, KH_PASS="")
    proc, url = _start_serve(
        [
            "--he-secret", str(owner.root / "sql.secret"),
            "--he-secret", str(owner.root / "billing.secret"),
            "--adapters", str(owner.packages),
            "--trusted-keys", str(owner.signing.with_suffix(".pub")),
            "--token-file", str(kh / "tokens"),
            "--audit-log", str(kh / "audit.jsonl"),
            "--revoked-file", str(kh / "revoked.txt"),
            "--tls-cert", str(kh / "tls" / "server.pem"),
            "--tls-key", str(kh / "tls" / "server.key"),
            "--port", "0",
        ],
        secret_env,
    )  # fmt: skip
    try:
        assert url.startswith("https://127.0.0.1:")
        host_token = (kh / "host.token").read_text().strip()
        health = RemoteKeyHolder(url, host_token, ca_file=kh / "tls" / "ca.pem").health()
        assert health["protocol_version"] == 2 and len(health["key_ids"]) == 2
        admin = ["--url", url, "--token-file", str(kh / "admin.token"),
                 "--ca", str(kh / "tls" / "ca.pem")]  # fmt: skip
        capsys.readouterr()
        cli("key-holder", "revoke", "sql-adapter", *admin)
        assert json.loads(capsys.readouterr().out)["revoked"] is True
        assert "sql-adapter" in (kh / "revoked.txt").read_text().split()
        cli("key-holder", "status", *admin)
        listed = {a["adapter"]: a for a in json.loads(capsys.readouterr().out)["adapters"]}
        assert listed["sql-adapter"]["revoked"] and not listed["billing"]["revoked"]
        cli("key-holder", "unrevoke", "sql-adapter", *admin)
        assert json.loads(capsys.readouterr().out)["revoked"] is False
        # A decrypt token is not an admin token.
        assert main(["key-holder", "revoke", "billing", "--url", url, "--token-file",
                     str(kh / "host.token"), "--ca", str(kh / "tls" / "ca.pem")]) == 1  # fmt: skip
        assert "may not call revoke" in capsys.readouterr().err
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.stderr is not None
    log = proc.stderr.read()
    assert host_token not in log and "Traceback" not in log
    cli("key-holder", "audit", "verify", kh / "audit.jsonl")


def test_serve_refuses_plain_http_beyond_loopback(owner: Owner, tmp_path: Path) -> None:
    (tmp_path / "tokens").write_text("t" * 32 + "\n")
    with pytest.raises(ConfigError, match="serves only HTTPS beyond loopback"):
        from vllm_tensafe.cli.key_holder import build_service

        build_service(_serve_args(owner, tmp_path, "--host", "0.0.0.0"))
    code = main(
        [
            "key-holder",
            "serve",
            "--he-secret",
            str(owner.root / "sql.secret"),
            "--adapters",
            str(owner.sql_v2),
            "--trusted-keys",
            str(owner.signing.with_suffix(".pub")),
            "--token-file",
            str(tmp_path / "tokens"),
            "--audit-log",
            str(tmp_path / "a.jsonl"),
            "--host",
            "0.0.0.0",
        ]
    )
    assert code == 1


def _serve_args(owner: Owner, tmp_path: Path, *extra: str) -> object:
    from vllm_tensafe.cli import build_parser

    return build_parser().parse_args(
        ["key-holder", "serve", "--he-secret", str(owner.root / "sql.secret"),
         "--adapters", str(owner.sql_v2), "--trusted-keys", str(owner.signing.with_suffix(".pub")),
         "--token-file", str(tmp_path / "tokens"), "--audit-log", str(tmp_path / "a.jsonl"),
         *extra]
    )  # fmt: skip


def test_help_explains_every_option() -> None:
    out = subprocess.run(
        [str(BIN), "key-holder", "serve", "--help"], capture_output=True, text=True, check=True
    ).stdout
    options = ("--he-secret", "--adapters", "--trusted-keys", "--token-file", "--audit-log",
               "--budget", "--revoked-file", "--tls-cert", "--client-ca", "SIGTERM")  # fmt: skip
    for option in options:
        assert option in out
    top = subprocess.run(
        [str(BIN), "key-holder", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for action in ("serve", "cert", "token", "revoke", "unrevoke", "status", "audit"):
        assert action in top
