"""The remote GPU path's randomness for outgoing ciphertexts (gpu_engine.OutgoingCovers):
drawn from the CPU CSPRNG ahead of use by a background thread, each set handed out once."""

from __future__ import annotations

import time

import numpy as np
import pytest

from vllm_tensafe.he import PublicContext, generate_keys
from vllm_tensafe.he.gpu_engine import OutgoingCovers


@pytest.fixture(scope="module")
def ctx() -> PublicContext:
    return generate_keys("default")[1]


def _wait(condition, seconds: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


def test_sets_have_the_samplers_ranges_and_are_never_reused(ctx: PublicContext) -> None:
    covers = OutgoingCovers(ctx, prefetch=4)
    covers.start()
    _wait(lambda: covers._queue.full())  # the background thread drew them ahead
    v, e1, pad = covers.take(6)  # four prefetched, two drawn now
    n = ctx.profile.poly_modulus_degree
    assert v.shape == (6, n) and e1.shape == (6, n) and pad.shape[0] == 6
    assert set(np.unique(v)) <= {-1, 0, 1}
    assert np.abs(e1).max() <= 19
    moduli = np.array(covers.sampler.moduli, dtype=np.uint64)[None, :, None]
    assert np.all(pad < moduli)
    # Fresh every time: no two ciphertexts get the same pad or the same v.
    flat = [row.tobytes() for row in pad.reshape(6, -1)] + [row.tobytes() for row in v]
    assert len(set(flat)) == len(flat)
    again = covers.take(6)
    assert not any(np.array_equal(a, b) for a, b in zip(again[2], pad, strict=True))


def test_without_prefetch_every_set_is_drawn_on_demand(ctx: PublicContext) -> None:
    covers = OutgoingCovers(ctx, prefetch=0)
    v, _, _ = covers.take(2)
    assert covers._thread is None and v.shape[0] == 2


def test_one_instance_per_context(ctx: PublicContext) -> None:
    assert OutgoingCovers.for_context(ctx) is OutgoingCovers.for_context(ctx)
