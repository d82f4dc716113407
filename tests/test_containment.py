"""Client-given adapter paths stay inside the adapter folder, and the check never looks outside.

Every hostile form is tried against a folder next to a canary file, while every path the
check touches (lstat, stat, readlink, open) is recorded: nothing outside the folder may be
touched, so a refusal cannot tell whether a file outside exists.
"""

from __future__ import annotations

import builtins
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_tensafe.containment import MAX_PATH_CHARS, resolve_inside


@pytest.fixture
def layout(tmp_path: Path) -> dict[str, Path]:
    root = tmp_path / "adapters"
    (root / "sub").mkdir(parents=True)
    (root / "a.tssp").write_bytes(b"package")
    (root / "sub" / "b.tssp").write_bytes(b"package")
    (root / "peft").mkdir()
    canary = tmp_path / "canary.tssp"
    canary.write_bytes(b"outside")
    (tmp_path / "elsewhere").mkdir()
    (root / "inside-link.tssp").symlink_to("sub/b.tssp")
    (root / "abs-inside.tssp").symlink_to(root / "a.tssp")
    (root / "out-rel.tssp").symlink_to("../canary.tssp")
    (root / "out-abs.tssp").symlink_to(canary)
    (root / "out-dir").symlink_to(tmp_path / "elsewhere")
    (root / "loop.tssp").symlink_to("loop.tssp")
    (root / "self").symlink_to(".")
    return {"root": root, "canary": canary, "tmp": tmp_path}


@pytest.fixture
def touched(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Every path the code under test hands to the OS."""
    seen: list[str] = []
    for name in ("lstat", "stat", "readlink", "open", "listdir", "scandir", "access"):
        original = getattr(os, name)

        def spy(path, *args, _original=original, **kwargs):  # type: ignore[no-untyped-def]
            seen.append(os.fsdecode(path) if isinstance(path, str | bytes) else str(path))
            return _original(path, *args, **kwargs)

        monkeypatch.setattr(os, name, spy)
    original_open = builtins.open

    def spy_open(file, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(str(file))
        return original_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy_open)
    yield seen


def _only_inside(seen: list[str], root: Path) -> None:
    real = os.path.realpath(root)
    ancestors = {str(p) for p in Path(real).parents} | {real}
    outside = [p for p in seen if p not in ancestors and not p.startswith(real + os.sep)]
    assert not outside, f"touched outside the folder: {outside}"


@pytest.mark.parametrize(
    ("path", "want"),
    [
        ("a.tssp", "a.tssp"),
        ("sub/b.tssp", "sub/b.tssp"),
        ("./sub/../a.tssp", "a.tssp"),
        ("inside-link.tssp", "sub/b.tssp"),
        ("abs-inside.tssp", "a.tssp"),
        ("self/self/a.tssp", "a.tssp"),
        ("peft", "peft"),
        ("missing.tssp", "missing.tssp"),  # inside: the caller says "not found"
    ],
)
def test_inside_paths_resolve(
    layout: dict[str, Path], touched: list[str], path: str, want: str
) -> None:
    root = layout["root"]
    assert resolve_inside(root, path) == Path(os.path.realpath(root)) / want
    absolute = str(root / path)
    assert resolve_inside(root, absolute) == Path(os.path.realpath(root)) / want
    _only_inside(touched, root)


@pytest.mark.parametrize(
    "path",
    [
        "../canary.tssp",
        "sub/../../canary.tssp",
        "./../canary.tssp",
        "out-rel.tssp",
        "out-abs.tssp",
        "out-dir/x.tssp",
        "self/../canary.tssp",
        "loop.tssp",
        "",
        ".",
        "sub/..",
        "a.tssp\x00.tssp",
        "x" * (MAX_PATH_CHARS + 1),
        "/etc/passwd",
        "//etc/passwd",
    ],
)
def test_hostile_paths_are_refused_without_looking_outside(
    layout: dict[str, Path], touched: list[str], path: str
) -> None:
    root = layout["root"]
    assert resolve_inside(root, path) is None
    if not path.startswith("/"):
        assert resolve_inside(root, str(root) + "/" + path) is None
    _only_inside(touched, root)


def test_absolute_paths_outside_are_refused_alike(
    layout: dict[str, Path], touched: list[str]
) -> None:
    root = layout["root"]
    existing, missing = layout["canary"], layout["tmp"] / "no-such.tssp"
    assert resolve_inside(root, str(existing)) is None
    assert resolve_inside(root, str(missing)) is None
    assert resolve_inside(root, str(root) + "/../canary.tssp") is None
    assert resolve_inside(root, str(root) + "x/a.tssp") is None  # a sibling with the prefix
    _only_inside(touched, root)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    st.lists(
        st.sampled_from(["..", ".", "sub", "a.tssp", "out-rel.tssp", "out-dir", "self", "x", ""]),
        max_size=8,
    ),
    st.booleans(),
)
def test_any_combination_stays_inside(parts: list[str], absolute: bool) -> None:
    # Hypothesis needs no function-scoped fixtures: build the layout once per process.
    root = _shared_layout()
    path = "/".join(parts)
    if absolute:
        path = f"{root}/{path}"
    got = resolve_inside(root, path)
    if got is not None:
        real = os.path.realpath(root)
        assert str(got).startswith(real + os.sep)
        assert os.path.realpath(got) == str(got)  # no link left in what the caller opens


_LAYOUT: dict[str, Path] = {}


def _shared_layout() -> Path:
    if "root" not in _LAYOUT:
        import atexit
        import shutil
        import tempfile

        tmp = Path(tempfile.mkdtemp(prefix="containment-"))
        atexit.register(shutil.rmtree, tmp, True)
        root = tmp / "adapters"
        (root / "sub").mkdir(parents=True)
        (root / "a.tssp").write_bytes(b"p")
        (tmp / "canary.tssp").write_bytes(b"c")
        (tmp / "elsewhere").mkdir()
        (root / "out-rel.tssp").symlink_to("../canary.tssp")
        (root / "out-dir").symlink_to(tmp / "elsewhere")
        (root / "self").symlink_to(".")
        _LAYOUT["root"] = root
    return _LAYOUT["root"]


# --- the runtime load rule built on it (vllm_tensafe/vllm/serving.py) ---------------------------


def test_runtime_rule_plaintext_needs_the_setting(layout: dict[str, Path]) -> None:
    from vllm_tensafe.errors import AdapterPathRefusedError
    from vllm_tensafe.settings import TenSafeSettings
    from vllm_tensafe.vllm.serving import runtime_adapter_path

    root = layout["root"]
    strict = TenSafeSettings(adapter_dir=root)
    relaxed = TenSafeSettings(adapter_dir=root, allow_plaintext_lora=True)
    assert runtime_adapter_path(strict, "a", "a.tssp") == Path(os.path.realpath(root)) / "a.tssp"
    with pytest.raises(AdapterPathRefusedError, match="only encrypted"):
        runtime_adapter_path(strict, "p", "peft")
    assert runtime_adapter_path(relaxed, "p", "peft").name == "peft"
    for settings_ in (strict, relaxed):  # plaintext or not: never outside the folder
        with pytest.raises(AdapterPathRefusedError, match="inside the adapter folder"):
            runtime_adapter_path(settings_, "c", "../canary.tssp")
        with pytest.raises(AdapterPathRefusedError, match="plain adapter name"):
            runtime_adapter_path(settings_, "../c", "a.tssp")
