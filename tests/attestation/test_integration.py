"""require_attestation in the settings, the flags, the guide's config and the command line."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from vllm_tensafe.api import TenSafeVLLMConfig
from vllm_tensafe.cli import main as tensafe_cli
from vllm_tensafe.errors import ConfigError
from vllm_tensafe.settings import TenSafeSettings, load_settings

from .conftest import Host
from .service import TOKEN

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in list(os.environ):
        if var.startswith("TENSAFE_"):
            monkeypatch.delenv(var)


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    return path


# --- settings and flags -------------------------------------------------------------------------


def test_settings_refuse_attestation_without_remote_key_holder_or_ak(
    clean_env: None, tmp_path: Path, token_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pub = tmp_path / "signer.pub"
    pub.write_text("-")
    base = {
        "TENSAFE_ENABLED": "true",
        "TENSAFE_TRUSTED_KEYS": str(pub),
        "TENSAFE_REQUIRE_ATTESTATION": "true",
    }
    for key, value in base.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("TENSAFE_HE_SECRET", str(pub))
    with pytest.raises(ConfigError, match=r"needs the remote key holder.*local key holder is"):
        load_settings()
    monkeypatch.setenv("TENSAFE_KEY_HOLDER", "remote")
    monkeypatch.setenv("TENSAFE_KEY_HOLDER_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("TENSAFE_KEY_HOLDER_TOKEN_FILE", str(token_file))
    with pytest.raises(ConfigError, match=r"TENSAFE_TPM_AK.*vllm-tensafe attestation enrol"):
        load_settings()
    monkeypatch.setenv("TENSAFE_TPM_AK", "0x81010002")
    settings = load_settings()
    assert settings.require_attestation and settings.tpm_tcti == "device:/dev/tpmrm0"


def test_flags_come_from_the_settings() -> None:
    from vllm_tensafe.vllm.cli_args import add_tensafe_args

    parser = argparse.ArgumentParser()
    add_tensafe_args(parser)
    text = parser.format_help()
    assert "--tensafe-require-attestation [{true,false}]" in text
    assert "--tensafe-tpm-tcti" in text and "--tensafe-tpm-ak" in text
    assert "[env: TENSAFE_REQUIRE_ATTESTATION; default: false]" in " ".join(text.split())


# --- the guide's config -------------------------------------------------------------------------


def test_guide_config_refuses_with_what_is_missing(clean_env: None, token_file: Path) -> None:
    with pytest.raises(ConfigError, match=r"tpm_ak \(the host's TPM attestation key\) is not"):
        TenSafeVLLMConfig(
            model="m",
            require_attestation=True,
            key_holder="remote",
            key_holder_url="https://kh.example:8443",
            key_holder_token_file=str(token_file),
        )
    with pytest.raises(ConfigError, match=r"key_holder='remote' is not configured") as err:
        TenSafeVLLMConfig(
            model="m",
            require_attestation=True,
            key_holder_url="https://kh.example:8443",
            key_holder_token_file=str(token_file),
            tpm_ak="0x81010002",
        )
    assert "Fix: set key_holder='remote'" in str(err.value)


def test_guide_config_accepts_a_tpm_and_a_remote_key_holder(
    clean_env: None, token_file: Path
) -> None:
    config = TenSafeVLLMConfig(
        model="m",
        require_attestation=True,
        key_holder="remote",
        key_holder_url="https://kh.example:8443",
        key_holder_token_file=str(token_file),
        tpm_ak="0x81010002",
        tpm_tcti="swtpm:host=127.0.0.1,port=2321",
        verify_tssp_signature=False,
    )
    env = config.tensafe_environment()
    assert env["TENSAFE_REQUIRE_ATTESTATION"] == "true"
    assert env["TENSAFE_TPM_AK"] == "0x81010002"
    assert env["TENSAFE_TPM_TCTI"] == "swtpm:host=127.0.0.1,port=2321"
    settings = config.to_settings()
    assert settings.require_attestation and settings.tpm_ak == "0x81010002"


def test_guide_config_default_never_turns_attestation_off(
    clean_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TENSAFE_REQUIRE_ATTESTATION", "true")
    env = TenSafeVLLMConfig(model="m").tensafe_environment()
    assert "TENSAFE_REQUIRE_ATTESTATION" not in env  # the environment's true stays in charge


@pytest.mark.vllm  # imports vLLM and calls AsyncLLM.from_engine_args (refused before it starts)
def test_guide_engine_refuses_to_start_without_a_tpm(tmp_path: Path, token_file: Path) -> None:
    # A child process: initialize() installs the plugin's hooks in the process that runs it.
    pub = tmp_path / "signer.pub"
    assert tensafe_cli(["keygen", "signing", "--out", str(tmp_path / "signer")]) == 0
    script = textwrap.dedent(
        f"""
        import asyncio
        from vllm_tensafe.api import (TenSafeAsyncEngine, TenSafeVLLMConfig)
        from vllm_tensafe.errors import TpmError
        config = TenSafeVLLMConfig(
            model="no-model-is-loaded", require_attestation=True, key_holder="remote",
            key_holder_url="http://127.0.0.1:9", key_holder_token_file={str(token_file)!r},
            tpm_ak="0x81010002", tpm_tcti="device:{tmp_path}/tpmrm0",
            trusted_keys=[{str(pub)!r}],
        )
        try:
            asyncio.run(TenSafeAsyncEngine(config).initialize())
        except TpmError as exc:
            print("REFUSED:", exc)
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("TENSAFE_")}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600
    )
    assert "REFUSED: no TPM on this host" in done.stdout, done.stdout + done.stderr[-3000:]


# --- the command line ---------------------------------------------------------------------------


def test_enrol_and_check_policy_commands(
    host_a: Host, tmp_path: Path, capsys: pytest.CaptureFixture[str], clean_env: None
) -> None:
    out = tmp_path / "node.ak.pem"
    code = tensafe_cli(
        ["attestation", "enrol", "--host", "node-1", "--out", str(out),
         "--tcti", host_a.tpm.tcti, "--handle", "0x81010005", "--pcrs", "sha256:0,4,7"]
    )  # fmt: skip
    assert code == 0
    entry = capsys.readouterr().out
    assert entry.startswith("[hosts.node-1]") and 'attestation_keys = ["node.ak.pem"]' in entry
    (tmp_path / "policy.toml").write_text(entry)
    assert tensafe_cli(["attestation", "check-policy", str(tmp_path / "policy.toml")]) == 0
    assert "node-1: PCRs sha256:0,4,7" in capsys.readouterr().out
    # Enrolling again at the same handle refuses (never overwrites), unless --reuse.
    again = ["attestation", "enrol", "--host", "n", "--out", str(out), "--tcti", host_a.tpm.tcti,
             "--handle", "0x81010005"]  # fmt: skip
    assert tensafe_cli(again) == 1
    assert "already in use" in capsys.readouterr().err
    assert tensafe_cli([*again, "--reuse"]) == 0


def test_settings_model_has_the_attestation_fields() -> None:
    fields = TenSafeSettings.model_fields
    assert {"require_attestation", "tpm_tcti", "tpm_ak"} <= set(fields)
