"""Key-holder benchmark: ms per decrypt request of the remote path, by batch size.

    .venv/bin/python benchmarks/key_holder_bench.py [--profile default] [--batches 2,8,32]
        [--workers 1,4] [--repeats 20]

Prints one JSON document. For each batch (ciphertexts per request: 2 per layer and token on
an 8B q/v layer with the default profile, 32 at 16 tokens per step) it times, in one run:
the key holder's own work in this process (``LocalKeyHolder.decrypt``: parse, decrypt,
inverse NTT, flood, switch) with each ``--workers`` count, its stages one by one (one
thread), and the whole exchange with `key-holder serve` in its own process over loopback
(``RemoteKeyHolder.decrypt``: request bytes, HTTP, policy, audit line with fsync, reply).
The request ciphertexts are products of the profile's scales, as the host sends them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import tenseal.sealapi as seal

sys.path.insert(0, str(Path(__file__).resolve().parent))

from he_bench import TOKEN, _ref, product_ciphertext, start_service, timed

from vllm_tensafe.he import generate_keys
from vllm_tensafe.he.flooding import flood_coefficients
from vllm_tensafe.he.residues import plaintext_residues
from vllm_tensafe.he.ring import Ring
from vllm_tensafe.keyholder import LocalKeyHolder, RemoteKeyHolder
from vllm_tensafe.keyholder.wire import decode_ciphertext, encode_ciphertext


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    """Median ms of ``repeats`` calls after one warm-up call."""
    return round(timed(fn, repeats) * 1e3, 3)


def product_blob(ctx: Any, seed: int) -> bytes:
    """One request ciphertext's wire bytes (he_bench.product_ciphertext)."""
    return encode_ciphertext(product_ciphertext(ctx, seed))


def stages(ctx: Any, secret: Any, blobs: list[bytes], repeats: int) -> dict[str, float]:
    """ms per request of each key-holder stage, one thread, the whole batch at once."""
    ring = Ring(ctx.context, ctx.parms_id, ctx.profile.poly_modulus_degree)
    decryptor = seal.Decryptor(ctx.context, secret.secret_key)
    plain = seal.Plaintext()
    p = ctx.profile
    bits = p.product_scale_bits
    loaded = [decode_ciphertext(ctx, blob, "c") for blob in blobs]
    decrypted = np.empty((len(blobs), ring.primes, ring.n), dtype=np.uint64)

    def decrypt() -> None:
        for i, ct in enumerate(loaded):
            decryptor.decrypt(ct, plain)
            decrypted[i] = plaintext_residues(plain, ring.primes)

    decrypt()
    coefficients = ring.transform(decrypted, to_ntt=False)
    sigma = p.flood_coefficient_sigma(bits)
    return {
        "parse": median_ms(lambda: [decode_ciphertext(ctx, b, "c") for b in blobs], repeats),
        "decrypt": median_ms(decrypt, repeats),
        "inverse_ntt": median_ms(lambda: ring.transform(decrypted, to_ntt=False), repeats),
        "flood": median_ms(lambda: flood_coefficients(ring, sigma, len(blobs)), repeats),
        "switch": median_ms(lambda: ring.switch(coefficients, p.reply_exponent(bits)), repeats),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="default", help="HE profile (default: default)")
    parser.add_argument("--batches", default="2,8,32", help="ciphertexts per request")
    parser.add_argument(
        "--workers",
        default="1,4,default",
        help="LocalKeyHolder worker counts; 'default': LocalKeyHolder(secret), as key-holder "
        "serve builds it",
    )
    parser.add_argument("--repeats", type=int, default=20, help="timed requests per point")
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    worker_counts = args.workers.split(",")

    secret, ctx = generate_keys(args.profile)
    blobs = [product_blob(ctx, seed) for seed in range(max(batches))]
    ref = _ref(ctx)
    holders = {
        w: LocalKeyHolder(secret) if w == "default" else LocalKeyHolder(secret, workers=int(w))
        for w in worker_counts
    }
    workdir = tempfile.TemporaryDirectory()
    service, url = start_service(secret, Path(workdir.name))
    remote = RemoteKeyHolder(url, TOKEN, timeout=120)
    points = []
    try:
        for count in batches:
            batch = blobs[:count]
            local = {
                w: median_ms(lambda h=h, b=batch: h.decrypt(ref, b), args.repeats)
                for w, h in holders.items()
            }
            exchange = median_ms(lambda b=batch: remote.decrypt(ref, b), args.repeats)
            best = min(local.values())
            points.append(
                {
                    "ciphertexts": count,
                    "request_bytes": sum(len(b) for b in batch),
                    "local_ms_by_workers": local,
                    "local_ms_per_ciphertext": round(best / count, 3),
                    "remote_exchange_ms": exchange,
                    "remote_minus_local_ms": round(exchange - best, 3),
                    "stages_ms_one_thread": stages(ctx, secret, batch, args.repeats),
                }
            )
    finally:
        remote.close()
        service.send_signal(signal.SIGTERM)
        service.wait(timeout=30)
        workdir.cleanup()
        for holder in holders.values():
            holder.close()

    report = {
        "command": "python benchmarks/key_holder_bench.py " + " ".join(argv or sys.argv[1:]),
        "profile": ctx.profile.describe(),
        "poly_modulus_degree": ctx.profile.poly_modulus_degree,
        "data_primes": ctx.profile.data_primes,
        "points": points,
        "machine": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "cpus": os.cpu_count(),
            "loadavg_at_end": os.getloadavg()[0],
            "platform": platform.platform(),
        },
        "notes": [
            "medians; local = LocalKeyHolder.decrypt in this process (what key-holder serve "
            "runs per request); remote = the whole exchange with key-holder serve on loopback",
            f"the service's workers: LocalKeyHolder's default ({min(4, os.cpu_count() or 1)} here)",
            f"log2 of the product scale: {int(math.log2(ctx.profile.product_scale))}",
        ],
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
