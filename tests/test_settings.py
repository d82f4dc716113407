"""TENSAFE_* settings and the --tensafe-* flags on vLLM's real argument parser."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from vllm_tensafe.errors import ConfigError
from vllm_tensafe.settings import PROFILE_NAMES, TenSafeSettings, load_settings


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    import os

    for key in list(os.environ):
        if key.startswith("TENSAFE_"):
            monkeypatch.delenv(key)
    yield monkeypatch
    # cli_args.apply_cli_args writes TENSAFE_* into os.environ itself: drop what it wrote, so
    # later tests (which read the settings) do not see this test's values.
    for key in list(os.environ):
        if key.startswith("TENSAFE_"):
            os.environ.pop(key)


@pytest.fixture
def key_files(tmp_path: Path) -> dict[str, Path]:
    files = {}
    for name in ("owner.pub", "owner.secret", "token"):
        path = tmp_path / name
        path.write_text("x")
        files[name] = path
    return files


def test_disabled_by_default(clean_env: pytest.MonkeyPatch) -> None:
    settings = load_settings()
    assert settings.enabled is False
    assert settings.verify_signature is True
    assert settings.key_holder == "local"


def test_env_only(clean_env: pytest.MonkeyPatch, key_files: dict[str, Path]) -> None:
    clean_env.setenv("TENSAFE_ENABLED", "true")
    clean_env.setenv("TENSAFE_TRUSTED_KEYS", f"{key_files['owner.pub']}, {key_files['owner.pub']}")
    clean_env.setenv("TENSAFE_HE_SECRET", str(key_files["owner.secret"]))
    clean_env.setenv("TENSAFE_KEY_HOLDER_TIMEOUT", "2.5")
    settings = load_settings()
    assert settings.enabled
    assert settings.trusted_keys == [key_files["owner.pub"]] * 2
    assert settings.key_holder_timeout == 2.5


@pytest.mark.parametrize(
    ("env", "value", "named", "accepted"),
    [
        (
            "TENSAFE_PROFILE",
            "turbo",
            "--tensafe-profile / TENSAFE_PROFILE",
            "default, fast, precise",
        ),
        ("TENSAFE_ENABLED", "maybe", "--enable-tensafe / TENSAFE_ENABLED", "true or false"),
        (
            "TENSAFE_VERIFY_SIGNATURE",
            "sometimes",
            "--tensafe-verify-signature / TENSAFE_VERIFY_SIGNATURE",
            "true or false",
        ),
        (
            "TENSAFE_KEY_HOLDER_URL",
            "ftp://kh",
            "--tensafe-key-holder-url / TENSAFE_KEY_HOLDER_URL",
            "https://",
        ),
        (
            "TENSAFE_KEY_HOLDER_URL",
            "http://host:port",
            "--tensafe-key-holder-url / TENSAFE_KEY_HOLDER_URL",
            "https://",
        ),
        ("TENSAFE_HE_SECRET", "/nonexistent/owner.secret", "TENSAFE_HE_SECRET", "does not exist"),
        ("TENSAFE_TRUSTED_KEYS", "/nonexistent/a.pub", "TENSAFE_TRUSTED_KEYS", "does not exist"),
        ("TENSAFE_KEY_HOLDER", "cloud", "TENSAFE_KEY_HOLDER", "local or remote"),
        ("TENSAFE_KEY_HOLDER_TIMEOUT", "-1", "TENSAFE_KEY_HOLDER_TIMEOUT", "greater than 0"),
    ],
)
def test_bad_value_names_the_setting(
    clean_env: pytest.MonkeyPatch, env: str, value: str, named: str, accepted: str
) -> None:
    clean_env.setenv(env, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    message = str(info.value)
    assert "\n" not in message
    assert named in message
    assert accepted in message


def test_enabled_needs_its_keys(clean_env: pytest.MonkeyPatch, key_files: dict[str, Path]) -> None:
    clean_env.setenv("TENSAFE_ENABLED", "1")
    with pytest.raises(ConfigError, match="TENSAFE_HE_SECRET"):
        load_settings()
    clean_env.setenv("TENSAFE_HE_SECRET", str(key_files["owner.secret"]))
    with pytest.raises(ConfigError, match="TENSAFE_TRUSTED_KEYS"):
        load_settings()
    clean_env.setenv("TENSAFE_VERIFY_SIGNATURE", "false")
    assert load_settings().enabled
    clean_env.setenv("TENSAFE_KEY_HOLDER", "remote")
    with pytest.raises(ConfigError, match="TENSAFE_KEY_HOLDER_URL"):
        load_settings()


def test_profile_names_match_he_profiles() -> None:
    from vllm_tensafe.he.profiles import PROFILES

    assert set(PROFILES) == set(PROFILE_NAMES)


def test_register_is_cheap_and_idempotent_when_disabled() -> None:
    code = (
        "import os, sys\n"
        "[os.environ.pop(k) for k in list(os.environ) if k.startswith('TENSAFE_')]\n"
        "from vllm_tensafe.plugin import register\n"
        "register(); register()\n"
        "from vllm_tensafe.vllm.patches import is_installed\n"
        "assert is_installed('engine_args.add_cli_args')\n"
        "print('tenseal' in sys.modules, 'vllm_tensafe.vllm.layers' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    assert out.stdout.strip().splitlines()[-1] == "False False"


# --- flags on vLLM's real parser ---------------------------------------------------------------


@pytest.fixture(scope="module")
def serve_parser():  # type: ignore[no-untyped-def]
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from vllm_tensafe.plugin import register

    register()
    return AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())


def test_parser_has_every_setting_as_flag(serve_parser) -> None:  # type: ignore[no-untyped-def]
    from vllm_tensafe.settings import ENV_ONLY, flag_name

    flags = {opt for action in serve_parser._actions for opt in action.option_strings}
    for field in TenSafeSettings.model_fields:
        if field not in ENV_ONLY:
            assert flag_name(field) in flags


def test_flag_wins_over_env_and_turns_on_lora(
    serve_parser,  # type: ignore[no-untyped-def]
    clean_env: pytest.MonkeyPatch,
    key_files: dict[str, Path],
) -> None:
    from vllm_tensafe import plugin
    from vllm_tensafe.vllm import cli_args

    clean_env.setattr(plugin, "activate", lambda: None)  # hooks are tested with a real server
    clean_env.setenv("TENSAFE_KEY_HOLDER_TIMEOUT", "3")
    clean_env.setenv("TENSAFE_HE_SECRET", str(key_files["owner.secret"]))
    clean_env.setenv("TENSAFE_TRUSTED_KEYS", str(key_files["owner.pub"]))
    args = serve_parser.parse_args(
        ["--model", "m", "--enable-tensafe", "--tensafe-key-holder-timeout", "7"]
    )
    assert not args.enable_lora
    settings = cli_args.apply_cli_args(args)
    assert settings is not None and settings.key_holder_timeout == 7.0
    assert args.enable_lora is True
    import os

    # Written back so the engine and worker processes vLLM spawns build the same settings.
    assert os.environ["TENSAFE_KEY_HOLDER_TIMEOUT"] == "7"
    assert os.environ["TENSAFE_ENABLED"] == "true"


def test_bad_flag_value_is_one_clear_error(
    serve_parser,  # type: ignore[no-untyped-def]
    clean_env: pytest.MonkeyPatch,
) -> None:
    from vllm_tensafe.vllm import cli_args

    args = serve_parser.parse_args(["--model", "m", "--tensafe-verify-signature", "maybe"])
    with pytest.raises(ConfigError) as info:
        cli_args.apply_cli_args(args)
    assert "--tensafe-verify-signature" in str(info.value)
    assert "true or false" in str(info.value)
