"""The torch ring arithmetic and the device engines, on CPU tensors: bit-identical to SEAL and to
the big-integer definitions where it is integer arithmetic, within 1e-9 of SEAL's decoding, and
the deltas within the profile's tolerance.

Every test takes its torch device from the ``device`` fixture: tests/gpu/test_he_cuda.py imports
them and overrides it, so the same checks run on CUDA tensors there."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import tenseal.sealapi as seal
import torch

from tests.he.helpers import make_lora
from tests.he.torch_ring_reference import (
    crt,
    moduli,
    seal_decode,
    seal_decrypt_coefficients,
    seal_rerandomise,
    switch_reference,
)
from vllm_tensafe.he import PublicContext, SecretKeySet, generate_keys, gpu_engine
from vllm_tensafe.he.gpu_engine import (
    DeviceRing,
    GpuDeltaEngine,
    GpuRemoteDeltaEngine,
    Member,
    _compiled_stage,
    adapter_groups,
    coefficient_residues,
    layer_groups_for,
    ntt_ciphertext,
)
from vllm_tensafe.he.lincomb import LinearCombiner, ResidueColumns
from vllm_tensafe.he.packing import encrypt_matrix, fused_layouts
from vllm_tensafe.he.residues import ciphertext_from_residues, ciphertext_residues
from vllm_tensafe.he.ring import Ring
from vllm_tensafe.he.torch_ring import (
    FloodParameters,
    LimbPlan,
    Moduli,
    ModulusSwitch,
    ProductTables,
    ResidueArithmetic,
    flood_residues,
    limb_plan,
)
from vllm_tensafe.keyholder.local import LocalKeyHolder
from vllm_tensafe.keyholder.wire import (
    AdapterRef,
    decode_ciphertext,
    decode_request,
    encode_ciphertext,
    encode_request,
)


def as_u64(t: torch.Tensor) -> np.ndarray:
    return t.cpu().numpy().view(np.uint64)


def on(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A numpy array (uint64 read as int64) as a tensor on ``device``."""
    array = np.ascontiguousarray(array)
    if array.dtype == np.uint64:
        array = array.view(np.int64)
    return torch.from_numpy(array).to(device)


@pytest.fixture(scope="module")
def device() -> torch.device:
    return torch.device("cpu")


@pytest.fixture(scope="module")
def ring(ctx: PublicContext, device: torch.device) -> DeviceRing:
    return DeviceRing(ctx, device)


@pytest.fixture(scope="module")
def columns(ctx: PublicContext) -> list:
    rng = np.random.default_rng(7)
    return [c[0] for c in encrypt_matrix(ctx, rng.normal(size=(64, 16)) * 0.1).ciphertexts]


# --- integer building blocks ----------------------------------------------------------------


def test_modular_steps_match_python(ring: DeviceRing, rng: np.random.Generator) -> None:
    qs = ring.moduli.values
    x = np.stack([rng.integers(0, q, size=512, dtype=np.uint64) for q in qs])
    x[:, 0] = 0
    x[:, 1] = [q - 1 for q in qs]
    digits = [rng.integers(-(1 << 52), 1 << 52, size=(len(qs), 512)) for _ in range(3)]
    got = ring.arith.reduce_digits([on(d, ring.device).double() for d in digits], 30)
    want = [
        [(int(d0) + int(d1) * 2**30 + int(d2) * 2**60) % q for d0, d1, d2 in zip(*row, strict=True)]
        for *row, q in zip(*digits, qs, strict=True)
    ]
    assert as_u64(got).tolist() == want
    shifted = ring.arith.mul_pow2(on(x, ring.device), 107)
    assert as_u64(shifted).tolist() == [
        [int(v) * 2**107 % q for v in row] for row, q in zip(x, qs, strict=True)
    ]


@pytest.mark.parametrize("weight_bits,rank", [(44, 16), (44, 60), (44, 200), (26, 16), (50, 32)])
def test_limb_plans_are_exact_in_float64(weight_bits: int, rank: int) -> None:
    plan = limb_plan(weight_bits, rank, 60)
    assert plan.digit_bound() < 2**53
    assert plan.weight_limb_bits * plan.weight_limbs >= weight_bits + 1
    assert plan.residue_limb_bits * plan.residue_limbs >= 60


@pytest.mark.parametrize("plan", ["chosen", "three-residue-limbs"])
def test_products_bit_identical_to_lincomb(
    ctx: PublicContext, ring: DeviceRing, columns: list, rng: np.random.Generator, plan: str
) -> None:
    """lincomb's GEMM (SEAL ciphertexts) and the torch tables give the same residues."""
    rank = len(columns)
    bound = 1 << 43  # u_scale 2^34 times the largest |u| 2^9
    weights = np.stack(
        [
            rng.integers(-bound, bound, size=rank),
            rng.integers(-(1 << 20), 1 << 20, size=rank),
            np.full(rank, bound - 1),  # every weight at the bound
            np.full(rank, -bound),
        ]
    )
    combiner = LinearCombiner(ctx)
    residue_columns = ResidueColumns(columns)
    expected = combiner.combine(
        combiner.digits(weights, residue_columns), residue_columns.shape, 1.0
    )
    split = limb_plan(44, rank, 60) if plan == "chosen" else LimbPlan(2, 22, 3, 20, 44, rank)
    assert split.digit_bound() < 2**53
    tables = ProductTables(ring.arith, split)
    device_cols = ring.upload(np.stack([coefficient_residues(ctx, c) for c in columns]))
    got = tables.combine(on(weights, ring.device), tables.build(device_cols), (2, *ring.shape))
    for t, ct in enumerate(expected):
        assert np.array_equal(as_u64(got[t]), coefficient_residues(ctx, ct)), t


