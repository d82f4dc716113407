"""The key holder learns nothing about the users: attacks with everything it has.

The adversary (tests/he/adversary.py) holds the secret key, the public key, the package's
ciphertexts and their exact decryptions and the engine's code. Against every kind of request
the engine sends — one token per ciphertext (decode steps, integer GEMM), tiled GEMM groups
(prefill), SEAL-loop groups, fused q/k/v and gate/up layers — and against the bytes of the
remote path, it recovers U exactly from the requests as the engine made them before protocol
v2 (the guard that the attacks work), and recovers nothing from today's requests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import tenseal.sealapi as seal

from tests.he.adversary import KeyHolderAdversary, legacy_masked, legacy_shift
from tests.he.helpers import ref
from vllm_tensafe.he import DeltaEngine, PublicContext, SecretKeySet
from vllm_tensafe.he.packing import EncryptedMatrix, encrypt_matrix, fused_layouts
from vllm_tensafe.he.residues import ciphertext_from_residues, ciphertext_residues
from vllm_tensafe.keyholder import LocalKeyHolder
from vllm_tensafe.keyholder.local import KeyHolder
from vllm_tensafe.keyholder.wire import (
    AdapterRef,
    decode_ciphertext,
    decode_request,
    encode_request,
)


class WireRelay(KeyHolder):
    """A remote key holder on loopback, minus the socket: every request goes through the
    v2 codec byte for byte (what RemoteKeyHolder sends) and is recorded as the key holder
    receives it."""

    kind = "remote"

    def __init__(self, holder: LocalKeyHolder) -> None:
        self.holder = holder
        self.received: list[bytes] = []

    def decrypt(self, ref: AdapterRef, ciphertexts: list[bytes]) -> list[np.ndarray]:
        body = encode_request(ref, ciphertexts)
        got_ref, blobs = decode_request(body, 1 << 16)
        self.received.extend(bytes(b) for b in blobs)
        return self.holder.decrypt(got_ref, [bytes(b) for b in blobs])


# B' of every matrix the scenarios encrypt, to check the engine's deltas.
mat_plain: dict[int, np.ndarray] = {}


@dataclass
class Captured:
    product: Any  # the product ciphertext before it was concealed (the old request's base)
    sent: Any  # what the key holder received, as a SEAL ciphertext
    basis: list[Any]  # the ciphertexts the product combines
    weights: np.ndarray  # the true integer weights of that combination
    weight_scale: float


@pytest.fixture(scope="module")
def adversary(secret: SecretKeySet) -> KeyHolderAdversary:
    return KeyHolderAdversary(secret)


def _run(
    ctx: PublicContext,
    secret: SecretKeySet,
    adversary: KeyHolderAdversary,
    items: list[tuple[np.ndarray, EncryptedMatrix]],
    mode: str,
) -> Captured:
    relay = WireRelay(LocalKeyHolder(secret))
    engine = DeltaEngine(ctx, relay)
    if mode == "seal-loop":
        engine.gemm_tiled = False
    products: list[Any] = []
    conceal = engine._concealer.conceal  # type: ignore[union-attr]

    def spy(ct: Any) -> Any:
        products.append(
            ciphertext_from_residues(ctx.context, ctx.parms_id, ciphertext_residues(ct), ct.scale)
        )
        return conceal(ct)

    engine._concealer.conceal = spy  # type: ignore[union-attr, method-assign]
    deltas = engine.compute(ref(ctx), items)
    for (u, mat), delta in zip(items, deltas, strict=True):  # the engine still works
        assert np.abs(delta - u @ mat_plain[id(mat)].T).max() <= ctx.profile.tolerance
    assert len(products) == len(relay.received) == 1, "each scenario is one ciphertext"
    sent = decode_ciphertext(ctx, relay.received[0], "request")
    columns = [mat.column_ciphertext(j, 0) for _, mat in items for j in range(mat.rank)]
    profile = ctx.profile
    tokens = items[0][0].shape[0]
    if mode == "scalar":
        weights = np.concatenate([u[0] for u, _ in items]) * profile.u_scale
        return Captured(products[0], sent, columns, np.rint(weights), profile.u_scale)
    width = items[0][1].tile_width
    if mode == "tiled":
        selectors = [engine._selector(width, t) for t in range(tokens)]
        scale = float(1 << profile.tile_u_scale_bits)  # type: ignore[operator]
    else:  # SEAL loop: U encoded per tile at u_scale; the "selector" is a unit tile vector
        selectors = []
        for t in range(tokens):
            values = np.zeros(ctx.slot_count)
            values[t * width : (t + 1) * width] = 1.0
            plain = seal.Plaintext()
            ctx.encoder.encode(values.tolist(), ctx.parms_id, profile.u_scale, plain)
            selectors.append(plain)
        scale = profile.u_scale
    basis = adversary.basis_products(columns, selectors)
    weights = np.concatenate([np.concatenate([u[t] for u, _ in items]) for t in range(tokens)])
    return Captured(products[0], sent, basis, np.rint(weights * scale), scale)


def _matrix(
    ctx: PublicContext, rng: np.random.Generator, d_out: int, rank: int, **kw: Any
) -> EncryptedMatrix:
    b = rng.normal(size=(d_out, rank)) / np.sqrt(rank)
    mat = encrypt_matrix(ctx, b, **kw)
    mat_plain[id(mat)] = b
    return mat


def _scenarios(ctx: PublicContext, rng: np.random.Generator) -> dict[str, tuple[list, str]]:
    slots = ctx.slot_count
    qkv = fused_layouts([[("q", 512), ("k", 128), ("v", 128)]], slots)
    gate_up = fused_layouts([[("gate", 384), ("up", 384)]], slots)
    out: dict[str, tuple[list, str]] = {}
    m = _matrix(ctx, rng, 896, 8)
    out["decode T=1 (integer GEMM)"] = ([(rng.normal(size=(1, 8)), m)], "scalar")
    mats = [
        _matrix(ctx, rng, d, 8, slot_offset=qkv[n][0], tile_width=qkv[n][1])
        for n, d in (("q", 512), ("k", 128), ("v", 128))
    ]
    out["fused q/k/v T=1"] = ([(rng.normal(size=(1, 8)), mm) for mm in mats], "scalar")
    mats = [
        _matrix(ctx, rng, d, 8, slot_offset=gate_up[n][0], tile_width=gate_up[n][1])
        for n, d in (("gate", 384), ("up", 384))
    ]
    out["fused gate/up T=1"] = ([(rng.normal(size=(1, 8)), mm) for mm in mats], "scalar")
    m = _matrix(ctx, rng, 896, 8)
    out["prefill T=2 (tiled GEMM)"] = ([(rng.normal(size=(2, 8)), m)], "tiled")
    m = _matrix(ctx, rng, 896, 4)
    out["prefill T=3 (SEAL loop)"] = ([(rng.normal(size=(3, 4)), m)], "seal-loop")
    return out


def _recovered(estimate: np.ndarray | None, c: Captured) -> bool:
    if estimate is None:
        return False
    return bool(np.abs(estimate / c.weight_scale - c.weights / c.weight_scale).max() < 1e-6)


def _c1_prime0(ct: Any) -> np.ndarray:
    return ciphertext_residues(ct)[1, 0].copy()


@pytest.fixture(scope="module")
def captured(
    ctx: PublicContext, secret: SecretKeySet, adversary: KeyHolderAdversary
) -> dict[str, Captured]:
    rng = np.random.default_rng(20261201)
    return {
        name: _run(ctx, secret, adversary, items, mode)
        for name, (items, mode) in _scenarios(ctx, rng).items()
    }


OLD_PATH_BROKEN = [
    "decode T=1 (integer GEMM)",
    "fused q/k/v T=1",
    "fused gate/up T=1",
    "prefill T=2 (tiled GEMM)",
]


@pytest.mark.parametrize("name", OLD_PATH_BROKEN)
def test_guard_both_attacks_read_u_from_the_old_requests(
    name: str, ctx: PublicContext, adversary: KeyHolderAdversary, captured: dict[str, Captured]
) -> None:
    c = captured[name]
    old = legacy_masked(ctx, c.product)
    assert _recovered(adversary.linear_solve_c1(_c1_prime0(old), c.basis), c)
    shift = legacy_shift(ctx, round(math.log2(old.scale)))
    (estimate,) = adversary.least_squares_outside_slots(adversary.decrypt(old), c.basis, [shift])
    assert _recovered(np.rint(estimate), c)


@pytest.mark.parametrize("name", [*OLD_PATH_BROKEN, "prefill T=3 (SEAL loop)"])
def test_attacks_learn_nothing_from_v2_requests(
    name: str, ctx: PublicContext, adversary: KeyHolderAdversary, captured: dict[str, Captured]
) -> None:
    c = captured[name]
    # (a) c1 is re-randomised: no combination of the package's c1 polynomials explains it.
    assert adversary.linear_solve_c1(_c1_prime0(c.sent), c.basis) is None
    # (b) the decryption is D + R, uniform: no shift of any size leaves the weights behind.
    shifts = [None, *range(40, 112)]
    for estimate in adversary.least_squares_outside_slots(
        adversary.decrypt(c.sent), c.basis, shifts
    ):
        error = np.abs(estimate - c.weights).max() / c.weight_scale
        assert error > 1.0  # U entries are ~N(0, 1): nothing of them is left


def _chi_square(values: list[int], modulus: int, buckets: int = 64) -> float:
    index = np.array([v * buckets // modulus for v in values])
    counts = np.bincount(index, minlength=buckets)
    expected = len(index) / buckets
    return float(((counts - expected) ** 2 / expected).sum())


def test_what_the_key_holder_decrypts_is_uniform(
    adversary: KeyHolderAdversary, ctx: PublicContext, captured: dict[str, Captured]
) -> None:
    """chi-square over 64 buckets (63 degrees of freedom) of the decryptions' residues mod each
    prime and of their CRT lift in [0, Q). A uniform sample exceeds 200 with probability below
    e^-32 (Chernoff bound), so this cannot fail by chance. The old requests' lifts sit near 0
    (|D| < 2^155, Q ~ 2^180) and exceed it by orders of magnitude: the guard."""
    ring = adversary.ring
    big = ring.modulus
    new = [adversary.decrypt(c.sent) for c in captured.values()]
    for prime, q in enumerate(ring.moduli):
        residues = [int(v) % q for d in new for v in d]
        assert _chi_square(residues, q) < 200, f"prime {prime}"
    assert _chi_square([int(v) % big for d in new for v in d], big) < 200
    old = [adversary.decrypt(legacy_masked(ctx, c.product)) for c in captured.values()]
    assert _chi_square([int(v) % big for d in old for v in d], big) > 10_000


def test_remote_bytes_carry_no_copy_of_the_product(
    ctx: PublicContext, captured: dict[str, Captured]
) -> None:
    """The wire bytes share no polynomial with the product they conceal (both parts moved)."""
    for c in captured.values():
        before = ciphertext_residues(c.product)
        after = ciphertext_residues(c.sent)
        assert np.mean(before[0] == after[0]) < 1e-3
        assert np.mean(before[1] == after[1]) < 1e-3
