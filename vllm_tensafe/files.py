"""Writing files that must not be lost, leaked or silently replaced.

* ``refuse_overwrite``: the one rule for outputs (keys, packages, certificates, tokens): an
  existing file is replaced only with ``force``; otherwise ``OutputExistsError`` names them all.
* ``write_private``: created with its final mode from the first byte on (a key is never
  readable by others, not even briefly), written whole to a temporary name, fsynced, renamed.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable
from contextlib import suppress
from pathlib import Path

from vllm_tensafe.errors import OutputExistsError


def refuse_overwrite(
    paths: Iterable[str | os.PathLike[str]],
    force: bool,
    fix: str = "choose another output, or pass --force to replace it",
) -> None:
    """Raise OutputExistsError unless ``force`` or none of ``paths`` exists."""
    existing = [os.fspath(p) for p in paths if Path(p).exists()]
    if existing and not force:
        raise OutputExistsError(f"refusing to overwrite {', '.join(existing)}", fix)


def write_private(path: str | os.PathLike[str], data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` atomically, the file never wider than ``mode``."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)  # the umask may have narrowed it; state it exactly
        os.replace(tmp, target)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
