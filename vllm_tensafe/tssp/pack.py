"""Pack a PEFT LoRA adapter into a signed TSSP package (the adapter owner's side).

Steps: read and check the adapter against the base model's config.json (adapter.py), mix
each module with a fresh random R (mixing.py), encrypt each B' under the owner's public CKKS
context (vllm_tensafe.he), write the members, build and sign the manifest, and write the
container atomically (format.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from vllm_tensafe import __version__
from vllm_tensafe.errors import TsspError
from vllm_tensafe.tssp import lora_a
from vllm_tensafe.tssp.adapter import load_base_config, read_adapter
from vllm_tensafe.tssp.base_model import make_binding
from vllm_tensafe.tssp.ciphertexts import BlobSpool
from vllm_tensafe.tssp.format import (
    FORMAT_VERSION,
    HE_CONTEXT,
    LORA_A,
    LORA_B,
    MANIFEST,
    MEMBER_LIMITS,
    SIGNATURE,
    write_container,
)
from vllm_tensafe.tssp.manifest import (
    MAX_ADAPTER_VERSION,
    NAME_RULE,
    canonical_json,
    is_adapter_name,
    parse_canonical_json,
    parse_utc,
    validate_manifest,
)
from vllm_tensafe.tssp.mixing import mix_factors, new_generator
from vllm_tensafe.tssp.signing import key_id, sign_manifest

if TYPE_CHECKING:
    from vllm_tensafe.he import PublicContext


def _json_value(value: Any) -> Any:
    """A JSON round trip: tuples become lists, so the stored layout compares equal on read."""
    return json.loads(canonical_json(value))


# Sub-modules vLLM computes in one layer, in the order the layer concatenates their outputs
# (vLLM's packed_modules_mapping for Llama-family models: qkv_proj, gate_up_proj). Packing
# them into one tile lets the host decrypt one ciphertext per token group for the whole layer;
# a model that computes them separately still gets correct (just unfused) deltas.
FUSED_SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def layer_groups(d_outs: dict[str, int]) -> list[list[tuple[str, int]]]:
    """Module names grouped by the vLLM layer that computes them, in slice order."""
    groups: dict[tuple[str, int], list[tuple[str, int]]] = {}
    singles: list[list[tuple[str, int]]] = []
    order = {leaf: (family, index) for family, names in enumerate(FUSED_SIBLINGS)
             for index, leaf in enumerate(names)}  # fmt: skip
    for name, d_out in d_outs.items():
        parent, _, leaf = name.rpartition(".")
        if leaf in order:
            family, _index = order[leaf]
            groups.setdefault((parent, family), []).append((name, d_out))
        else:
            singles.append([(name, d_out)])
    fused = [
        sorted(members, key=lambda m: order[m[0].rpartition(".")[2]][1])
        for members in groups.values()
    ]
    return fused + singles


def default_name(out_path: Path) -> str:
    return out_path.name.removesuffix(".tssp")


def pack_adapter(
    adapter_dir: str | os.PathLike[str],
    base_model_dir: str | os.PathLike[str],
    *,
    signing_key: Ed25519PrivateKey,
    public_context: PublicContext,
    out_path: str | os.PathLike[str],
    name: str | None = None,
    mix: bool = True,
    progress: bool = True,
    adapter_version: int = 1,
    not_after: str | None = None,
) -> Path:
    """Write ``out_path`` (a .tssp file) and return its path.

    ``name`` is the adapter name the package declares (default: the file name without
    ``.tssp``); it must match ``[A-Za-z0-9][A-Za-z0-9._-]{0,127}`` because it becomes a model
    name in URLs and CLI flags, and it is the "adapter id" key holders meter and revoke by.
    ``adapter_version`` must grow with each new package of the same name (hosts and key holders
    refuse older ones); ``not_after`` (``YYYY-MM-DDTHH:MM:SSZ``) is an optional expiry.
    ``mix=False`` stores A as is (A' = A); only for debugging.
    """
    from tqdm import tqdm

    from vllm_tensafe.he import ciphertext_count, encrypt_matrix
    from vllm_tensafe.he.packing import fused_layouts

    out = Path(out_path)
    adapter_name = name if name is not None else default_name(out)
    if not is_adapter_name(adapter_name):
        raise TsspError(
            f"adapter name {adapter_name[:140]!r} is not allowed",
            f"use {NAME_RULE} (pass --name)",
        )
    if isinstance(adapter_version, bool) or not 1 <= adapter_version <= MAX_ADAPTER_VERSION:
        raise TsspError(
            f"adapter version {adapter_version!r} is not allowed",
            f"use an integer from 1 to {MAX_ADAPTER_VERSION} (pass --adapter-version)",
        )
    if not_after is not None:
        try:
            parse_utc(not_after)
        except (TypeError, ValueError):
            raise TsspError(
                f"expiry {not_after!r} is not a UTC date-time",
                "use YYYY-MM-DDTHH:MM:SSZ or YYYY-MM-DD (pass --not-after)",
            ) from None
    base_config = load_base_config(base_model_dir)
    adapter = read_adapter(adapter_dir, base_config)
    binding = make_binding(base_config, adapter.modules, adapter.base_model_name_or_path)

    ctx = public_context
    context_bytes = ctx.to_bytes()
    if len(context_bytes) > MEMBER_LIMITS[HE_CONTEXT]:
        raise TsspError(
            f"the public CKKS context is {len(context_bytes)} bytes, over the "
            f"{MEMBER_LIMITS[HE_CONTEXT]}-byte limit readers accept",
            "make HE keys with `vllm-tensafe keygen he` (it leaves out Galois keys)",
        )
    rng = new_generator() if mix else None
    tiles = fused_layouts(
        layer_groups({name: m.d_out for name, m in adapter.modules.items()}), ctx.slot_count
    )
    total = sum(ciphertext_count(ctx, m.d_out, adapter.rank) for m in adapter.modules.values())

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        spool = BlobSpool(out.parent)
    except OSError as exc:
        raise _write_error(out, exc) from exc
    try:
        a_mixed: dict[str, Any] = {}
        modules: dict[str, Any] = {}
        with tqdm(
            total=total,
            desc=f"encrypting {adapter_name}",
            unit="ct",
            file=sys.stderr,
            disable=not progress,
        ) as bar:
            for module_name, module in adapter.modules.items():  # sorted by read_adapter
                a_prime, b_prime = mix_factors(module.a, module.b, adapter.scaling, rng)
                offset, width = tiles[module_name]
                encrypted = encrypt_matrix(
                    ctx, b_prime, progress=_count(bar), slot_offset=offset, tile_width=width
                )
                blob = encrypted.to_bytes()
                spool.add(module_name, blob)
                a_mixed[module_name] = a_prime
                modules[module_name] = {
                    "d_in": module.d_in,
                    "d_out": module.d_out,
                    "ciphertexts": ciphertext_count(ctx, module.d_out, adapter.rank),
                    "b_size": len(blob),
                    "b_layout": _json_value(encrypted.layout()),
                }
                del encrypted, blob
        a_bytes = lora_a.encode(a_mixed)
        index, b_digest, b_size = spool.finish()

        profile = ctx.profile
        manifest_obj: dict[str, Any] = {
            "format": "tssp",
            "format_version": FORMAT_VERSION,
            "name": adapter_name,
            "adapter_version": int(adapter_version),
            "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "tool": f"vllm-tensafe {__version__}",
            "signer_key_id": key_id(signing_key.public_key()),
            "lora": {
                "rank": adapter.rank,
                "alpha": adapter.alpha,
                "scaling": adapter.scaling,
                "use_rslora": adapter.use_rslora,
                "target_modules": adapter.target_modules,
                "mixed": mix,
                "scaling_in_b": True,
            },
            "base_model": binding,
            "he": {
                "profile": profile.name,
                "poly_modulus_degree": int(profile.poly_modulus_degree),
                "coeff_mod_bit_sizes": [int(b) for b in profile.coeff_mod_bit_sizes],
                "public_key_id": ctx.key_id,
            },
            "modules": modules,
            **({"not_after": not_after} if not_after is not None else {}),
            "members": {
                HE_CONTEXT: {
                    "sha256": hashlib.sha256(context_bytes).hexdigest(),
                    "size": len(context_bytes),
                },
                LORA_A: {"sha256": hashlib.sha256(a_bytes).hexdigest(), "size": len(a_bytes)},
                LORA_B: {"sha256": b_digest, "size": b_size},
            },
        }
        manifest_bytes = canonical_json(manifest_obj)
        # Read our own manifest back through the reader's checks: a packer that writes what
        # the reader refuses must fail here, not on the serving host.
        validate_manifest(parse_canonical_json(manifest_bytes))
        if len(manifest_bytes) > MEMBER_LIMITS[MANIFEST]:
            raise TsspError(
                f"the manifest would be {len(manifest_bytes)} bytes, over the "
                f"{MEMBER_LIMITS[MANIFEST]}-byte limit",
                "pack fewer target modules",
            )
        signature = sign_manifest(signing_key, manifest_bytes)
        return write_container(
            out,
            {
                MANIFEST: manifest_bytes,
                SIGNATURE: signature,
                HE_CONTEXT: context_bytes,
                LORA_A: a_bytes,
                LORA_B: [index, spool.path],
            },
        )
    except OSError as exc:  # disk full, quota, read-only: the temporary files are removed
        raise _write_error(out, exc) from exc
    finally:
        spool.discard()


def _write_error(out: Path, exc: OSError) -> TsspError:
    return TsspError(
        f"cannot write TSSP package {out}: {exc.strerror or exc}; no partial package was left "
        "(a package already at that path is unchanged)",
        "free space on that file system (or fix its permissions), or write elsewhere with -o",
    )


def _count(bar: Any) -> Callable[[int], None]:
    """tqdm's ``update`` as the ``progress(n)`` callback ``encrypt_matrix`` calls."""

    def update(n: int) -> None:
        bar.update(n)

    return update