def test_worst_case_columns_are_exact(ring: DeviceRing) -> None:
    """Every residue at q - 1 and every weight at the bound: the largest digit sums."""
    qs = ring.moduli.values
    rank = 32
    residues = torch.tensor([[q - 1] * 8 for q in qs], device=ring.device).expand(rank, -1, -1)
    tables = ProductTables(ring.arith, limb_plan(44, rank, 60))
    weights = torch.tensor([[(1 << 44) - 1] * rank, [-(1 << 44)] * rank], device=ring.device)
    got = tables.combine(weights, tables.build(residues.contiguous()), (len(qs), 8))
    for t, w in enumerate([(1 << 44) - 1, -(1 << 44)]):
        assert as_u64(got[t])[:, 0].tolist() == [rank * w * (q - 1) % q for q in qs]


# --- negacyclic products, decryption -----------------------------------------------------------


def test_negacyclic_product_worst_case_is_exact(ring: DeviceRing) -> None:
    """a with every residue q - 1, and with every 30-bit limb 2^30 - 1, times b = 1 + X + ... +
    X^(N-1): the largest coefficients; (a b)_i = (q - 1) * (i + 1 - (N - 1 - i)). The
    rounding distance stays below the bound in torch_ring's docstring (2^-4.8), far from 1/2."""
    n = ring.n
    qs = ring.moduli.values
    a = torch.tensor([[q - 1] * n for q in qs], dtype=torch.int64, device=ring.device)
    spectrum = ring.fft.spectrum(torch.ones(n, dtype=torch.int64, device=ring.device))
    limb_product = ring.fft.limb_spectra(a) * spectrum
    assert ring.fft.max_rounding_distance(limb_product) < 2**-4.8
    full_limbs = torch.full((n,), (1 << 60) - 1, dtype=torch.int64, device=ring.device)
    distance = ring.fft.max_rounding_distance(ring.fft.limb_spectra(full_limbs) * spectrum)
    print(f"worst-case FFT rounding distance: {distance:.3g}")
    assert distance < 2**-4.8
    got = as_u64(ring.fft.multiply(a, spectrum))
    i = np.arange(n)
    for row, q in zip(got, qs, strict=True):
        want = [((q - 1) * int(2 * k + 2 - n)) % q for k in i]
        assert row.tolist() == want


def test_decrypt_equals_seal_decryptor(
    ctx: PublicContext, secret: SecretKeySet, ring: DeviceRing, columns: list
) -> None:
    spectrum = ring.secret_spectrum(secret)
    for ct in columns[:3]:
        got = ring.decrypt(ring.upload(coefficient_residues(ctx, ct)), spectrum)
        assert np.array_equal(as_u64(got), seal_decrypt_coefficients(secret, ct))


def test_forward_ntt_is_seals(ctx: PublicContext, ring: DeviceRing, columns: list) -> None:
    coefficients = np.stack([coefficient_residues(ctx, c) for c in columns[:2]])  # (2, 2, L, N)
    got = as_u64(ring.ntt(on(coefficients, ring.device)))
    want = np.stack([np.array(ciphertext_residues(c)) for c in columns[:2]])
    assert np.array_equal(got, want)


# --- modulus switch, flood, decoding -------------------------------------------------------------


def _fast_moduli() -> list[int]:
    return [m.value() for m in seal.CoeffModulus.Create(8192, [60, 60, 40])][:2]


