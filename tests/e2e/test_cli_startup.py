"""The stock ``vllm`` CLI with the plugin installed: help, bad settings, bad packages at startup.

Each case runs the real ``vllm serve`` and reads what a user reads: the exit code and the last
line of its output.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import AdapterFactory, Keys
from tests.support.server_process import CPU_ARGS, CPU_ENV, vllm_executable

pytestmark = pytest.mark.vllm


def _vllm(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> tuple[int, str]:
    import os

    clean = {k: v for k, v in os.environ.items() if not k.startswith("TENSAFE_")}
    proc = subprocess.run(
        [vllm_executable(), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**clean, **CPU_ENV, **(env or {})},
        stdin=subprocess.DEVNULL,
    )
    return proc.returncode, proc.stdout + proc.stderr


def _last_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def test_serve_help_lists_the_flags() -> None:
    code, out = _vllm("serve", "--help=tensafe")
    assert code == 0, out[-2000:]
    for flag in ("--enable-tensafe", "--tensafe-trusted-keys", "--tensafe-key-holder-url"):
        assert flag in out
    assert "TENSAFE_ENABLED" in out
    # Real defaults, not argparse's "(default: None)" (an unset flag leaves TENSAFE_* in
    # charge, so the flags' own default is "not given").
    assert "(default: None)" not in out  # the output lists only the matching (TenSafe) flags
    flat = " ".join(out.split())
    for shown in (
        "TENSAFE_KEY_HOLDER; default: local]",
        "TENSAFE_KEY_HOLDER_TIMEOUT; default: 10.0]",
        "TENSAFE_KEY_HOLDER_RETRIES; default: 2]",
        "TENSAFE_VERIFY_SIGNATURE; default: true]",
        "TENSAFE_PROFILE; default: default]",
    ):
        assert shown in flat, shown


def test_console_script_version() -> None:
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("vllm-tensafe")), "--version"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert proc.stdout.startswith("vllm-tensafe ")


def test_bad_setting_stops_startup_with_one_clear_line(tiny_llama: Path) -> None:
    code, out = _vllm(
        "serve", str(tiny_llama), *CPU_ARGS, "--enable-tensafe",
        env={"TENSAFE_PROFILE": "turbo"},
    )  # fmt: skip
    assert code != 0
    last = _last_line(out)
    assert "TENSAFE_PROFILE" in last and "default, fast, precise" in last, last


@pytest.mark.parametrize("case", ["tampered", "untrusted", "wrong base model"])
def test_bad_package_stops_startup(
    case: str,
    tiny_llama: Path,
    tiny_qwen2: Path,
    adapters: AdapterFactory,
    owner_keys: Keys,
    stranger_keys: Keys,
    tmp_path: Path,
) -> None:
    peft = adapters.peft(tiny_llama, "llama-r8-qv", rank=8, alpha=16, seed=11)
    if case == "tampered":
        package = tmp_path / "tampered.tssp"
        data = bytearray(adapters.package(peft, tiny_llama, "e8").read_bytes())
        data[-100] ^= 0x40
        package.write_bytes(bytes(data))
        needle = "digest"
    elif case == "untrusted":
        package = adapters.package(peft, tiny_llama, "stranger-e8", keys=stranger_keys)
        needle = "not trusted"
    else:
        qwen_peft = adapters.peft(tiny_qwen2, "qwen2-r8-qv", seed=21)
        package = adapters.package(qwen_peft, tiny_qwen2, "qwen-e8")
        needle = "base model"
    code, out = _vllm(
        "serve", str(tiny_llama), *CPU_ARGS,
        "--enable-tensafe",
        "--tensafe-trusted-keys", str(owner_keys.signing_pub),
        "--tensafe-he-secret", str(owner_keys.he_secret),
        "--lora-modules", f"bad={package}",
    )  # fmt: skip
    assert code != 0
    last = _last_line(out)
    assert last.startswith("vllm-tensafe: error: --lora-modules bad="), last
    assert needle in last.lower(), last
    assert "Fix:" in last
