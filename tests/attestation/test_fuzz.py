"""Property tests: whatever bytes or JSON a host sends, the key holder answers with a typed
AttestationError (or, for a parser, a well-formed structure) and nothing else.

Three layers: the raw parsers on arbitrary bytes and on mutations of a valid TPMS_ATTEST;
the bundle decoder on arbitrary JSON; and the whole verifier on mutated messages re-signed by
the enrolled (software) AK, so the fuzzed bytes reach the parser behind the signature check.
"""

from __future__ import annotations

import base64
import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vllm_tensafe.attestation import AttestationPolicy, AttestationVerifier, QuoteBundle
from vllm_tensafe.attestation.routes import AttestationRoutes, Caller
from vllm_tensafe.attestation.tpms import marshal_attest, parse_attest, parse_signature
from vllm_tensafe.errors import AttestationError, MalformedQuoteError

from .conftest import FakeClock
from .helpers import SoftAk, attest_for

FUZZ = settings(
    max_examples=300,
    deadline=None,  # no timing assertions on a shared machine
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=True,
)
PCRS = {0: b"\x11" * 32, 4: b"\x44" * 32, 7: b"\x77" * 32}
VALID = marshal_attest(attest_for(b"\x5a" * 32, PCRS))
AK = SoftAk()


def _mutate(data: bytes, ops: list[tuple[int, int, int]]) -> bytes:
    out = bytearray(data)
    for kind, where, value in ops:
        if not out:
            out.append(value)
            continue
        at = where % len(out)
        if kind == 0:
            out[at] ^= value or 1
        elif kind == 1:
            del out[at:]
        elif kind == 2:
            out.insert(at, value)
        else:
            out[at] = value
    return bytes(out)


MUTATIONS = st.lists(
    st.tuples(st.integers(0, 3), st.integers(0, 1 << 16), st.integers(0, 255)),
    min_size=1,
    max_size=6,
)


@FUZZ
@given(st.binary(max_size=512))
def test_parsers_on_arbitrary_bytes(data: bytes) -> None:
    for parse in (parse_attest, parse_signature):
        try:
            parse(data)
        except MalformedQuoteError:
            pass


@FUZZ
@given(MUTATIONS)
def test_attest_parser_on_mutations(ops: list[tuple[int, int, int]]) -> None:
    try:
        parsed = parse_attest(_mutate(VALID, ops))
    except MalformedQuoteError:
        return
    # Whatever parses is a complete structure: marshalled again, it parses to itself.
    assert parse_attest(marshal_attest(parsed)) == parsed


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner),
    max_leaves=12,
)


@FUZZ
@given(
    st.one_of(
        JSON,
        st.binary(max_size=256),
        st.fixed_dictionaries(
            {
                "ak_public": st.text(max_size=40),
                "message": st.text(max_size=40),
                "signature": st.text(max_size=40),
                "pcr_bank": st.text(max_size=8),
                "pcrs": st.dictionaries(st.text(max_size=3), st.text(max_size=8), max_size=3),
            }
        ),
    )
)
def test_bundle_decoder_on_arbitrary_json(data: object) -> None:
    try:
        QuoteBundle.from_json(data)
    except MalformedQuoteError:
        pass


@FUZZ
@given(MUTATIONS, st.booleans())
def test_verifier_on_resigned_mutations(ops: list[tuple[int, int, int]], resign: bool) -> None:
    policy = AttestationPolicy.from_mapping(
        {
            "hosts": {
                "h": {
                    "attestation_keys": [AK.key.pem()],
                    "pcrs": {str(i): v.hex() for i, v in PCRS.items()},
                }
            }
        }
    )
    verifier = AttestationVerifier(policy, clock=FakeClock())
    nonce = verifier.issue_nonce("h").nonce
    good = AK.quote(nonce, PCRS)
    message = _mutate(good.message_bytes, ops)
    signature = AK.sign(message) if resign else _mutate(good.signature_bytes, ops)
    bundle = good.model_copy(
        update={
            "message": base64.b64encode(message).decode(),
            "signature": base64.b64encode(signature).decode(),
        }
    )
    try:
        verifier.verify_and_bind("h", bundle)
    except AttestationError:
        return
    # Accepted only if the mutation left the quote's meaning intact.
    attest = parse_attest(message)
    assert attest.extra_data == nonce and attest.pcr_digest == parse_attest(VALID).pcr_digest


@FUZZ
@given(st.binary(max_size=2048) | JSON.map(lambda v: json.dumps(v).encode()))
def test_quote_route_answers_every_body_with_a_refusal(body: bytes) -> None:
    policy = AttestationPolicy.from_mapping(
        {"hosts": {"h": {"attestation_keys": [AK.key.pem()], "pcrs": {"0": "00" * 32}}}}
    )
    routes = AttestationRoutes(AttestationVerifier(policy, clock=FakeClock()))
    reply = routes.handle("POST", "/v1/attestation/quote", Caller("h"), body)
    assert reply is not None and reply.status in (400, 403)
    assert reply.body["error"].startswith("attestation_") and reply.body["cause"]
