"""Encrypted B': layout, serialisation, validation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.he.helpers import ref
from vllm_tensafe.errors import ForeignCiphertextError, HEError
from vllm_tensafe.he import (
    EncryptedMatrix,
    PublicContext,
    SecretKeySet,
    ciphertext_count,
    encrypt_matrix,
    get_profile,
)
from vllm_tensafe.he.packing import fused_layouts


@pytest.mark.parametrize(
    ("d_out", "k", "chunks"), [(64, 64, 1), (896, 4, 1), (4096, 1, 1), (5000, 1, 2), (8192, 1, 2)]
)
def test_layout(ctx: PublicContext, d_out: int, k: int, chunks: int) -> None:
    ticks: list[int] = []
    matrix = encrypt_matrix(ctx, np.zeros((d_out, 2)) + 0.5, progress=ticks.append)
    assert (matrix.tokens_per_ciphertext, matrix.n_chunks) == (k, chunks)
    assert ticks == [1] * (2 * chunks) == [1] * ciphertext_count(ctx, d_out, 2)
    assert ciphertext_count("default", d_out, 2) == ciphertext_count(
        get_profile("default"), d_out, 2
    )
    layout = matrix.layout()
    json.dumps(layout)
    assert layout["ciphertexts"] == 2 * chunks and sum(layout["chunk_rows"]) == d_out


def test_round_trip(ctx: PublicContext, secret: SecretKeySet, rng: np.random.Generator) -> None:
    from vllm_tensafe.he import DeltaEngine
    from vllm_tensafe.keyholder import LocalKeyHolder

    b = rng.normal(size=(5000, 3)) * 0.1
    data = encrypt_matrix(ctx, b).to_bytes()
    again = EncryptedMatrix.from_bytes(ctx, data, d_out=5000, rank=3)
    u = rng.normal(size=(2, 3))
    (delta,) = DeltaEngine(ctx, LocalKeyHolder(secret)).compute(ref(ctx), [(u, again)])
    assert np.abs(delta - u @ b.T).max() <= ctx.profile.tolerance


def test_from_bytes_validation(
    ctx: PublicContext, other_keys: tuple[SecretKeySet, PublicContext]
) -> None:
    data = encrypt_matrix(ctx, np.ones((128, 2))).to_bytes()
    with pytest.raises(HEError, match="does not match"):
        EncryptedMatrix.from_bytes(ctx, data, d_out=129, rank=2)
    with pytest.raises(HEError, match="does not match"):
        EncryptedMatrix.from_bytes(ctx, data, d_out=128, rank=3)
    with pytest.raises(HEError):
        EncryptedMatrix.from_bytes(ctx, data[:-10], d_out=128, rank=2)
    with pytest.raises(HEError, match="trailing"):
        EncryptedMatrix.from_bytes(ctx, data + b"\0", d_out=128, rank=2)
    with pytest.raises(HEError, match="magic"):
        EncryptedMatrix.from_bytes(ctx, b"X" * len(data), d_out=128, rank=2)
    with pytest.raises(ForeignCiphertextError):
        EncryptedMatrix.from_bytes(other_keys[1], data, d_out=128, rank=2)
    corrupted = bytearray(data)
    corrupted[len(data) // 2] ^= 0xFF
    corrupted[len(data) // 2 + 1] = 0xFF
    try:
        EncryptedMatrix.from_bytes(ctx, bytes(corrupted), d_out=128, rank=2)
    except HEError:
        pass  # SEAL caught a residue >= q; a flip that stays in range cannot be detected here


def test_encrypt_validation(ctx: PublicContext) -> None:
    with pytest.raises(HEError, match="2-D"):
        encrypt_matrix(ctx, np.ones(5))
    with pytest.raises(HEError, match="NaN"):
        encrypt_matrix(ctx, np.full((4, 2), np.nan))
    with pytest.raises(HEError, match="supports at most"):
        encrypt_matrix(ctx, np.full((4, 2), 1e30))
    with pytest.raises(HEError):
        ciphertext_count(ctx, 0, 2)


def test_fused_layouts_and_tile_validation(ctx: PublicContext, rng: np.random.Generator) -> None:
    slots = ctx.slot_count
    tiles = fused_layouts(
        [[("q", 896), ("v", 128)], [("o", 896)], [("g", 4864), ("u", 4864)]], slots
    )
    # q and v share a 1024-slot tile; o alone; gate+up do not fit one ciphertext: chunked alone.
    assert tiles == {
        "q": (0, 1024),
        "v": (896, 1024),
        "o": (0, 896),
        "g": (0, slots),
        "u": (0, slots),
    }
    b = rng.normal(size=(128, 2)) * 0.1
    matrix = encrypt_matrix(ctx, b, slot_offset=896, tile_width=1024)
    assert matrix.tokens_per_ciphertext == 4
    layout = matrix.layout()
    assert (layout["slot_offset"], layout["tile_width"]) == (896, 1024)
    again = EncryptedMatrix.from_bytes(ctx, matrix.to_bytes(), d_out=128, rank=2)
    assert (again.slot_offset, again.tile_width, again.tokens_per_ciphertext) == (896, 1024, 4)
    for offset, width in ((897, 1024), (0, 127), (0, slots + 1), (-1, 1024)):
        with pytest.raises(HEError, match="does not fit"):
            encrypt_matrix(ctx, b, slot_offset=offset, tile_width=width)
    with pytest.raises(HEError, match="does not fit"):
        encrypt_matrix(ctx, np.ones((5000, 1)) * 0.1, slot_offset=0, tile_width=5000)
    # A header whose tile does not fit is refused on read.
    data = bytearray(matrix.to_bytes())
    pos = data.index((896).to_bytes(4, "little"), 60)
    data[pos : pos + 4] = (4000).to_bytes(4, "little")
    with pytest.raises(HEError, match="does not fit"):
        EncryptedMatrix.from_bytes(ctx, bytes(data), d_out=128, rank=2)
