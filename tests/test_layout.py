"""The package's layout: the folder map in docs/architecture.md is the tree, and the package
ships no test code (a plain install, without the extras, imports every module).

Only vllm_tensafe/vllm/ imports vLLM: tests/test_vllm_patches.py scans for that.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "vllm_tensafe"

# What only the [test] and [otlp] extras (or vLLM itself) install: no shipped module may need
# one of them to import.
EXTRAS_ONLY = (
    "transformers",
    "peft",
    "tokenizers",
    "openai",
    "hypothesis",
    "pytest",
    "schemathesis",
    "atheris",
    "opentelemetry.sdk",
    "opentelemetry.exporter",
    "vllm",
    "tests",
)


def _package_folders() -> set[str]:
    return {
        str(init.parent.relative_to(PACKAGE))
        for init in PACKAGE.rglob("__init__.py")
        if init.parent != PACKAGE and "__pycache__" not in init.parts
    }


def _mapped_folders() -> set[str]:
    """Folders under ``vllm_tensafe/`` in the map that opens docs/architecture.md."""
    page = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    block = page.split("```", 2)[1]  # the first fenced block is the map
    folders: set[str] = set()
    stack: list[tuple[int, str]] = []
    inside = False
    for line in block.splitlines():
        match = re.match(r"^( *)([a-z_]+)/(\s|$)", line)
        if not match:
            continue
        indent, name = len(match.group(1)), match.group(2)
        if indent == 0:
            inside = name == "vllm_tensafe"
            stack = []
            continue
        if not inside:
            continue
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, name))
        folders.add("/".join(part for _, part in stack))
    return folders


def test_the_architecture_map_is_the_package_tree() -> None:
    assert _mapped_folders() == _package_folders()


def test_the_map_opens_the_architecture_page() -> None:
    page = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    before_map = page.split("```", 1)[0]
    assert "## " not in before_map, "the folder map comes before the first section"


def _shipped_modules() -> list[str]:
    modules = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if "__pycache__" in parts or parts[-1] == "__main__":
            continue
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules.append(".".join(parts))
    return modules


_BLOCKER = """
import importlib, importlib.abc, json, sys

BLOCKED = set(json.loads(sys.argv[1]))


class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ModuleNotFoundError(f"{name} is not installed (plain install)", name=name)
        return None


sys.meta_path.insert(0, Blocker())
for name in list(sys.modules):
    if any(name == b or name.startswith(b + ".") for b in BLOCKED):
        del sys.modules[name]
failed = {}
for module in json.loads(sys.argv[2]):
    try:
        importlib.import_module(module)
    except Exception as exc:
        failed[module] = f"{type(exc).__name__}: {exc}"
print(json.dumps(failed))
"""


def _imports_with_hidden(blocked: list[str], modules: list[str]) -> dict[str, str]:
    """Import ``modules`` in a fresh interpreter where ``blocked`` cannot be imported: the
    modules that failed, with why."""
    result = subprocess.run(
        [sys.executable, "-c", _BLOCKER, json.dumps(blocked), json.dumps(modules)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_a_plain_install_imports_every_shipped_module() -> None:
    """Every module but vllm_tensafe.vllm.* (which needs vLLM) imports without the extras."""
    modules = [m for m in _shipped_modules() if not m.startswith("vllm_tensafe.vllm.")]
    assert "vllm_tensafe.keyholder.server.app" in modules and len(modules) > 50
    assert _imports_with_hidden(EXTRAS_ONLY, modules) == {}


def test_the_blocker_hides_what_is_installed() -> None:
    """Guard: transformers is installed here, and the subprocess still cannot import it."""
    failed = _imports_with_hidden(
        EXTRAS_ONLY, ["transformers", "peft.tuners", "vllm_tensafe.errors"]
    )
    assert set(failed) == {"transformers", "peft.tuners"}
    assert all("not installed (plain install)" in reason for reason in failed.values())


def test_torch_ring_is_pure_torch() -> None:
    """docs/gpu-he.md: torch_ring.py is pure torch, no TenSEAL. With TenSEAL hidden it imports;
    ring.py (SEAL's NTT) does not, which shows the blocker hid it."""
    failed = _imports_with_hidden(
        ["tenseal", "_sealapi_cpp"], ["vllm_tensafe.he.torch_ring", "vllm_tensafe.he.ring"]
    )
    assert set(failed) == {"vllm_tensafe.he.ring"}