@pytest.mark.parametrize("primes,scale_bits", [("default", 124), ("default", 146), ("fast", 98)])
def test_switch_is_the_v2_definition(
    ctx: PublicContext, device: torch.device, rng: np.random.Generator, primes: str,
    scale_bits: int,
) -> None:  # fmt: skip
    qs = moduli(ctx) if primes == "default" else _fast_moduli()
    data_bits = sum(q.bit_length() for q in qs)
    m = 32 + data_bits - scale_bits
    n = 1024
    x = np.stack([rng.integers(0, q, size=n, dtype=np.uint64) for q in qs])
    x[:, 0], x[:, 1] = 0, [q - 1 for q in qs]
    x[:, 2] = [q // 2 for q in qs]
    switch = ModulusSwitch(Moduli(tuple(qs), n, device), m)
    got = as_u64(switch(on(x, device)))
    assert np.array_equal(got, switch_reference(x, qs, m))
    # And what it is for: within one of round(X 2^m / Q) mod M.
    big_q, mod = math.prod(qs), 1 << min(m, 64)
    for i, value in enumerate(crt(x[:, :64], qs)):
        exact = (value * 2**m * 2 + big_q) // (2 * big_q)
        diff = (int(got[i]) - exact) % mod
        assert diff in (0, 1, mod - 1)


def test_switch_and_decode_match_ring_py(
    ctx: PublicContext, ring: DeviceRing, rng: np.random.Generator
) -> None:
    """The CPU host's and key holder's numpy implementation (ring.py) gives the same bits."""
    cpu = Ring(ctx.context, ctx.parms_id, ring.n)
    x = np.stack([rng.integers(0, q, size=(3, ring.n), dtype=np.uint64) for q in cpu.moduli], 1)
    m = ring.switch.m
    assert m == ctx.profile.reply_exponent(ctx.profile.product_scale_bits)
    got = as_u64(ring.switch(on(x, ring.device)))
    assert np.array_equal(got, cpu.switch(x, m))
    z = Ring.centred(got, m)
    scale = cpu.reply_scale(ctx.profile.product_scale_bits, m)
    assert scale == ring.delta_prime
    want = cpu.decode(z, scale)
    mine = ring.decoder.decode(ring.coefficients(on(got, ring.device))).cpu().numpy()
    assert np.abs(mine - want).max() <= 1e-9 * max(1.0, np.abs(want).max())


def test_flood_residues_exact(ring: DeviceRing, rng: np.random.Generator) -> None:
    params = ring.flood
    assert params.k == max(0, math.floor(math.log2(params.sigma_c)) - 45)
    hi = rng.integers(-(1 << 49), 1 << 49, size=256)
    low = rng.integers(-(1 << (params.k - 1)), 1 << (params.k - 1), size=256)
    got = as_u64(flood_residues(ring.arith, on(hi, ring.device), on(low, ring.device), params.k))
    for row, q in zip(got, ring.moduli.values, strict=True):
        assert row.tolist() == [
            (int(h) * 2**params.k + int(u)) % q for h, u in zip(hi, low, strict=True)
        ]


def test_flood_noise_has_the_stated_spread(ring: DeviceRing) -> None:
    from vllm_tensafe.he.gpu_engine import KeystreamWords, PhiloxFlood

    params = FloodParameters.for_sigma(ring.profile.flood_coefficient_sigma(124))
    for source in (PhiloxFlood(ring.device), KeystreamWords(ring.device)):
        normals, words = source.draw((4, ring.n))
        flood = params.high_parts(normals).double() * 2.0**params.k
        flood += params.low_parts_from_words(words).double()
        assert abs(float(flood.std()) / params.sigma_c - 1.0) < 0.03


def test_decode_matches_seal(
    ctx: PublicContext, ring: DeviceRing, rng: np.random.Generator
) -> None:
    delta_prime = ring.delta_prime
    z = np.rint(rng.normal(size=ring.n) * 8 * delta_prime / math.sqrt(ring.n / 2)).astype(np.int64)
    got = ring.decoder.decode(on(z, ring.device).double() / delta_prime).cpu().numpy()
    want = seal_decode(ctx, z, delta_prime)
    assert np.abs(got - want).max() < 1e-9
    assert np.abs(want).max() > 1.0  # a meaningful comparison


# --- the engines -----------------------------------------------------------------------------


def _fused_qv(ctx: PublicContext, rng: np.random.Generator, rank: int = 8) -> tuple:
    d_in = 48
    lq = make_lora(rng, 96, rank, rslora=False, d_in=d_in)
    lv = make_lora(rng, 32, rank, rslora=False, d_in=d_in)
    layout = fused_layouts([[("q", 96), ("v", 32)]], ctx.slot_count)
    mq = encrypt_matrix(ctx, lq.b_mixed, slot_offset=layout["q"][0], tile_width=layout["q"][1])
    mv = encrypt_matrix(ctx, lv.b_mixed, slot_offset=layout["v"][0], tile_width=layout["v"][1])
    return d_in, (lq, lv), (mq, mv)


@pytest.fixture(scope="module")
def qv(ctx: PublicContext) -> tuple:
    return _fused_qv(ctx, np.random.default_rng(5))


@pytest.fixture(scope="module")
def local_engines(qv: tuple, secret: SecretKeySet, device: torch.device) -> dict:
    """Both local variants, the adapter in slot 1 of 2."""
    d_in, (lq, lv), (mq, mv) = qv
    engines = {}
    for fold in (True, False):
        engine = GpuDeltaEngine.from_matrices(
            secret, [mq, None, mv], output_slices=[96, 16, 32], d_in=d_in, max_slots=2,
            fold_secret=fold, device=device,
        )  # fmt: skip
        engine.load(1, [mq, None, mv], [lq.a_mixed, None, lv.a_mixed])
        engines[fold] = engine
    return engines


def _reference(x: np.ndarray, lq, lv, zero_rows: list[int]) -> np.ndarray:
    xr = x.astype(np.float32).astype(np.float64)
    ref = np.concatenate([lq.delta(xr), np.zeros((len(x), 16)), lv.delta(xr)], axis=1)
    ref[zero_rows] = 0.0
    return ref


def test_adapter_groups_follow_the_packing(
    ctx: PublicContext, qv: tuple, rng: np.random.Generator
) -> None:
    _, _, (mq, mv) = qv
    assert adapter_groups([mq, None, mv]) == [[Member(0, 0), Member(2, 0)]]
    wide = encrypt_matrix(ctx, rng.normal(size=(ctx.slot_count + 10, 2)) * 0.1)
    assert adapter_groups([wide, mv]) == [[Member(0, 0)], [Member(0, 1)], [Member(1, 0)]]
    # Without an adapter (engines built before vLLM captures): the same groups as pack's.
    slots = ctx.slot_count
    assert layer_groups_for([96, 16, 32], slots, [True, False, True]) == adapter_groups(
        [mq, None, mv]
    )
    assert layer_groups_for([4096, 1024, 1024], slots, [True, False, True]) == [
        [Member(0, 0)],
        [Member(2, 0)],
    ]
    assert layer_groups_for([14336], slots) == [[Member(0, c)] for c in range(4)]


@pytest.mark.parametrize("fold_secret", [True, False])
def test_local_engine_deltas(
    ctx: PublicContext,
    qv: tuple,
    local_engines: dict,
    rng: np.random.Generator,
    fold_secret: bool,
) -> None:
    d_in, (lq, lv), _ = qv
    engine = local_engines[fold_secret]
    x = rng.normal(size=(5, d_in))
    x[4] *= 300.0  # ||U|| above 2^u_norm_bits: scaled down and back up
    slots = on(np.array([1, -1, 1, 0, 1, 1]), engine.device)  # longer than x, like punica's
    engine.chunk_tokens = 2 if fold_secret else 512  # long prefills run in pieces
    got = engine.compute(on(x, engine.device).float(), slots).cpu().numpy()
    engine.chunk_tokens = 512
    ref = _reference(x, lq, lv, [1, 3])  # -1 and the empty slot 0: exactly zero
    assert np.all(got[[1, 3]] == 0.0)
    # The stated tolerance holds for |delta| <= 8; beyond, it grows with |delta| (float32
    # output, the norm factor).
    scale = np.maximum(1.0, np.abs(ref).max(axis=1) / 8)
    assert np.all(np.abs(got - ref).max(axis=1) < ctx.profile.tolerance * scale)
    assert engine.capturable == (engine.device.type == "cuda")


@pytest.mark.parametrize("fold_secret", [True, False])
def test_compiled_stages_are_bit_identical_and_shared(
    qv: tuple, secret: SecretKeySet, local_engines: dict, rng: np.random.Generator,
    device: torch.device, fold_secret: bool,
) -> None:  # fmt: skip
    """TENSAFE_HE_COMPILE: the compiled stages give the eager stages' deltas bit for bit on
    the same GEMM digits and flood draws, for one token and for several (dynamo compiles T = 1
    apart), and a second engine of the same shape reuses the compiled code (32 layers must
    not compile 32 times, nor exceed dynamo's recompile limit and fall back to eager). On CUDA
    this is inductor's Triton code; on the CPU the "aot_eager" backend checks the tracing
    (whole-graph, shareable) without a C++ toolchain and minutes of compiling."""
    import torch._dynamo.utils as dynamo_utils

    if fold_secret and device.type == "cpu":
        pytest.skip("the folded variant's tracing is the same; its Triton code is run on CUDA")
    d_in, (lq, lv), (mq, mv) = qv
    backend = "inductor" if device.type == "cuda" else "aot_eager"
    reference = local_engines[fold_secret]
    kwargs = {"output_slices": [96, 16, 32], "d_in": d_in, "max_slots": 2, "device": device}
    compiled = [
        GpuDeltaEngine.from_matrices(
            secret,
            [mq, None, mv],
            fold_secret=fold_secret,
            compile=True,
            compile_backend=backend,
            **kwargs,
        )
        for _ in range(2)
    ]
    for engine in compiled:
        engine.load(1, [mq, None, mv], [lq.a_mixed, None, lv.a_mixed])

    def stage(engine: GpuDeltaEngine, name: str, *args: Any) -> Any:
        return _compiled_stage(GpuDeltaEngine, name, backend)(engine, *args)

    def check(engine: GpuDeltaEngine, token_slots: np.ndarray) -> None:
        """Compiled == eager stages on the same inputs and draws (bit for bit where they are
        integer arithmetic; the float64 slot values of decoded columns within 1e-12, since
        inductor may contract a multiply-add differently); the whole call compiled within the
        tolerance (tokens outside slot 1 get zero)."""
        tokens = len(token_slots)
        x = on(rng.normal(size=(tokens, d_in)), device).float()
        slots = on(token_slots, device)
        u = reference.project(x)
        if reference._decodes_columns(tokens):  # a prefill: the columns decoded once
            columns = reference._decoded_columns(reference.table)
            got_columns = stage(engine, "_decoded_columns", engine.table)
            torch.testing.assert_close(got_columns, columns, rtol=1e-12, atol=1e-12)
            weighed = reference._column_weights(u, slots)
            got_weights = stage(engine, "_column_weights", u, slots)
            values = torch.bmm(weighed[1], columns)
            normals = reference.flood_source.normals(values.shape)
            want = reference._finish_decoded(values, normals, weighed[0], weighed[2])
            got = stage(engine, "_finish_decoded", values, normals, weighed[0], weighed[2])
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)
        else:
            weighed = reference._weights(u, slots)
            got_weights = stage(engine, "_weights", u, slots)
            digits = torch.bmm(weighed[1], reference.table)
            normals, words = reference.flood_source.draw((1, tokens, reference.ring.n))
            want = reference._finish(digits, normals, words, weighed[0], weighed[2])
            got = stage(engine, "_finish", digits, normals, words, weighed[0], weighed[2])
            assert torch.equal(got, want)
        assert all(torch.equal(a, b) for a, b in zip(got_weights, weighed, strict=True))
        delta = engine.compute(x, slots).cpu().numpy()
        zero = [t for t in range(tokens) if token_slots[t] != 1]  # slot -1, the empty slot 0
        ref = _reference(x.cpu().numpy().astype(np.float64), lq, lv, zero)
        assert np.abs(delta - ref).max() < engine.profile.tolerance
        assert engine.compiled

    frames = None
    for engine in compiled:
        for tokens in (1, 3, 4):
            check(engine, np.array([1, -1, 1, 0][:tokens]))
        check(engine, np.where(np.arange(reference.column_decode_tokens + 1) % 5 == 2, -1, 1))
        if frames is None:
            frames = dynamo_utils.counters["frames"]["total"]
    # The second engine compiled nothing new.
    assert dynamo_utils.counters["frames"]["total"] == frames


