"""Canonical JSON and the closed manifest schema."""

from __future__ import annotations

import pytest

from vllm_tensafe.errors import MalformedPackageError
from vllm_tensafe.tssp.manifest import canonical_json, parse_canonical_json

from .helpers import canonical


def test_canonical_form_matches_spec() -> None:
    obj = {"b": [1, 2.5, "é"], "a": {"z": True, "y": None}}
    assert (
        canonical_json(obj)
        == canonical(obj)
        == '{"a":{"y":null,"z":true},"b":[1,2.5,"é"]}'.encode()
    )
    assert parse_canonical_json(canonical_json(obj)) == obj


@pytest.mark.parametrize(
    "data",
    [
        b'{"a": 1}',  # whitespace
        b'{"b":1,"a":2}',  # unsorted
        b'{"a":1,"a":1}',  # duplicate key
        b'{"a":NaN}',
        b'{"a":Infinity}',
        b'{"a":1.0e0}',  # alternate number spelling
        b'{"a":"\\u00e9"}',  # escaped where canonical is raw UTF-8
        b"[1]",
        b"\xff\xfe{}",
        b"{" * 100_000,
        b"[" * 100_000 + b"]" * 100_000,
        b"",
    ],
)
def test_non_canonical_refused(data: bytes) -> None:
    with pytest.raises(MalformedPackageError):
        parse_canonical_json(data)
