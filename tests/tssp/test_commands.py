"""The vllm-tensafe keygen / pack / verify / inspect commands, through cli.main."""

from __future__ import annotations

import base64
import json
import re
import stat
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from vllm_tensafe.cli import main

from .helpers import member_spans


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_keygen_signing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, out, _ = run(capsys, "keygen", "signing", "--out", tmp_path / "me")
    assert code == 0 and "signer key id:" in out
    key = tmp_path / "me.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert b"BEGIN PRIVATE KEY" in key.read_bytes()
    assert b"BEGIN PUBLIC KEY" in (tmp_path / "me.pub").read_bytes()

    before = key.read_bytes()
    code, _, err = run(capsys, "keygen", "signing", "--out", tmp_path / "me")
    assert code == 1 and "refusing to overwrite" in err and "--force" in err
    assert key.read_bytes() == before

    monkeypatch.setenv("OWNER_PASS", "s3cret")
    code, _, _ = run(
        capsys,
        "keygen",
        "signing",
        "--out",
        tmp_path / "me",
        "--force",
        "--passphrase-env",
        "OWNER_PASS",
    )
    assert code == 0 and b"ENCRYPTED PRIVATE KEY" in key.read_bytes()
    assert "s3cret" not in key.read_text()

    code, _, err = run(
        capsys,
        "keygen",
        "signing",
        "--out",
        tmp_path / "other",
        "--passphrase-env",
        "NOT_SET_ANYWHERE",
    )
    assert code == 1 and "NOT_SET_ANYWHERE" in err and "not set" in err


def test_keygen_he(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "keygen", "he", "--out", tmp_path / "he")
    assert code == 0 and "public key id" in out
    assert (tmp_path / "he.secret").is_file() and (tmp_path / "he.public").is_file()
    code, _, err = run(capsys, "keygen", "he", "--out", tmp_path / "he")
    assert code == 1 and "refusing to overwrite" in err


def test_pack_verify_inspect(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    adapter_dir: Path,
    llama_dir: Path,
    qwen2_dir: Path,
    he_keys: Any,
    other_signer: Any,
) -> None:
    monkeypatch.delenv("TENSAFE_TRUSTED_KEYS", raising=False)
    monkeypatch.setenv("PACK_PASS", "pw")
    assert (
        run(capsys, "keygen", "signing", "--out", tmp_path / "o", "--passphrase-env", "PACK_PASS")[
            0
        ]
        == 0
    )
    out_path = tmp_path / "demo.tssp"
    pack_args = [
        "pack",
        adapter_dir,
        "--base-model",
        llama_dir,
        "--signing-key",
        tmp_path / "o.key",
        "--he-public",
        he_keys.public_path,
        "-o",
        out_path,
    ]
    code, _, err = run(capsys, *pack_args)
    assert code == 1 and "passphrase" in err  # encrypted key, no --passphrase-env

    code, out, err = run(capsys, *pack_args, "--passphrase-env", "PACK_PASS")
    assert code == 0, err
    assert "wrote" in out and "'demo'" in out and out_path.is_file()
    assert "encrypting demo" in err  # the progress bar goes to stderr

    code, _, err = run(capsys, *pack_args, "--passphrase-env", "PACK_PASS")
    assert code == 1 and "refusing to overwrite" in err

    pub = tmp_path / "o.pub"
    code, out, _ = run(capsys, "verify", out_path, "--trusted-keys", pub)
    assert code == 0 and out.startswith("OK demo.tssp: adapter 'demo'") and out.count("\n") == 1

    code, out, _ = run(
        capsys,
        "verify",
        out_path,
        "--trusted-keys",
        f"{other_signer.pub_path},{pub}",
        "--base-model",
        llama_dir,
    )
    assert code == 0 and "matches --base-model" in out

    monkeypatch.setenv("TENSAFE_TRUSTED_KEYS", str(pub))
    assert run(capsys, "verify", out_path)[0] == 0
    monkeypatch.delenv("TENSAFE_TRUSTED_KEYS")

    code, _, err = run(capsys, "verify", out_path)
    assert code == 1 and "no trusted signer keys" in err
    code, _, err = run(capsys, "verify", out_path, "--trusted-keys", other_signer.pub_path)
    assert code == 1 and "is not trusted" in err and "--tensafe-trusted-keys" in err
    code, _, err = run(capsys, "verify", out_path, "--trusted-keys", pub, "--base-model", qwen2_dir)
    assert code == 1 and "base model mismatch" in err
    code, _, err = run(capsys, "verify", out_path, "--trusted-keys", tmp_path / "nope.pub")
    assert code == 1 and "nope.pub" in err

    data = bytearray(out_path.read_bytes())
    offset, _ = member_spans(bytes(data))["manifest.json"]
    data[offset + 20] ^= 1
    tampered = tmp_path / "tampered.tssp"
    tampered.write_bytes(bytes(data))
    code, _, err = run(capsys, "verify", tampered, "--trusted-keys", pub)
    assert code == 1 and "signature verification failed" in err
    assert err.startswith("vllm-tensafe: error: Invalid TSSP package: signature verification")

    # inspect: no trust needed, says so.
    code, out, _ = run(capsys, "inspect", out_path)
    assert code == 0
    assert "signature:   not checked" in out and "model.layers.1.self_attn.v_proj" in out
    assert "LlamaForCausalLM" in out and "profile" in out
    code, out, _ = run(capsys, "inspect", out_path, "--trusted-keys", pub)
    assert code == 0 and "signature:   valid" in out
    code, _, err = run(capsys, "inspect", tampered, "--trusted-keys", pub)
    assert code == 1 and "signature verification failed" in err

    code, out, _ = run(capsys, "inspect", out_path, "--json")
    assert code == 0
    report = json.loads(out)
    assert report["signature"].startswith("not checked")
    assert report["manifest"]["name"] == "demo"
    assert set(report["member_digests"].values()) == {"ok"}
    _assert_no_key_material(out, pub, he_keys, out_path)


