"""HE-LoRA delta benchmark: ms per token per module, next to the primitive floor.

    .venv/bin/python benchmarks/he_bench.py [--profile default] [--repeats 3]

Prints one JSON document. For each (d_out, r) and T it times DeltaEngine.compute through a
local key holder and through a remote one on loopback (`key-holder serve` in its own process,
as deployed: in-process it would share the GIL with the host), and the primitive floor
measured in the same run: per result ciphertext, r plaintext-ciphertext products, r - 1
additions and one decryption (decrypt + decode), divided by T. Every local point is timed
twice: with the engine's choice of product formulation (integer GEMM over RNS residues where
it is faster) and with SEAL's call-per-product loop only. ``layers`` does the same for a
Qwen2.5-0.5B attention layer (q 896 + v 128, r 8), with q and v packed into one tile (as
`vllm-tensafe pack` does) and each in its own (as before fusion). ``per_ciphertext`` times, in
the same run, what each decrypt request costs beyond its products on protocol v1 (slot mask at
the host; flood encode, decrypt, decode at the key holder) and on v2 (re-randomisation and pad
at the host; decrypt, inverse NTT, flood, switch at the key holder; unpad and decode at the
host), with the bytes each puts on the wire.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import tenseal
import tenseal.sealapi as seal

from vllm_tensafe.he import DeltaEngine, encrypt_matrix, generate_keys
from vllm_tensafe.he.conceal import Concealer
from vllm_tensafe.he.flooding import complex_normal, flood_coefficients, uniform01
from vllm_tensafe.he.residues import ciphertext_residues, mul_pow2, plaintext_residues
from vllm_tensafe.he.ring import Ring
from vllm_tensafe.keyholder import AdapterRef, LocalKeyHolder, RemoteKeyHolder
from vllm_tensafe.keyholder.wire import (
    ciphertext_size,
    decode_ciphertext,
    encode_ciphertext,
    encode_response,
)

SHAPES = [(128, 8), (896, 8), (4096, 16)]
TOKENS = [1, 16, 64]
TOKEN = "bench-token-0123456789abcdef"
SERVE = """
import sys
from vllm_tensafe.cli import main
sys.exit(main(sys.argv[1:]))
"""


def start_service(secret: Any, workdir: Path) -> tuple[subprocess.Popen[str], str]:
    """`key-holder serve` in a child process; returns it and its URL."""
    import json

    secret_path, token_path = workdir / "bench.secret", workdir / "tokens"
    secret.save(secret_path)
    token_path.write_text(TOKEN + "\n")
    token_path.chmod(0o600)
    # No package here: a policy file binds the benchmark's adapter name to its key.
    policy = workdir / "adapters.json"
    ref = _ref(secret)
    policy.write_text(
        json.dumps(
            {"adapters": [{"name": ref.name, "key_id": ref.key_id,
                           "manifests": [{"digest": ref.manifest_digest}]}]}
        )
    )  # fmt: skip
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            SERVE,
            "key-holder",
            "serve",
            "--he-secret",
            str(secret_path),
            "--port",
            "0",
            "--token-file",
            str(token_path),
            "--adapters",
            str(policy),
            "--audit-log",
            str(workdir / "audit.jsonl"),
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    for line in proc.stderr:
        if "listening on" in line:
            # Keep reading its audit log, or a full pipe would block the service.
            threading.Thread(target=proc.stderr.read, daemon=True).start()
            return proc, line.split("listening on ", 1)[1].split()[0]
    proc.kill()
    raise RuntimeError("key holder did not start")


def _ref(ctx: Any) -> AdapterRef:
    return AdapterRef("bench", ctx.key_id, "00" * 32)


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of ``repeats`` runs after one warm-up."""
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def primitives(ctx: Any, secret: Any, repeats: int) -> dict[str, float]:
    p = ctx.profile
    rng = np.random.default_rng(0)
    plain = seal.Plaintext()
    ctx.encoder.encode(rng.normal(size=p.slot_count).tolist(), ctx.parms_id, p.b_scale, plain)
    b_ct = seal.Ciphertext(ctx.context)
    ctx.encryptor.encrypt(plain, b_ct)
    u_vec = rng.normal(size=p.slot_count).tolist()
    u_plain = seal.Plaintext()
    ctx.encoder.encode(u_vec, ctx.parms_id, p.u_scale, u_plain)
    out = seal.Ciphertext(ctx.context)
    ctx.evaluator.multiply_plain(b_ct, u_plain, out)
    acc = seal.Ciphertext(ctx.context)
    ctx.evaluator.multiply_plain(b_ct, u_plain, acc)
    decryptor = seal.Decryptor(ctx.context, secret.secret_key)
    dec_plain = seal.Plaintext()
    decryptor.decrypt(out, dec_plain)
    n = max(repeats * 10, 20)

    def per_call(fn: Callable[[], object]) -> float:
        return timed(lambda: [fn() for _ in range(n)], 1) / n * 1e3

    return {
        "encode_u_vector": per_call(
            lambda: ctx.encoder.encode(u_vec, ctx.parms_id, p.u_scale, u_plain)
        ),
        "encode_u_scalar": per_call(
            lambda: ctx.encoder.encode(0.5, ctx.parms_id, p.u_scale, u_plain)
        ),
        "multiply_plain": per_call(lambda: ctx.evaluator.multiply_plain(b_ct, u_plain, out)),
        "add": per_call(lambda: ctx.evaluator.add_inplace(acc, out)),
        "decrypt": per_call(lambda: decryptor.decrypt(out, dec_plain)),
        "decode": per_call(lambda: ctx.encoder.decode_double(dec_plain)),
    }


