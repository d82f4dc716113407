"""Shared pieces of the end-to-end tests: query helpers and the stated tolerances."""

from __future__ import annotations

import concurrent.futures
from dataclasses import dataclass
from typing import Any

# Per-token logprob tolerance between the encrypted path and vLLM's plaintext LoRA (float32).
# Sources of difference: CKKS error after noise flooding (the HE delta is within ~1e-6
# absolute of U·B'^T, docs/he-scheme.md), the owner's random mixing A' = R·A, B' = s·B·R^-1
# (same product, different float32 rounding), and vLLM's plaintext path computing in float32
# with different summation order. Greedy tokens must be IDENTICAL; logprobs within this bound.
LOGPROB_TOL = 2e-3
# transformers + peft runs a different attention and matmul implementation: same bound.
REFERENCE_LOGPROB_TOL = 2e-3

PROMPTS = ("Once upon a time", "The secret of the garden", "What is the secret word?")
MAX_TOKENS = 10


@dataclass(frozen=True)
class Completion:
    model: str
    prompt: str
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    text: str


def complete(client: Any, model: str, prompt: str, max_tokens: int = MAX_TOKENS) -> Completion:
    reply = client.completions.create(
        model=model,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0,
        logprobs=1,
        extra_body={"return_token_ids": True, "ignore_eos": True},
    )
    choice = reply.choices[0]
    return Completion(
        model=model,
        prompt=prompt,
        token_ids=tuple(choice.token_ids),
        logprobs=tuple(choice.logprobs.token_logprobs),
        text=choice.text,
    )


def complete_all(
    client: Any, jobs: list[tuple[str, str]], *, at_once: bool
) -> dict[tuple[str, str], Completion]:
    """Each (model, prompt) once: one at a time, or all at once so that batches mix."""
    if not at_once:
        return {(m, p): complete(client, m, p) for m, p in jobs}
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        futures = {job: pool.submit(complete, client, *job) for job in jobs}
        return {job: future.result(timeout=600) for job, future in futures.items()}


def assert_same_completion(got: Completion, want: Completion, tol: float) -> None:
    assert got.token_ids == want.token_ids, (
        f"{got.model} vs {want.model} on {got.prompt!r}: tokens differ\n"
        f"  {got.token_ids} {got.text!r}\n  {want.token_ids} {want.text!r}"
    )
    worst = max(abs(a - b) for a, b in zip(got.logprobs, want.logprobs, strict=True))
    assert worst <= tol, f"{got.model} vs {want.model} on {got.prompt!r}: logprob diff {worst}"


class OpenWatch:
    """Reports every open or read of some paths, by any process (Linux inotify).

    The hostile-input tests use it to show that a refused path outside the adapter folder was
    never opened: a stat is not reported (and not a read); an open, a read or a directory
    listing is.
    """

    IN_ACCESS = 0x00000001
    IN_OPEN = 0x00000020

    def __init__(self, *paths: Any) -> None:
        import ctypes
        import os

        self._os = os
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self._fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        self.watched: dict[int, str] = {}
        for path in paths:
            wd = self._libc.inotify_add_watch(
                self._fd, os.fsencode(str(path)), self.IN_OPEN | self.IN_ACCESS
            )
            if wd < 0:
                raise OSError(ctypes.get_errno(), f"inotify_add_watch {path} failed")
            self.watched[wd] = str(path)

    def events(self) -> list[str]:
        """Paths opened or read since the last call."""
        import struct

        seen = []
        while True:
            try:
                data = self._os.read(self._fd, 65536)
            except BlockingIOError:
                return seen
            offset = 0
            while offset < len(data):
                wd, _mask, _cookie, size = struct.unpack_from("iIII", data, offset)
                name = data[offset + 16 : offset + 16 + size].rstrip(b"\0").decode()
                seen.append(self.watched.get(wd, "?") + (f"/{name}" if name else ""))
                offset += 16 + size

    def close(self) -> None:
        self._os.close(self._fd)