def test_failed_compile_falls_back_to_the_eager_stages(
    qv: tuple, secret: SecretKeySet, rng: np.random.Generator, device: torch.device,
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """A compiler that fails: the deltas come from the op-by-op stages, with one warning per
    process (not one per layer engine)."""
    monkeypatch.setattr(gpu_engine, "_COMPILE_FAILED", set())
    d_in, (lq, lv), (mq, mv) = qv
    x = on(rng.normal(size=(2, d_in)), device).float()
    ref = _reference(x.cpu().numpy().astype(np.float64), lq, lv, [])
    warnings = []
    for _ in range(2):
        engine = GpuDeltaEngine.from_matrices(
            secret, [mq, None, mv], output_slices=[96, 16, 32], d_in=d_in, max_slots=2,
            device=device, compile=True, compile_backend="no-such-backend",
        )  # fmt: skip
        engine.load(1, [mq, None, mv], [lq.a_mixed, None, lv.a_mixed])
        caplog.clear()
        with caplog.at_level("WARNING", logger="vllm_tensafe.he.gpu"):
            delta = engine.compute(x, on(np.array([1, 1]), device)).cpu().numpy()
        warnings.append(caplog.text.count("torch.compile of the HE engine's stages failed"))
        assert not engine.compiled
        assert np.abs(delta - ref).max() < engine.profile.tolerance
    assert warnings == [1, 0]


def test_folded_products_equal_decrypted_products(
    ctx: PublicContext, secret: SecretKeySet, qv: tuple, local_engines: dict,
    rng: np.random.Generator,
) -> None:  # fmt: skip
    """Dec(sum w_j B'_j) == sum w_j Dec(B'_j) bit for bit, and both equal SEAL's decryption of
    the CPU path's product ciphertext: the pipeline before the flood is integer-exact."""
    _, _, (mq, mv) = qv
    folded, plain = local_engines[True], local_engines[False]
    u = torch.zeros((2, 2, 3, 8), dtype=torch.float64, device=folded.device)
    u[:, 1] = on(rng.normal(size=(2, 3, 8)), folded.device)
    slots = torch.ones(2, dtype=torch.int64, device=folded.device)
    a = folded._products(folded._weights(u, slots)[1])[:, :, 0]
    products = plain._products(plain._weights(u, slots)[1])
    b = plain.ring.decrypt(products, plain._s_spectrum)
    assert torch.equal(a, b)
    # The CPU path: SEAL ciphertexts from lincomb, decrypted by SEAL.
    w = torch.round(u[:, 1, [0, 2]] * ctx.profile.u_scale).long().reshape(2, -1)
    combiner = LinearCombiner(ctx)
    cols = [mq.column_ciphertext(j, 0) for j in range(8)] + [
        mv.column_ciphertext(j, 0) for j in range(8)
    ]
    residue_columns = ResidueColumns(cols)
    cts = combiner.combine(
        combiner.digits(w.cpu().numpy(), residue_columns), residue_columns.shape, 2.0**124
    )
    for t, ct in enumerate(cts):
        assert np.array_equal(as_u64(a[0, t]), seal_decrypt_coefficients(secret, ct))


@pytest.mark.parametrize("fold_secret", [False, True])
def test_long_calls_decode_the_columns_once(
    qv: tuple, local_engines: dict, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch,
    fold_secret: bool,
) -> None:  # fmt: skip
    """More tokens than columns (a prefill): the call decrypts and decodes the columns once
    and combines their slot values. Folded or not, the decoded columns are the same bit for
    bit; without the flood, the deltas are the per-token path's up to its rounding; with it,
    both are within the tolerance of the float reference, whole and in chunks; the columns
    are decoded once per call, not per chunk."""
    d_in, (lq, lv), _ = qv
    engine = local_engines[fold_secret]
    columns = engine._decoded_columns(engine.table)
    other = local_engines[not fold_secret]
    assert torch.equal(columns, other._decoded_columns(other.table))
    threshold = engine.column_decode_tokens
    assert threshold == engine.max_slots * engine.rank
    tokens = threshold + 5
    assert engine._decodes_columns(tokens) and not engine._decodes_columns(threshold)
    x = on(rng.normal(size=(tokens, d_in)), engine.device).float()
    slots = on(np.where(np.arange(tokens) % 7 == 3, -1, 1), engine.device)
    zero = [t for t in range(tokens) if t % 7 == 3]
    ref = _reference(x.cpu().numpy().astype(np.float64), lq, lv, zero)

    # Noise-free: decoded columns == decrypting every token's product, up to its rounding.
    per_token, by_columns = _noise_free_slot_values(engine, engine.project(x), slots)
    assert torch.abs(by_columns - per_token).max() < _rounding_bound(engine.ring)
    assert torch.abs(per_token).max() > 0.1  # a meaningful comparison

    decodes = []
    real = engine._decoded_columns
    monkeypatch.setattr(engine, "_decoded_columns", lambda t: decodes.append(1) or real(t))
    results = []
    for chunk in (512, 7):
        decodes.clear()
        engine.chunk_tokens = chunk
        try:
            results.append(engine.compute(x, slots).cpu().numpy())
        finally:
            engine.chunk_tokens = 512
        assert decodes == [1]  # once per call, not per chunk
        assert np.all(results[-1][zero] == 0.0)
        assert np.abs(results[-1] - ref).max() < engine.profile.tolerance


def _noise_free_slot_values(
    engine: GpuDeltaEngine, u: torch.Tensor, slots: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(G, T, N/2) float64 slot values of U's products without the flood: decrypted per token
    (products, decryption, switch, decoding) and from the decoded columns (float64 GEMM)."""
    _, limbs, _ = engine._weights(u, slots)
    per_token = engine.decode(engine.ring.switch(engine.decrypt(engine._products(limbs)))).real
    _, weights, _ = engine._column_weights(u, slots)
    return per_token, torch.bmm(weights, engine._decoded_columns(engine.table))


def _rounding_bound(ring: DeviceRing) -> float:
    """Six standard deviations of the per-token path's switch rounding in a slot (uniform
    +-1/2 per coefficient, N of them): the decoded columns' own rounding is ~2^-64."""
    return 6.0 * math.sqrt(ring.n / 24.0) / ring.delta_prime


@pytest.mark.parametrize("profile", ["default", "fast", "precise"])
def test_long_calls_are_exact_at_the_norm_bound(profile: str, device: torch.device) -> None:
    """A token's U at the flood's norm bound (2^u_norm_bits) and B' rows of norm 1/64 (deltas
    up to 2^u_norm_bits / 64, 8 for the default profile, as it is sized for), every profile:
    the decoded columns give the per-token path's slot values up to that path's rounding, and
    the flooded deltas of both paths are within the tolerance. Columns rounded to the replies'
    2^-32 before the weights apply are off by |u| times that, the same in every call (95x
    the bound here)."""
    secret, ctx = generate_keys(profile)
    rng = np.random.default_rng(7)
    rank, d_out, tokens = 16, 256, 40
    b = rng.normal(size=(d_out, rank))
    b *= (1 / 64) / np.linalg.norm(b, axis=1, keepdims=True)
    matrix = encrypt_matrix(ctx, b)
    engine = GpuDeltaEngine.from_matrices(
        secret, [matrix], output_slices=[d_out], max_slots=1, device=device
    )
    engine.load(0, [matrix])
    u = rng.normal(size=(tokens, rank))
    u *= 0.98 * ctx.profile.u_norm_bound / np.linalg.norm(u, axis=1, keepdims=True)
    u_dev = on(u, device).view(tokens, 1, 1, rank)
    slots = torch.zeros(tokens, dtype=torch.int64, device=device)
    assert engine._decodes_columns(tokens)
    per_token, by_columns = _noise_free_slot_values(engine, u_dev, slots)
    assert torch.abs(by_columns - per_token).max() < _rounding_bound(engine.ring)
    ref = u @ b.T
    assert np.abs(ref).max() > ctx.profile.u_norm_bound / 64 / 4  # near the sizing's |delta|
    decoded = engine.compute_u(u_dev, slots).cpu().numpy()
    engine.column_decode_tokens = tokens  # the same call, decrypted per token
    decrypted = engine.compute_u(u_dev, slots).cpu().numpy()
    for got in (decoded, decrypted):
        assert np.abs(got - ref).max() < ctx.profile.tolerance


def test_the_decoded_flood_is_the_profiles_flood(
    secret: SecretKeySet, ctx: PublicContext, device: torch.device
) -> None:
    """The noise a long call adds, measured on the engine's own output (an all-zero B', whose
    deltas are the noise alone): std ``flood_sigma`` per slot, the profile's flood; a short
    call of the same engine: the flood and the switch's rounding (+1 %)."""
    tokens, d_out = 64, 256
    matrix = encrypt_matrix(ctx, np.zeros((d_out, 16)))
    engine = GpuDeltaEngine.from_matrices(
        secret, [matrix], output_slices=[d_out], max_slots=1, device=device
    )
    engine.load(0, [matrix])
    engine.flood_source.generator.manual_seed(20261202)
    u = on(np.random.default_rng(5).normal(size=(tokens, 1, 1, 16)), device)
    slots = torch.zeros(tokens, dtype=torch.int64, device=device)
    sigma = ctx.profile.flood_sigma
    assert engine._decodes_columns(tokens)
    long_call = engine.compute_u(u, slots).double()
    engine.column_decode_tokens = tokens
    per_token = engine.compute_u(u, slots).double()
    rounding = math.sqrt(engine.ring.n / 24.0) / engine.ring.delta_prime
    # 16384 samples each: SE of a std 0.55 %.
    assert abs(float(long_call.std()) / sigma - 1.0) < 0.03
    assert abs(float(per_token.std()) / math.hypot(sigma, rounding) - 1.0) < 0.03


def test_decoded_flood_has_the_coefficient_floods_distribution(ring: DeviceRing) -> None:
    """Why a long call may draw its flood per slot: the per-token path's coefficient flood,
    switched and decoded, is per slot i.i.d. Gaussian of std flood_sigma (with the switch's
    rounding: +1 % for the default profile): neighbouring slots uncorrelated, Gaussian
    tails."""
    from vllm_tensafe.he.gpu_engine import PhiloxFlood

    source = PhiloxFlood(ring.device)
    source.generator.manual_seed(20261202)
    normals, words = source.draw((32, ring.n))
    flood = flood_residues(
        ring.arith, ring.flood.high_parts(normals), ring.flood.low_parts_from_words(words),
        ring.flood.k,
    )  # fmt: skip
    slots = ring.decoder.evaluations(ring.coefficients(ring.switch(flood))).real
    rounding = math.sqrt(ring.n / 24.0) / ring.delta_prime
    sigma = math.hypot(ring.profile.flood_sigma, rounding)
    assert sigma / ring.profile.flood_sigma < 1.02
    assert abs(float(slots.std()) / sigma - 1.0) < 0.01  # 131072 samples: SE 0.2 %
    a, b = slots[:, :-1].flatten(), slots[:, 1:].flatten()
    assert abs(float(torch.corrcoef(torch.stack([a, b]))[0, 1])) < 0.02
    kurtosis = float(((slots / slots.std()) ** 4).mean())
    assert abs(kurtosis - 3.0) < 0.1  # a Gaussian's; uniform noise would give 1.8


def test_rerandomise_matches_seal(
    ctx: PublicContext, ring: DeviceRing, columns: list, rng: np.random.Generator
) -> None:
    ct = columns[0]
    v = rng.integers(-1, 2, size=ring.n)
    e = rng.integers(-19, 20, size=(2, ring.n))
    got = ring.rerandomise(
        ring.upload(coefficient_residues(ctx, ct))[None],
        on(v, ring.device)[None],
        on(e, ring.device)[None],
    )[0]
    ntt = ciphertext_residues(ntt_ciphertext(ctx, as_u64(got), 1.0))
    assert np.array_equal(ntt, seal_rerandomise(ctx, np.array(ciphertext_residues(ct)), v, e))


class RecordingKeyHolder(LocalKeyHolder):
    """The v2 key holder of keyholder.py, keeping the last request it was sent."""

    received: list[bytes] | None = None

    def decrypt(self, ref: AdapterRef, ciphertexts: list[bytes]) -> list[np.ndarray]:
        self.received = [bytes(b) for b in ciphertexts]
        return super().decrypt(ref, ciphertexts)


@pytest.fixture(scope="module")
def remote_setup(qv: tuple, secret: SecretKeySet, device: torch.device) -> tuple:
    d_in, loras, mats = qv
    holder = RecordingKeyHolder(secret)
    ref = AdapterRef("bench", secret.key_id, "0" * 64)
    engine = GpuRemoteDeltaEngine.from_matrices(
        holder, [mats[0], None, mats[1]], output_slices=[96, 16, 32], d_in=d_in, device=device
    )
    engine.load(0, [mats[0], None, mats[1]], [loras[0].a_mixed, None, loras[1].a_mixed],
                ref=ref)  # fmt: skip
    return engine, holder, d_in, loras


def test_remote_engine_deltas_through_the_v2_key_holder(
    remote_setup: tuple, rng: np.random.Generator, ctx: PublicContext
) -> None:
    engine, holder, d_in, (lq, lv) = remote_setup
    x = rng.normal(size=(3, d_in))
    slots = on(np.array([0, -1, 0]), engine.device)
    got = engine.compute(on(x, engine.device).float(), slots).cpu().numpy()
    assert holder.received is not None and len(holder.received) == 2  # only the live tokens
    assert np.abs(got - _reference(x, lq, lv, [1])).max() < ctx.profile.tolerance
    # What left the host: v2 wire ciphertexts (NTT form, the product scale).
    for blob in holder.received:
        sent = decode_ciphertext(ctx, blob, "sent")
        assert sent.is_ntt_form() and sent.scale == ctx.profile.product_scale


def test_remote_wire_bytes_equal_sealed_ciphertexts(
    remote_setup: tuple, rng: np.random.Generator, ctx: PublicContext
) -> None:
    """The batch encoding (one buffer, no SEAL object per ciphertext) gives the bytes of
    encode_ciphertext on a SEAL ciphertext holding the same residues, and they decode."""
    engine = remote_setup[0]
    qs = engine.ring.moduli.values
    n = engine.ring.n
    host = np.stack(
        [np.stack([np.stack([rng.integers(0, q, n, dtype=np.uint64) for q in qs])] * 2)
         for _ in range(3)]
    )  # fmt: skip
    got = engine.wire_ciphertexts(host)
    scale = ctx.profile.product_scale
    for blob, ct in zip(got, host, strict=True):
        sealed = ciphertext_from_residues(ctx.context, ctx.parms_id, ct, scale)
        assert bytes(blob) == encode_ciphertext(sealed)
        back = decode_ciphertext(ctx, blob, "sent")
        assert np.array_equal(ciphertext_residues(back), ct)
    body = encode_request(AdapterRef("a", ctx.key_id, "ab" * 32), got)
    assert decode_request(body, 8)[1][2] == got[2]


def test_remote_engine_compiled_stages_are_bit_identical(
    remote_setup: tuple, qv: tuple, rng: np.random.Generator, ctx: PublicContext,
    device: torch.device,
) -> None:  # fmt: skip
    """The remote engine's compiled stages (products, re-randomisation + pad, SEAL's NTT,
    unpad + decode) give the eager stages' integers on the same inputs, and its deltas through
    the key holder stay within the tolerance."""
    engine, holder, d_in, (lq, lv) = remote_setup
    backend = "inductor" if device.type == "cuda" else "aot_eager"
    mats = [qv[2][0], None, qv[2][1]]
    compiled = GpuRemoteDeltaEngine.from_matrices(
        holder, mats, output_slices=[96, 16, 32], d_in=d_in, device=device, compile=True,
        compile_backend=backend,
    )  # fmt: skip
    ref = AdapterRef("bench", ctx.key_id, "0" * 64)
    compiled.load(0, mats, [lq.a_mixed, None, lv.a_mixed], ref=ref)
    cls = GpuRemoteDeltaEngine
    u = on(rng.normal(size=(2, 1, 3, 8)), device)
    slots = torch.zeros(2, dtype=torch.int64, device=device)
    weights = engine._weights(u, slots)[1]
    products = engine._products(weights)
    assert torch.equal(_compiled_stage(cls, "_products", backend)(compiled, weights), products)
    batch = products.flatten(0, 1)
    ternary, errors, uniform = compiled.covers.draw(batch.shape[0])
    v, e1 = on(ternary, device), on(errors, device)
    pad = on(uniform.view(np.int64), device)
    spectra = engine.ring.public_key_spectra()
    want = engine._conceal(batch, v, e1, pad, spectra)
    got = _compiled_stage(cls, "_conceal", backend)(compiled, batch, v, e1, pad, spectra)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    ntt = _compiled_stage(cls, "_ntt_form", backend)(compiled, want[0])
    assert torch.equal(ntt, engine._ntt_form(want[0]))
    replies = torch.randint(-(1 << 62), 1 << 62, want[1].shape, device=device)
    unpadded = _compiled_stage(cls, "unpad_evaluations", backend)(compiled, replies, want[1])
    assert torch.equal(unpadded, engine.unpad_evaluations(replies, want[1]))
    x = rng.normal(size=(3, d_in))
    got_delta = compiled.compute(on(x, device).float(), on(np.array([0, -1, 0]), device))
    assert compiled.compiled
    assert (
        np.abs(got_delta.cpu().numpy() - _reference(x, lq, lv, [1])).max() < ctx.profile.tolerance
    )


def test_remote_pad_hides_the_product_from_the_key_holder(
    remote_setup: tuple, secret: SecretKeySet, ctx: PublicContext, rng: np.random.Generator
) -> None:
    """What the key holder decrypts is P + R, R uniform mod Q: no slot near the delta. Guard:
    the same ciphertext without the pad decrypts to the delta (the attack works on it)."""
    engine, _, _, (lq, _) = remote_setup
    ring = engine.ring
    u = on(rng.normal(size=(1, 1, 3, 8)), ring.device)
    slots = torch.zeros(1, dtype=torch.int64, device=ring.device)
    product = engine._products(engine._weights(u, slots)[1])[0]
    v = torch.zeros((1, ring.n), dtype=torch.int64, device=ring.device)
    e = torch.zeros((1, 2, ring.n), dtype=torch.int64, device=ring.device)

    def key_holder_view(ct: torch.Tensor) -> np.ndarray:
        sent = ntt_ciphertext(ctx, as_u64(ct[0]), ctx.profile.product_scale)
        x = seal_decrypt_coefficients(secret, sent)
        reply = switch_reference(x, moduli(ctx), ring.switch.m).view(np.int64)
        return ring.decoder.decode(ring.coefficients(on(reply, ring.device))).cpu().numpy()

    bare = key_holder_view(ring.rerandomise(product, v, e))
    delta = (u[0, 0, 0].cpu().numpy() @ lq.b_mixed.T)[:96]
    assert np.abs(bare[:96] - delta).max() < 1e-5  # without the pad the key holder sees delta
    outgoing, _ = engine.prepare_outgoing(product)
    padded = key_holder_view(outgoing)
    assert np.abs(padded[:96] - delta).min() > 1.0  # with it, nothing near delta
    assert np.abs(padded).max() > 2.0**30


def test_remote_ciphertexts_are_fresh_every_time(remote_setup: tuple) -> None:
    engine, _, _, _ = remote_setup
    product = torch.zeros((1, 2, *engine.ring.shape), dtype=torch.int64, device=engine.device)
    first, rho1 = engine.prepare_outgoing(product)
    second, rho2 = engine.prepare_outgoing(product)
    assert not torch.equal(first[:, 1], second[:, 1])  # re-randomised c1
    assert not torch.equal(rho1, rho2)  # fresh pad


def test_engine_refuses_what_does_not_fit(
    ctx: PublicContext, secret: SecretKeySet, qv: tuple, other_keys: tuple,
    rng: np.random.Generator, device: torch.device,
) -> None:  # fmt: skip
    from vllm_tensafe.errors import ForeignCiphertextError, HEError

    d_in, _, (mq, mv) = qv
    engine = GpuDeltaEngine.from_matrices(
        secret, [mq, None, mv], output_slices=[96, 16, 32], d_in=d_in, device=device
    )
    alone = encrypt_matrix(ctx, rng.normal(size=(32, 8)) * 0.1)  # v packed at slot 0: overlaps q
    with pytest.raises(HEError, match="overlaps"):
        engine.load(0, [mq, None, alone])
    foreign = encrypt_matrix(other_keys[1], rng.normal(size=(96, 8)) * 0.1)
    with pytest.raises(ForeignCiphertextError):
        engine.load(0, [foreign, None, None])
    with pytest.raises(HEError, match="rank"):
        engine.load(0, [encrypt_matrix(ctx, rng.normal(size=(96, 9)) * 0.1), None, None])
    with pytest.raises(HEError, match="output_slices"):
        GpuDeltaEngine.from_matrices(secret, [mq, None, mv])


def test_residue_arithmetic_is_device_generic(device: torch.device) -> None:
    """Constants follow the device of the ring (nothing is pinned to the CPU)."""
    arith = ResidueArithmetic(Moduli((1152921504606748673,), 8, device))
    assert arith.q.device.type == device.type


def test_unloaded_slot_gives_zero(qv: tuple, local_engines: dict) -> None:
    """Last in the module: it empties the shared engine's slot."""
    engine = local_engines[True]
    x = torch.randn(3, qv[0], device=engine.device)
    slots = torch.ones(3, dtype=torch.int64, device=engine.device)
    assert engine.compute(x, slots).abs().max() > 0
    engine.unload(1)
    assert not engine.compute(x, slots).any()
