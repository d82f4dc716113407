"""Keep client-given adapter paths inside one folder, without looking outside it.

``/v1/load_lora_adapter`` takes a ``lora_path`` from the client. With ``TENSAFE_ADAPTER_DIR``
set, that path must name something inside the folder. The check must not itself become an
oracle: a path outside the folder is refused without being opened or stat'ed, so a refusal
reads the same whether or not the file exists. Symbolic links inside the folder are followed
one component at a time, and a link whose target leads out of the folder is refused before the
target is touched. The caller then uses the returned path, which contains no link and no
``..``, so what is opened later is what was checked.
"""

from __future__ import annotations

import os
from pathlib import Path

# Longer paths are refused outright (Linux's PATH_MAX is 4096).
MAX_PATH_CHARS = 4096
# Links followed in one resolution, as the kernel's own limit (ELOOP).
MAX_LINK_HOPS = 40


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def resolve_inside(root: str | os.PathLike[str], path: str) -> Path | None:
    """The real path of ``path`` (relative paths are taken relative to ``root``) if it stays
    inside ``root`` and is not ``root`` itself; else None. Reads only inside ``root``."""
    if not isinstance(path, str) or not path or len(path) > MAX_PATH_CHARS or "\x00" in path:
        return None
    real_root = os.path.realpath(os.fspath(root))
    if os.path.isabs(path):
        # Textually under the folder (its real path or the form it was configured with), or
        # refused without a look; ".." after the prefix is walked like any other part.
        for prefix in (real_root, os.path.abspath(os.fspath(root))):
            if _inside(path, prefix):
                pending = _parts(path[len(prefix) :])
                break
        else:
            return None
    else:
        pending = _parts(path)
    current = real_root
    hops = 0
    while pending:
        part = pending.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            # ``current`` holds no link, so its parent is what the kernel would use.
            current = os.path.dirname(current)
            if not _inside(current, real_root):
                return None
            continue
        candidate = os.path.join(current, part)
        if os.path.islink(candidate):  # an lstat inside the folder
            hops += 1
            if hops > MAX_LINK_HOPS:
                return None
            try:
                target = os.readlink(candidate)
            except OSError:
                return None
            if os.path.isabs(target):
                for prefix in (real_root, os.path.abspath(os.fspath(root))):
                    if _inside(target, prefix):
                        pending = _parts(target[len(prefix) :]) + pending
                        current = real_root
                        break
                else:
                    return None  # never walk an absolute target that starts outside
            else:
                pending = _parts(target) + pending
            continue
        current = candidate
    if current == real_root or not _inside(current, real_root):
        return None
    return Path(current)


def _parts(path: str) -> list[str]:
    return [part for part in path.split(os.sep) if part not in ("", ".")]
