"""docs/attestation.md keeps up with the code: every refusal code, setting and command."""

from __future__ import annotations

from pathlib import Path

from vllm_tensafe.attestation.routes import ERROR_CODES
from vllm_tensafe.settings import env_name, flag_name

PAGE = Path(__file__).resolve().parents[2] / "docs" / "attestation.md"


def test_every_refusal_code_is_documented_with_its_error() -> None:
    page = PAGE.read_text()
    for cls, _, code in ERROR_CODES:
        if code in ("attestation_tpm", "attestation_refused"):
            continue  # host-side and catch-all: not refusals of a quote
        assert f"`{code}`" in page and f"`{cls.__name__}`" in page, code


def test_settings_and_commands_are_documented() -> None:
    page = PAGE.read_text()
    for field in ("require_attestation", "tpm_tcti", "tpm_ak"):
        assert f"`{flag_name(field)}`" in page and f"`{env_name(field)}`" in page
    for command in ("attestation enrol", "attestation check-policy", "attestation attest"):
        assert f"vllm-tensafe {command}" in page


def test_the_service_option_and_routes_are_documented() -> None:
    from vllm_tensafe.attestation.routes import NONCE_PATH, QUOTE_PATH

    key_holder = (PAGE.parent / "key-holder.md").read_text()
    for page in (PAGE.read_text(), key_holder):
        assert "--attestation-policy" in page
        assert f"POST {NONCE_PATH}" in page and f"POST {QUOTE_PATH}" in page
    assert "`--attestation-policy F`" in key_holder  # the options table
