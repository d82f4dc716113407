"""Coverage-guided fuzzing of the TSSP opener with atheris (libFuzzer).

    python tests/tssp/fuzz_opener.py --package P.tssp --signing-key K --trusted-pub PUB \
        --seconds 30 --workdir DIR

Run by tests/tssp/test_atheris.py (bounded time, in CI) and by hand for longer runs. The
property: whatever the bytes, ``open_package`` either opens the package or raises a
``TsspError``; any other exception, a crash of a C extension, a hang past ``-timeout`` or
memory past ``-rss_limit_mb`` is a finding (libFuzzer writes the input to ``DIR/crash-*``).

The first input byte picks where the rest goes, so that mutations also reach the parsers that
sit behind the signature and the digests:

0. the whole file;
1. the manifest, signed by the trusted key (manifest validation);
2-4. the first bytes of a member (he_context, lora_a.safetensors, lora_b.he), the rest of the
   member kept, digests fixed and re-signed (TenSEAL, safetensors and ciphertext-index parsers).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["vllm_tensafe"]):
    import vllm_tensafe.he  # noqa: F401  (imported lazily by the opener: instrument it too)
    from vllm_tensafe.errors import TsspError
    from vllm_tensafe.tssp import TrustStore, open_package

from tests.tssp.helpers import resign, split

MEMBERS = ("he_context", "lora_a.safetensors", "lora_b.he")
HEAD = 512  # fuzzed prefix of a member: headers and indexes live there


class Target:
    def __init__(self, package: Path, signing_key: Path, trusted_pub: Path, scratch: Path) -> None:
        from vllm_tensafe.tssp.signing import load_signing_key

        self.original = package.read_bytes()
        self.parts = split(self.original)
        self.key = load_signing_key(signing_key)
        self.trust = TrustStore.from_files([trusted_pub])
        self.path = scratch / "input.tssp"

    def seeds(self) -> list[bytes]:
        out = [b"\x00" + self.original[:4096], b"\x01" + self.parts["manifest.json"]]
        out += [bytes([2 + i]) + self.parts[name][:HEAD] for i, name in enumerate(MEMBERS)]
        return out

    def file_for(self, data: bytes) -> bytes:
        if not data:
            return b""
        mode, body = data[0] % 5, data[1:]
        if mode == 0:
            return body
        if mode == 1:
            return resign(self.original, self.key, raw_manifest=body)
        member = MEMBERS[mode - 2]
        return resign(self.original, self.key, members={member: body + self.parts[member][HEAD:]})

    def __call__(self, data: bytes) -> None:
        self.path.write_bytes(self.file_for(data))
        try:
            open_package(self.path, trust=self.trust)
        except TsspError:
            pass  # refused with a typed error: the property holds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--package", type=Path, required=True)
    parser.add_argument("--signing-key", type=Path, required=True)
    parser.add_argument("--trusted-pub", type=Path, required=True)
    parser.add_argument("--seconds", type=int, default=30)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    corpus = args.workdir / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    scratch = Path(tempfile.mkdtemp(prefix="tssp-fuzz-", dir=shm))
    target = Target(args.package, args.signing_key, args.trusted_pub, scratch)
    for i, seed in enumerate(target.seeds()):
        (corpus / f"seed-{i}").write_bytes(seed)
    libfuzzer = [
        sys.argv[0],
        f"-max_total_time={args.seconds}",
        f"-seed={args.seed}",
        "-timeout=120",  # seconds per input: generous, a busy machine must not hit it
        "-rss_limit_mb=6144",
        "-max_len=16384",  # the manifest and every fuzzed member head fit
        f"-artifact_prefix={args.workdir}/",
        "-print_final_stats=1",
        str(corpus),
    ]
    atheris.Setup(libfuzzer, target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
