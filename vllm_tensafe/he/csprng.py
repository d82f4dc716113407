"""Fast cryptographic randomness for masks and flooding noise.

Every engine step draws hundreds of kilobytes of randomness (a mask per ciphertext at the host,
a flood per ciphertext at the key holder); ``os.urandom`` costs ~0.7 ms per 200 KB, an AES-CTR
keystream ~0.04 ms. The keystream is AES-256 in counter mode under a key and starting counter
from ``os.urandom``: a standard CSPRNG construction (NIST SP 800-90A's CTR_DRBG without
reseeding), safe for far more than the 2^64 blocks one process will ever draw. A forked child
would continue its parent's stream, so the key is renewed whenever the process id changes.
"""

from __future__ import annotations

import os
import threading

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

_lock = threading.Lock()
_state: tuple[int, object] | None = None
_zeros = bytes(1 << 20)


def _encryptor() -> object:
    global _state
    pid = os.getpid()
    if _state is None or _state[0] != pid:
        cipher = Cipher(algorithms.AES(os.urandom(32)), modes.CTR(os.urandom(16)))
        _state = (pid, cipher.encryptor())
    return _state[1]


def random_bytes(count: int) -> bytes:
    """``count`` bytes from this process's keystream."""
    parts = []
    with _lock:
        encryptor = _encryptor()
        while count > 0:
            take = min(count, len(_zeros))
            parts.append(encryptor.update(_zeros[:take]))  # type: ignore[attr-defined]
            count -= take
    return parts[0] if len(parts) == 1 else b"".join(parts)


def random_words(shape: tuple[int, ...] | int) -> np.ndarray:
    """uint64 array of independent uniform 64-bit words."""
    dims = (shape,) if isinstance(shape, int) else shape
    count = int(np.prod(dims)) if dims else 1
    return np.frombuffer(random_bytes(8 * count), dtype=np.uint64).reshape(dims)