def _assert_no_key_material(text: str, pub: Path, he_keys: Any, package: Path) -> None:
    assert "BEGIN" not in text and "PRIVATE" not in text
    raw_pub = serialization.load_pem_public_key(pub.read_bytes()).public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    for encoded in (raw_pub.hex(), base64.b64encode(raw_pub).decode()):
        assert encoded not in text
    # No long opaque strings: every long token is a 64-hex SHA-256 digest / key id.
    for token in re.findall(r"[A-Za-z0-9+/=]{65,}", text):
        raise AssertionError(f"suspicious long token in inspect output: {token[:40]}...")
    # Nothing from the HE context or ciphertext members appears verbatim.
    blob = package.read_bytes()
    for name in ("he_context", "lora_b.he"):
        offset, size = member_spans(blob)[name]
        sample = blob[offset + size // 2 : offset + size // 2 + 16]
        assert sample.hex() not in text and base64.b64encode(sample).decode() not in text
    ctx = he_keys.public_path.read_bytes()
    assert base64.b64encode(ctx[100:124]).decode() not in text


def test_pack_refusal_via_cli(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    adapter_dir: Path,
    llama_dir: Path,
    signer: Any,
    he_keys: Any,
) -> None:
    import shutil

    dora = shutil.copytree(adapter_dir, tmp_path / "dora")
    cfg = json.loads((dora / "adapter_config.json").read_text())
    cfg["use_dora"] = True
    (dora / "adapter_config.json").write_text(json.dumps(cfg))
    code, _, err = run(
        capsys,
        "pack",
        dora,
        "--base-model",
        llama_dir,
        "--signing-key",
        signer.key_path,
        "--he-public",
        he_keys.public_path,
        "-o",
        tmp_path / "d.tssp",
        "-q",
        "--key-records",
        tmp_path / "records.json",
    )
    assert code == 1 and "DoRA" in err and "Fix:" in err
    assert not (tmp_path / "d.tssp").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_help_texts(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (
        ["pack", "--help"],
        ["verify", "--help"],
        ["inspect", "--help"],
        ["keygen", "signing", "--help"],
        ["keygen", "he", "--help"],
    ):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 0
        assert len(capsys.readouterr().out) > 200
