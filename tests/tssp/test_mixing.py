"""The random mixing keeps B'A' = sBA and is well conditioned."""

from __future__ import annotations

import numpy as np

from vllm_tensafe.tssp.mixing import MAX_CONDITION, mix_factors, new_generator, random_mixing


def test_mixing_preserves_product_and_is_well_conditioned() -> None:
    rng = np.random.default_rng(0)
    for r in (1, 2, 8, 16, 64):
        a, b = rng.standard_normal((r, 96)), rng.standard_normal((80, r))
        mix, inverse = random_mixing(new_generator(), r)
        assert np.linalg.cond(mix) <= MAX_CONDITION * (1 + 1e-9)
        np.testing.assert_allclose(mix @ inverse, np.eye(r), atol=1e-12)
        a2, b2 = mix_factors(a, b, 0.5, new_generator())
        np.testing.assert_allclose(b2 @ a2, 0.5 * b @ a, atol=1e-10)
        if r > 1:
            assert not np.allclose(a2, a)
            # Same row space: stacking A and A' does not raise the rank.
            assert np.linalg.matrix_rank(np.vstack([a, a2])) == r


def test_no_mixing_only_scales() -> None:
    a, b = np.ones((2, 3)), np.ones((4, 2))
    a2, b2 = mix_factors(a, b, 2.0, None)
    np.testing.assert_array_equal(a2, a)
    np.testing.assert_array_equal(b2, 2.0 * b)


def test_fresh_randomness_each_time() -> None:
    m1, _ = random_mixing(new_generator(), 4)
    m2, _ = random_mixing(new_generator(), 4)
    assert not np.allclose(m1, m2)
