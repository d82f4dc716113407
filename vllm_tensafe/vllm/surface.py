"""Check the patch table against vLLM *source*, without importing or installing that vLLM.

Upgrading means reading the next vLLM's wheel: unpack its ``.py`` files and run
``python -m vllm_tensafe.vllm.surface /path/to/unpacked --series 0.33``. Every entry of the
table (patches.py) for that series, or for the newest tested series when the new one has none
yet, is looked up in the source (following ``from x import y`` re-exports) and its parameters
rendered the way ``patches.render_signature`` renders a live object, so the report reads the
same as the live check. Names vLLM creates at run time (a module ``__getattr__``) are reported
as not checked.
"""

from __future__ import annotations

import argparse
import ast
from dataclasses import dataclass
from pathlib import Path

from vllm_tensafe.vllm import patches, versions


@dataclass(frozen=True)
class Finding:
    entry: patches.Entry
    status: str  # "ok", "dynamic", or what is wrong

    @property
    def ok(self) -> bool:
        return self.status in ("ok", "dynamic")


class SourceTree:
    """The ``vllm`` package under ``root`` (the folder that holds ``vllm/``)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._parsed: dict[str, ast.Module | None] = {}

    def module(self, name: str) -> ast.Module | None:
        if name not in self._parsed:
            base = self.root.joinpath(*name.split("."))
            for path in (base.with_suffix(".py"), base / "__init__.py"):
                if path.is_file():
                    self._parsed[name] = ast.parse(path.read_text(encoding="utf-8"))
                    break
            else:
                self._parsed[name] = None
        return self._parsed[name]

    def find(self, module: str, attribute: str, depth: int = 0) -> ast.AST | str | None:
        """The AST node of ``module.attribute``; "dynamic" for a module ``__getattr__``."""
        tree = self.module(module)
        if tree is None or depth > 8:
            return None
        first, _, rest = attribute.partition(".")
        node = _top_level(tree, first)
        if isinstance(node, ast.ImportFrom):
            source = _import_source(module, node, self._is_package(module))
            return self.find(source, attribute, depth + 1) if source else None
        if node is None:
            has_getattr = _top_level(tree, "__getattr__") is not None
            return "dynamic" if has_getattr else None
        for part in rest.split(".") if rest else ():
            if not isinstance(node, ast.ClassDef):
                return None
            node = _in_class(node, part)
            if node is None:
                return None
        return node

    def class_fields(self, module: str, cls: ast.ClassDef, depth: int = 0) -> set[str]:
        """Annotated class attributes of ``cls`` and of its bases found in this tree."""
        names = {
            stmt.target.id
            for stmt in cls.body
            if isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and "ClassVar" not in ast.unparse(stmt.annotation)
        }
        if depth < 4:
            for base in cls.bases:
                base_node = self.find(module, ast.unparse(base), depth + 1)
                if isinstance(base_node, ast.ClassDef):
                    names |= self.class_fields(module, base_node, depth + 1)
        return names

    def env_names(self) -> set[str]:
        tree = self.module("vllm.envs")
        node = _top_level(tree, "environment_variables") if tree else None
        value = getattr(node, "value", None)
        if not isinstance(value, ast.Dict):
            return set()
        return {
            k.value for k in value.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)
        }

    def _is_package(self, module: str) -> bool:
        return (self.root.joinpath(*module.split(".")) / "__init__.py").is_file()


def check_tree(root: Path, series: str) -> list[Finding]:
    """Findings for every table entry of ``series`` (else of the newest tested series)."""
    tree = SourceTree(root)
    names = dict.fromkeys(entry.name for entry in patches.TABLE)
    findings = []
    for name in names:
        candidates = patches.entries(name)
        entry = next((e for e in candidates if series in e.versions), None)
        if entry is None:
            entry = max(candidates, key=lambda e: max(versions.series_key(v) for v in e.versions))
        findings.append(Finding(entry, _status(tree, entry)))
    known = tree.env_names()
    for env in patches.ENV_VARS:
        entry = patches.Entry(env, "vllm.envs", "environment_variables", patches.BOTH, "read")
        findings.append(Finding(entry, "ok" if env in known else "not in vllm.envs"))
    return findings


def _status(tree: SourceTree, entry: patches.Entry) -> str:
    node = tree.find(entry.module, entry.attribute)
    if entry.action == "add":
        owner_path = entry.attribute.rsplit(".", 1)[0]
        owner = tree.find(entry.module, owner_path)
        if not isinstance(owner, ast.ClassDef):
            return "its owner is missing"
        return "vLLM has an attribute of this name now" if node is not None else "ok"
    if node is None:
        return "missing"
    if node == "dynamic":
        return "dynamic"
    if entry.signature is not None:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            return "is not a function"
        found = render_arguments(node.args)
        if found != entry.signature:
            return f"expected parameters ({entry.signature}), found ({found})"
    if entry.fields:
        if not isinstance(node, ast.ClassDef):
            return "is not a class"
        missing = [f for f in entry.fields if f not in tree.class_fields(entry.module, node)]
        if missing:
            return f"has no field {', '.join(missing)}"
    return "ok"


def render_arguments(args: ast.arguments) -> str:
    """``patches.render_signature`` for source: the same text for the same parameters."""
    parts: list[str] = []
    positional = [*args.posonlyargs, *args.args]
    defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    for arg, default in zip(positional, defaults, strict=True):
        parts.append(arg.arg + (f"={_default(default)}" if default is not None else ""))
    if args.vararg is not None:
        parts.append(f"*{args.vararg.arg}")
    elif args.kwonlyargs:
        parts.append("*")
    for arg, default in zip(args.kwonlyargs, args.kw_defaults, strict=True):
        parts.append(arg.arg + (f"={_default(default)}" if default is not None else ""))
    if args.kwarg is not None:
        parts.append(f"**{args.kwarg.arg}")
    return ", ".join(parts)


def _default(node: ast.expr) -> str:
    try:
        value = ast.literal_eval(node)
    except (ValueError, SyntaxError, TypeError):
        return "..."
    return patches.render_default(value)


def _top_level(tree: ast.Module, name: str) -> ast.AST | None:
    found: ast.AST | None = None
    for stmt in tree.body:
        for candidate in _defines(stmt, name):
            found = candidate  # the last definition wins, as at run time
    return found


def _defines(stmt: ast.stmt, name: str) -> list[ast.AST]:
    if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [stmt] if stmt.name == name else []
    if isinstance(stmt, ast.Assign):
        return [stmt] if any(_names(t, name) for t in stmt.targets) else []
    if isinstance(stmt, ast.AnnAssign):
        return [stmt] if _names(stmt.target, name) else []
    if isinstance(stmt, ast.ImportFrom):
        return [stmt] if any((a.asname or a.name) == name for a in stmt.names) else []
    if isinstance(stmt, (ast.If, ast.Try)):
        # Definitions under `if TYPE_CHECKING:` / `else:` / `try:` count (first branch wins).
        bodies = [stmt.body, getattr(stmt, "orelse", [])]
        for body in bodies:
            for inner in body:
                hits = _defines(inner, name)
                if hits:
                    return hits
    return []


def _names(target: ast.expr, name: str) -> bool:
    if isinstance(target, ast.Name):
        return target.id == name
    if isinstance(target, ast.Tuple):
        return any(_names(t, name) for t in target.elts)
    return False


def _in_class(cls: ast.ClassDef, name: str) -> ast.AST | None:
    found = None
    for stmt in cls.body:
        for candidate in _defines(stmt, name):
            found = candidate
    return found


def _import_source(module: str, node: ast.ImportFrom, is_package: bool) -> str | None:
    if node.level == 0:
        return node.module
    parts = module.split(".")
    base = parts if is_package else parts[:-1]
    if node.level > 1:
        base = base[: -(node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vllm_tensafe.vllm.surface",
        description="Check the vLLM patch table against unpacked vLLM source (no import).",
    )
    parser.add_argument("root", type=Path, help="folder that holds the vllm/ package")
    parser.add_argument("--series", help="vLLM minor series, e.g. 0.26 (default: from source)")
    args = parser.parse_args(argv)
    series = args.series or _series_from_source(args.root)
    findings = check_tree(args.root, series)
    bad = [f for f in findings if not f.ok]
    print(f"vLLM source {args.root} (series {series}): {len(findings)} entries")
    for finding in findings:
        if finding.status != "ok":
            print(
                f"  {finding.status.upper() if finding.ok else 'PROBLEM'} "
                f"{finding.entry.name} ({finding.entry.target}): {finding.status}"
            )
    if not bad:
        print("  all present with the expected parameters")
    return 1 if bad else 0


def _series_from_source(root: Path) -> str:
    version_file = root / "vllm" / "_version.py"
    if version_file.is_file():
        for line in version_file.read_text(encoding="utf-8").splitlines():
            if line.startswith("__version__") and "=" in line:
                value = line.rsplit("=", 1)[1].strip().strip("'\"")
                return versions.series_of(value)
    raise SystemExit(f"cannot read the vLLM version under {root}; pass --series")


if __name__ == "__main__":
    raise SystemExit(main())
