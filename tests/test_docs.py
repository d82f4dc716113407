"""Docs that must not drift from the code."""

from __future__ import annotations

import re
from pathlib import Path

from vllm_tensafe.settings import TenSafeSettings, env_name, markdown_table

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_configuration_page_lists_exactly_the_settings() -> None:
    page = (DOCS / "configuration.md").read_text()
    table = page.split("<!-- settings-table", 1)[1].split("-->", 1)[1]
    table = table.split("<!-- /settings-table -->", 1)[0].strip()
    assert table == markdown_table(), "regenerate with: python -m vllm_tensafe.settings"
    documented = set(re.findall(r"`(TENSAFE_[A-Z_]+)`", page))
    expected = {env_name(name) for name in TenSafeSettings.model_fields}
    assert expected <= documented
    # Internal variables, and one read only by the `vllm-tensafe key-holder` admin commands.
    assert documented - expected == {
        "TENSAFE_RUN_DIR",
        "TENSAFE_ENGINE_ID",
        "TENSAFE_KEY_HOLDER_ADMIN_TOKEN_FILE",
    }