def product_ciphertext(ctx: Any, seed: int) -> Any:
    """One request product as the host makes it: Enc(B' column) times a U plaintext (0.5), at
    the product scale."""
    p = ctx.profile
    rng = np.random.default_rng(seed)
    plain = seal.Plaintext()
    ctx.encoder.encode(rng.normal(size=p.slot_count).tolist(), ctx.parms_id, p.b_scale, plain)
    column = seal.Ciphertext(ctx.context)
    ctx.encryptor.encrypt(plain, column)
    ctx.encoder.encode(0.5, ctx.parms_id, p.u_scale, plain)
    product = seal.Ciphertext(ctx.context)
    ctx.evaluator.multiply_plain(column, plain, product)
    return product


# The slot mask of protocol v1 (removed): uniform in [-2^30, 2^30), encoded at 2^35 (SEAL's
# fast path) and multiplied up to the product scale in the residues.
_V1_MASK_BITS, _V1_MASK_ENCODE_BITS = 30, 35


def per_ciphertext(ctx: Any, secret: Any, repeats: int) -> dict[str, Any]:
    """ms per request ciphertext beyond its products, protocol v1 against v2, same run."""
    p = ctx.profile
    ring = Ring(ctx.context, ctx.parms_id, p.poly_modulus_degree)
    concealer = Concealer(ctx, ring)
    decryptor = seal.Decryptor(ctx.context, secret.secret_key)
    product = product_ciphertext(ctx, 5)
    residues = ciphertext_residues(product).copy()
    bits = p.product_scale_bits
    m = p.reply_exponent(bits)
    q = ring.q
    work = seal.Plaintext()
    dec = seal.Plaintext()
    decryptor.decrypt(product, dec)
    n = max(repeats * 10, 20)

    def per_call(fn: Callable[[], object]) -> float:
        return timed(lambda: [fn() for _ in range(n)], 1) / n * 1e3

    def v1_mask() -> None:
        mask = (2.0 * uniform01(p.slot_count) - 1.0) * 2.0**_V1_MASK_BITS
        ctx.encoder.encode(mask.tolist(), ctx.parms_id, 2.0**_V1_MASK_ENCODE_BITS, work)
        mul_pow2(plaintext_residues(work, ring.primes), bits - _V1_MASK_ENCODE_BITS, q)
        work.scale = product.scale
        ctx.evaluator.add_plain_inplace(product, work)

    def v1_flood_encode() -> None:
        noise = complex_normal(p.slot_count) * p.flood_sigma
        ctx.encoder.encode(noise.tolist(), ctx.parms_id, product.scale, work)

    def fresh_product() -> Any:
        ciphertext_residues(product)[...] = residues
        return product

    zero = seal.Ciphertext(ctx.context)
    v1 = {
        "host_mask": per_call(v1_mask),
        "key_holder_flood_encode": per_call(v1_flood_encode),
        "key_holder_decrypt": per_call(lambda: decryptor.decrypt(product, dec)),
        "key_holder_decode": per_call(lambda: ctx.encoder.decode_double(dec)),
    }
    coefficients = ring.transform(plaintext_residues(dec, ring.primes)[None].copy(), to_ntt=False)
    sigma = p.flood_coefficient_sigma(bits)
    reply = ring.switch(coefficients[0], m)
    v2 = {
        "host_rerandomise_and_pad": per_call(lambda: concealer.conceal(fresh_product())),
        "key_holder_decrypt": v1["key_holder_decrypt"],
        "key_holder_inverse_ntt": per_call(
            lambda: ring.transform(plaintext_residues(dec, ring.primes)[None], to_ntt=False)
        ),
        "key_holder_flood": per_call(lambda: flood_coefficients(ring, sigma, 1)),
        "key_holder_switch": per_call(lambda: ring.switch(coefficients[0], m)),
        "host_unpad_decode": per_call(
            lambda: ring.decode(ring.centred(reply - reply, m)[None], ring.reply_scale(bits, m))
        ),
    }
    blob = encode_ciphertext(product)
    comparison = {
        "seal_encrypt_zero": per_call(lambda: ctx.encryptor.encrypt_zero(ctx.parms_id, zero)),
        "wire_parse_request_ciphertext": per_call(lambda: decode_ciphertext(ctx, blob, "b")),
    }
    v1_total = sum(v1.values())
    v2_total = sum(v2.values())
    return {
        "v1_ms": {k: round(v, 4) for k, v in v1.items()},
        "v2_ms": {k: round(v, 4) for k, v in v2.items()},
        "comparison_ms": {k: round(v, 4) for k, v in comparison.items()},
        "v1_total_ms": round(v1_total, 4),
        "v2_total_ms": round(v2_total, 4),
        "v2_local_total_ms": round(v2_total - v2["host_rerandomise_and_pad"], 4),
        "v2_minus_v1_ms": round(v2_total - v1_total, 4),
        "bytes": {
            "v1_request_ciphertext": p.ciphertext_bytes + 113,
            "v1_reply": 8 * p.slot_count,
            "v2_request_ciphertext": ciphertext_size(p),
            "v2_reply": len(encode_response([reply])) - 16,
        },
    }


