"""The guide's ``TSSPService``: load a package's container, verify it (``vllm_tensafe.tssp``)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from vllm_tensafe.errors import TsspError
from vllm_tensafe.settings import env_name, split_list

if TYPE_CHECKING:
    from vllm_tensafe.tssp import PackageSummary


@dataclass(frozen=True)
class PackageHandle:
    """A package file whose container structure was read. NOT verified: nothing in it is
    trusted until ``TSSPService.verify_package`` says so."""

    path: Path
    size_bytes: int
    format_version: int


class TSSPService:
    """The guide's ``TSSPService``: ``load_package`` then ``verify_package``.

    ``trusted_keys`` are the signers' ``.pub`` files (PEM); without them (here, per call, or in
    ``TENSAFE_TRUSTED_KEYS``) no package verifies. ``base_model`` (a local model folder) adds
    the base-model binding check.
    """

    def __init__(
        self,
        trusted_keys: list[str | os.PathLike[str]] | None = None,
        *,
        base_model: str | os.PathLike[str] | None = None,
    ) -> None:
        self.trusted_keys = list(trusted_keys or [])
        self.base_model = base_model

    def load_package(self, path: str | os.PathLike[str]) -> PackageHandle:
        """Read the container structure (raises a TsspError if it is not a TSSP file)."""
        from vllm_tensafe.tssp.format import ContainerReader

        with ContainerReader(path) as reader:
            return PackageHandle(
                path=Path(path),
                size_bytes=reader.layout.total_size,
                format_version=reader.layout.version,
            )

    def verify_package(
        self,
        package: PackageHandle | str | os.PathLike[str],
        trusted_keys: list[str | os.PathLike[str]] | None = None,
    ) -> PackageSummary:
        """Signature by a trusted key, every digest, the HE context, the base binding.

        Returns what was established (signer, adapter, rank, modules, base model); raises the
        TsspError that names the cause and fix when the package is refused, so no caller can
        use a package it forgot to check. ConfigError: no trusted keys, or one that cannot be
        read.
        """
        from vllm_tensafe.tssp import TrustStore, verify_package
        from vllm_tensafe.tssp.base_model import local_model_config

        path = package.path if isinstance(package, PackageHandle) else Path(package)
        keys = list(trusted_keys or self.trusted_keys or _env_trusted_keys())
        if not keys:
            raise TsspError(
                "no trusted signer keys were given, so the package cannot be verified",
                "pass TSSPService(trusted_keys=[SIGNER.pub]) or set TENSAFE_TRUSTED_KEYS",
            )
        base = local_model_config(os.fspath(self.base_model)) if self.base_model else None
        return verify_package(path, trust=TrustStore.from_files(keys), base_model_config=base)


def _env_trusted_keys() -> list[str]:
    return split_list(os.environ.get(env_name("trusted_keys"), ""))
