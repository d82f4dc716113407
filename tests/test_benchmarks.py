"""The benchmarks still start: each one's --help, and the way he_bench starts its key holder.

The benchmarks are not run in CI (they measure, they do not assert); this only catches a
benchmark that no longer imports or parses its arguments after the package moved things.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = sorted((ROOT / "benchmarks").glob("*.py"))


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize("script", BENCHMARKS, ids=lambda p: p.name)
def test_benchmark_help(script: Path) -> None:
    proc = _run([str(script), "--help"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" in proc.stdout


def test_he_bench_key_holder_command_exists() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import he_bench
    finally:
        sys.path.pop(0)
    proc = _run(["-c", he_bench.SERVE, "key-holder", "serve", "--help"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--he-secret" in proc.stdout


def test_serve_bench_sends_every_request_its_own_prompt(monkeypatch: pytest.MonkeyPatch) -> None:
    """With one prompt for every request, vLLM's prefix cache serves every prefill after the
    first and TTFT times the cache: each timed request must carry its own token ids."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import serve_bench
    finally:
        sys.path.pop(0)
    sent: list[list[int]] = []

    def fake_request(client: object, model: str, max_tokens: int, prompt: list[int]) -> dict:
        sent.append(list(prompt))
        return {"ttft": 0.01, "itl": [0.001], "tokens": max_tokens, "elapsed": 0.02}

    monkeypatch.setattr(serve_bench, "one_request", fake_request)
    prompt = serve_bench.token_prompt(64)
    level = serve_bench.run_load(None, "m", concurrency=4, requests=12, max_tokens=8, prompt=prompt)
    assert level["requests"] == 12 and level["prompt_tokens"] == 64
    warm_up, timed = sent[0], sent[1:]
    assert warm_up == prompt
    assert all(len(p) == 64 for p in timed)
    assert len({tuple(p) for p in timed} | {tuple(prompt)}) == 13


def test_key_holder_bench_runs_one_small_point() -> None:
    """One batch of two ciphertexts, one repeat: the whole path (in-process key holder, stages,
    `key-holder serve` over loopback) still runs and reports every field."""
    import json

    proc = _run(
        [str(ROOT / "benchmarks" / "key_holder_bench.py"), "--batches", "2", "--workers",
         "1,default", "--repeats", "1"]
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    (point,) = json.loads(proc.stdout)["points"]
    assert point["ciphertexts"] == 2
    assert set(point["local_ms_by_workers"]) == {"1", "default"}
    assert point["remote_exchange_ms"] > 0
    assert set(point["stages_ms_one_thread"]) == {
        "parse", "decrypt", "inverse_ntt", "flood", "switch"
    }  # fmt: skip


def test_he_bench_per_ciphertext_runs() -> None:
    """he_bench's per-ciphertext costs (v1 against v2) run against the package as it is: it
    reaches into the ring and key-holder pieces, which move."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import he_bench
    finally:
        sys.path.pop(0)
    from vllm_tensafe.he import generate_keys

    secret, ctx = generate_keys("default")
    report = he_bench.per_ciphertext(ctx, secret, 1)
    assert report["v2_total_ms"] > 0 and report["v1_total_ms"] > 0
    assert report["bytes"]["v2_request_ciphertext"] > report["bytes"]["v2_reply"]


def test_serve_bench_folded_variant_adds_only_the_fold_flag(tmp_path: Path) -> None:
    """he-local-folded is he-local with B' decrypted at bind: the same server otherwise."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import serve_bench
    finally:
        sys.path.pop(0)
    options = serve_bench.build_parser().parse_args(["--model", "tiny", "--adapter", "qv8"])
    paths = {"model": tmp_path, "adapter": tmp_path / "a", "package": tmp_path / "p.tssp",
             "keys": tmp_path / "keys" / "owner"}  # fmt: skip
    local = serve_bench.server_for("he-local", paths, 8, None, options).args
    folded = serve_bench.server_for("he-local-folded", paths, 8, None, options).args
    assert "--tensafe-he-fold-secret" not in local
    assert [a for a in folded if a != "--tensafe-he-fold-secret"] == local