def layer_cases(ctx: Any, engine: Any, seal_loop: Any, repeats: int) -> list[dict[str, Any]]:
    """ms per token for one q+v layer of the 0.5B shape: fused tile vs separate tiles."""
    from vllm_tensafe.he.packing import fused_layouts

    rng = np.random.default_rng(3)
    b = {"q": rng.normal(size=(896, 8)) * 0.05, "v": rng.normal(size=(128, 8)) * 0.05}
    tiles = fused_layouts([[("q", 896), ("v", 128)]], ctx.slot_count)
    layouts = {
        "fused": {
            n: encrypt_matrix(ctx, b[n], slot_offset=tiles[n][0], tile_width=tiles[n][1]) for n in b
        },
        "separate": {n: encrypt_matrix(ctx, b[n]) for n in b},
    }
    out = []
    for tokens in (1, 4, 16, 64):
        u = {n: rng.normal(size=(tokens, 8)) for n in b}
        row: dict[str, Any] = {"T": tokens}
        for layout, mats in layouts.items():
            items = [(u[n], mats[n]) for n in b]
            for name, eng in (("engine", engine), ("seal_loop", seal_loop)):
                if eng is None:
                    continue
                seconds = timed(lambda items=items, eng=eng: eng.compute(_ref(ctx), items), repeats)
                row[f"{layout}_{name}_ms_per_token"] = round(seconds * 1e3 / tokens, 3)
        out.append(row)
    return out


def precision(repeats: int) -> dict[str, dict[str, float]]:
    """Max |delta error| per profile: |U| entries up to 64, |delta| <= 8, after flooding."""
    out = {}
    for name in ("default", "fast", "precise"):
        secret, ctx = generate_keys(name)
        engine = DeltaEngine(ctx, LocalKeyHolder(secret))
        rng = np.random.default_rng(2)
        worst = {"max_abs_error": 0.0, "max_abs_error_typical_u": 0.0, "max_abs_delta": 0.0}
        for d_out, rank, tokens in ((896, 8, 16), (128, 64, 64), (4096, 16, 8)):
            for _ in range(max(1, repeats // 2)):
                b = rng.normal(size=(d_out, rank))
                for key, u in (
                    ("max_abs_error", rng.uniform(-64, 64, size=(tokens, rank))),
                    ("max_abs_error_typical_u", rng.normal(size=(tokens, rank))),
                ):
                    exact = u @ b.T
                    bb = b * (7.9 / np.abs(exact).max())  # |delta| <= 8
                    (delta,) = engine.compute(_ref(ctx), [(u, encrypt_matrix(ctx, bb))])
                    expected = u @ bb.T
                    worst[key] = max(worst[key], float(np.abs(delta - expected).max()))
                    worst["max_abs_delta"] = max(
                        worst["max_abs_delta"], float(np.abs(expected).max())
                    )
        out[name] = {k: float(f"{v:.3g}") for k, v in worst.items()} | {
            "tolerance": ctx.profile.tolerance
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="default", help="HE profile (default: default)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per point (median)")
    args = parser.parse_args(argv)

    secret, ctx = generate_keys(args.profile)
    prim = primitives(ctx, secret, args.repeats)
    local = DeltaEngine(ctx, LocalKeyHolder(secret))
    seal_loop = DeltaEngine(ctx, LocalKeyHolder(secret))
    seal_loop.gemm_min_rank, seal_loop.gemm_tiled = 1 << 30, False
    workdir = tempfile.TemporaryDirectory()
    service, url = start_service(secret, Path(workdir.name))
    remote_holder = RemoteKeyHolder(url, TOKEN, timeout=60)
    remote = DeltaEngine(ctx, remote_holder)
    rng = np.random.default_rng(1)
    ref = _ref(ctx)
    results = []
    try:
        for d_out, rank in SHAPES:
            matrix = encrypt_matrix(ctx, rng.normal(size=(d_out, rank)) * 0.05)
            for tokens in TOKENS:
                u = rng.normal(size=(tokens, rank))
                items = [(u, matrix)]
                before = local.stats.as_dict()
                t_local = timed(lambda items=items: local.compute(ref, items), args.repeats)
                after = local.stats.as_dict()
                t_remote = timed(lambda items=items: remote.compute(ref, items), args.repeats)
                t_seal = timed(lambda items=items: seal_loop.compute(ref, items), args.repeats)
                k = matrix.tokens_per_ciphertext
                cts = -(-tokens // k) * matrix.n_chunks
                floor = (
                    cts
                    * (
                        rank * prim["multiply_plain"]
                        + (rank - 1) * prim["add"]
                        + prim["decrypt"]
                        + prim["decode"]
                    )
                    / tokens
                )
                runs = args.repeats + 1
                host = (after["seconds_products"] - before["seconds_products"]) / runs
                holder = (after["seconds_key_holder"] - before["seconds_key_holder"]) / runs
                results.append(
                    {
                        "d_out": d_out,
                        "r": rank,
                        "T": tokens,
                        "tokens_per_ciphertext": k,
                        "ciphertexts": cts,
                        "local_ms_per_token": round(t_local * 1e3 / tokens, 3),
                        "local_seal_loop_ms_per_token": round(t_seal * 1e3 / tokens, 3),
                        "remote_ms_per_token": round(t_remote * 1e3 / tokens, 3),
                        "floor_ms_per_token": round(floor, 3),
                        "remote_overhead_ms_per_token": round(
                            (t_remote - t_local) * 1e3 / tokens, 3
                        ),
                        "local_host_ms_per_token": round(host * 1e3 / tokens, 3),
                        "local_key_holder_ms_per_token": round(holder * 1e3 / tokens, 3),
                    }
                )
        layers = layer_cases(ctx, local, seal_loop, args.repeats)
        layers_remote = layer_cases(ctx, remote, None, args.repeats)
    finally:
        remote_holder.close()
        service.send_signal(signal.SIGTERM)
        service.wait(timeout=30)
        workdir.cleanup()

    report = {
        "command": "python benchmarks/he_bench.py " + " ".join(argv or sys.argv[1:]),
        "profile": ctx.profile.describe(),
        "layers": layers,
        "layers_remote": layers_remote,
        "per_ciphertext": per_ciphertext(ctx, secret, args.repeats),
        "machine": {
            "python": platform.python_version(),
            "tenseal": tenseal.__version__,
            "numpy": np.__version__,
            "cpus": os.cpu_count(),
            # Other work on the machine inflates every figure; recorded so readers can tell.
            "loadavg_at_end": os.getloadavg()[0],
            "platform": platform.platform(),
        },
        "notes": [
            "ms per token per module; medians; TenSEAL holds the GIL, so this is one core",
            "floor = ciphertexts * (r multiply_plain + (r-1) add + decrypt + decode) / T",
            "local/remote include U encoding, flooding, switching, decoding and (remote) "
            "re-randomisation, pad and serialisation",
        ],
        "primitives_ms": {name: round(v, 4) for name, v in prim.items()},
        "results": results,
        "precision": precision(args.repeats),
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
