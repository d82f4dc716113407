"""``vllm-tensafe key-holder serve | cert | token | revoke | unrevoke | status | audit verify``.

The service itself is vllm_tensafe/keyholder/server/; its client, vllm_tensafe/keyholder/remote.py.

Heavy imports (TenSEAL, FastAPI, uvicorn, cryptography's x509) happen inside the handlers, so
``--help`` stays instant. Handlers return an exit code; refusals are TenSafeError, printed by
cli.main as one ``vllm-tensafe: error: ...`` line.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from vllm_tensafe.cli.common import TRUSTED_KEYS_ENV, passphrase_from_env, trust_store_from_args
from vllm_tensafe.errors import ConfigError
from vllm_tensafe.files import refuse_overwrite

log = logging.getLogger("vllm_tensafe.key_holder")

URL_ENV = "TENSAFE_KEY_HOLDER_URL"
CA_ENV = "TENSAFE_KEY_HOLDER_CA"
ADMIN_TOKEN_ENV = "TENSAFE_KEY_HOLDER_ADMIN_TOKEN_FILE"
DOCS = "docs/key-holder.md"


def add_commands(subparsers: Any) -> None:
    group = subparsers.add_parser(
        "key-holder",
        help="run and administer the remote CKKS key holder",
        description="The remote key holder holds the CKKS secret keys and decrypts the hosts' "
        "masked, per-step delta batches, for the adapters it is configured with only. The "
        "host never holds a key; every use of an adapter is authenticated, checked against "
        f"the adapter's package, metered, audited and revocable. See {DOCS}.",
    )
    actions = group.add_subparsers(dest="key_holder_command", metavar="ACTION")
    group.set_defaults(handler=lambda args: (group.print_help(), 2)[1])
    _add_serve(actions)
    _add_cert(actions)
    _add_token(actions)
    _add_admin(actions)
    _add_audit(actions)


# --- serve ---------------------------------------------------------------------------------------


def _add_serve(actions: Any) -> None:
    from vllm_tensafe.keyholder.server.server import DEFAULT_PORT

    serve = actions.add_parser(
        "serve",
        help="serve decryptions over HTTPS until SIGINT/SIGTERM",
        description="Serve POST /v1/decrypt for vLLM hosts (TENSAFE_KEY_HOLDER=remote) and the "
        "admin routes (revoke, unrevoke, status); with --attestation-policy, the TPM "
        "attestation routes, and decryptions only for attested hosts. Runs until SIGINT or "
        "SIGTERM. Every request is recorded in the hash-chained --audit-log before it is "
        "answered.",
    )
    serve.add_argument(
        "--he-secret",
        action="append",
        required=True,
        type=Path,
        metavar="PREFIX.secret",
        help="CKKS secret key file written by `vllm-tensafe keygen he` (keep it mode 600). "
        "Repeat it for each key: one key per adapter.",
    )
    serve.add_argument(
        "--passphrase-env",
        metavar="VAR",
        help="environment variable holding the secret files' passphrase (never on the command "
        "line, where `ps` would show it).",
    )
    serve.add_argument(
        "--adapters",
        required=True,
        type=Path,
        metavar="PATH",
        help="the adapters this key holder decrypts for: a NAME.tssp package, a folder of them "
        "(only their signed manifests are read) or a JSON policy file. Each adapter name is "
        "bound to its CKKS key and the packages it accepts; anything else is refused (403).",
    )
    serve.add_argument(
        "--trusted-keys",
        action="append",
        metavar="PUB[=PATTERN][,...]",
        help="the adapter owners' Ed25519 public keys that sign the --adapters packages; "
        "PUB=PATTERN trusts PUB only for adapter names matching the glob PATTERN. Default: "
        f"${TRUSTED_KEYS_ENV}.",
    )
    serve.add_argument(
        "--token-file",
        required=True,
        type=Path,
        metavar="F",
        help="the accepted bearer tokens, one per line: TOKEN [decrypt|admin] [host=LABEL] "
        "[adapters=PATTERN,...] (`vllm-tensafe key-holder token` adds lines). Requests "
        "without a listed token get 401.",
    )
    serve.add_argument(
        "--audit-log",
        required=True,
        type=Path,
        metavar="F",
        help="append-only, hash-chained JSON-lines audit log (created if missing). It is "
        "verified and replayed at start: budgets used, API revocations and the newest "
        "adapter versions served survive a restart.",
    )
    serve.add_argument(
        "--budget",
        action="append",
        metavar="N|NAME=N",
        help="ciphertexts an adapter (and its key) may have decrypted over the life of the "
        "audit log; N for every adapter, NAME=N for one (repeatable). Default: unlimited. "
        "Exhausted adapters get HTTP 429.",
    )
    serve.add_argument(
        "--revoked-file",
        type=Path,
        metavar="F",
        help="revocation list, one adapter name per line (the package's signed name, which is "
        "the adapter id everywhere), or key:KEYID; re-read when it changes, so a revocation "
        "takes effect on the next request. The revoke and unrevoke routes update it.",
    )
    serve.add_argument(
        "--attestation-policy",
        type=Path,
        metavar="F",
        help="TOML or JSON attestation policy (docs/attestation.md): every decryption then "
        "needs a TPM 2.0 quote of the host, made over the policy's PCRs with this key "
        "holder's nonce and checked against the host's enrolled AK and PCR values; hosts "
        "attest at POST /v1/attestation/nonce and /quote (vLLM hosts with "
        "--tensafe-require-attestation do it themselves), refusals are 403 and audited. "
        "Re-read when it changes. Serve TLS too, so sessions bind to the host's connection.",
    )
    serve.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1). Any other address needs --tls-cert.",
    )
    serve.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help=f"TCP port (default {DEFAULT_PORT}; 0 picks a free port and prints it).",
    )
    serve.add_argument(
        "--tls-cert",
        type=Path,
        metavar="F",
        help="PEM certificate (chain) to serve HTTPS with; its subjectAltName must list the "
        "names hosts use (`vllm-tensafe key-holder cert` makes one).",
    )
    serve.add_argument("--tls-key", type=Path, metavar="F", help="PEM private key of --tls-cert.")
    serve.add_argument(
        "--client-ca",
        type=Path,
        metavar="F",
        help="require client certificates signed by this CA (mTLS); hosts then set "
        "--tensafe-key-holder-client-cert/-key.",
    )
    serve.add_argument(
        "--max-request-mb",
        type=int,
        default=64,
        metavar="N",
        help="largest decrypt request in MiB (default 64; hosts split larger batches).",
    )
    serve.add_argument(
        "--max-inflight",
        type=int,
        default=4,
        metavar="N",
        help="requests read or decrypted at once (default 4); more wait, then get 503 busy.",
    )
    serve.set_defaults(handler=_serve)


def _budgets(values: list[str] | None) -> tuple[int | None, dict[str, int]]:
    from vllm_tensafe.tssp.manifest import is_adapter_name

    default: int | None = None
    named: dict[str, int] = {}
    for value in values or []:
        name, sep, number = value.rpartition("=")
        try:
            budget = int(number)
        except ValueError:
            budget = -1
        if budget < 0 or (sep and not is_adapter_name(name)):
            raise ConfigError(
                f"--budget {value!r} is not N or NAME=N with N >= 0",
                "pass e.g. --budget 100000 or --budget sql-adapter=5000",
            )
        if sep:
            named[name] = budget
        else:
            default = budget
    return default, named


def build_service(args: argparse.Namespace) -> Any:
    from vllm_tensafe.he.keys import SecretKeySet
    from vllm_tensafe.keyholder.server.app import Limits
    from vllm_tensafe.keyholder.server.policy import AdapterPolicy
    from vllm_tensafe.keyholder.server.server import KeyHolderService
    from vllm_tensafe.keyholder.server.tls import TLSConfig, is_loopback
    from vllm_tensafe.keyholder.server.tokens import TokenStore

    if (args.tls_cert is None) != (args.tls_key is None):
        raise ConfigError(
            "TLS needs both a certificate and its key", "pass --tls-cert and --tls-key"
        )
    if args.tls_cert is None and not is_loopback(args.host):
        raise ConfigError(
            f"--host {args.host} is not loopback, and the key holder serves only HTTPS beyond "
            "loopback (tokens and masked deltas would cross the network in clear)",
            "make a certificate (vllm-tensafe key-holder cert --out DIR --host NAME) and pass "
            "--tls-cert DIR/server.pem --tls-key DIR/server.key",
        )
    if args.client_ca is not None and args.tls_cert is None:
        raise ConfigError("--client-ca needs TLS", "pass --tls-cert and --tls-key too")
    if args.max_request_mb < 1 or args.max_inflight < 1:
        raise ConfigError("--max-request-mb and --max-inflight must be >= 1", "use the defaults")
    default_budget, named = _budgets(args.budget)
    tokens = TokenStore.from_file(args.token_file)
    policy = AdapterPolicy.load(
        args.adapters, trust_store_from_args(args.trusted_keys, required=False)
    )
    for name, budget in named.items():
        binding = policy.binding(name)
        if binding is None:
            raise ConfigError(
                f"--budget {name}={budget}: {name!r} is not one of the --adapters",
                f"use one of {', '.join(policy.names())}",
            )
        binding.budget = budget
    passphrase = passphrase_from_env(args.passphrase_env)
    secrets = [SecretKeySet.load(path, passphrase) for path in args.he_secret]
    tls = (
        TLSConfig(args.tls_cert, args.tls_key, args.client_ca)
        if args.tls_cert is not None
        else None
    )
    return KeyHolderService(
        secrets,
        policy,
        tokens,
        host=args.host,
        port=args.port,
        audit_log=args.audit_log,
        default_budget=default_budget,
        revoked_file=args.revoked_file,
        tls=tls,
        limits=Limits(
            max_request_bytes=args.max_request_mb << 20,
            max_inflight=args.max_inflight,
        ),
        attestation=args.attestation_policy,
    )


def _setup_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    # Expected network errors (a plain-HTTP probe, a refused client certificate, a dropped
    # connection) are one line each at most, never a traceback.
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)


def _serve(args: argparse.Namespace) -> int:
    _setup_logging()
    service = build_service(args)
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        service.start()
        print(
            f"vllm-tensafe key holder listening on {service.url} (keys "
            f"{', '.join(k[:16] for k in service.key_ids)}; adapters "
            f"{', '.join(service.policy.names())}"
            + (
                f"; TPM attestation required, policy {args.attestation_policy}"
                if service.attestation is not None
                else ""
            )
            + ")",
            file=sys.stderr,
            flush=True,
        )
        while not stop.wait(0.5):
            pass
    finally:
        service.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


# --- cert ----------------------------------------------------------------------------------------


def _add_cert(actions: Any) -> None:
    cert = actions.add_parser(
        "cert",
        help="make a CA, the key holder's TLS certificate (right subjectAltName) and client certs",
        description="Write OUT/ca.pem + ca.key (a small CA: hosts trust ca.pem with "
        "--tensafe-key-holder-ca), OUT/server.pem + server.key (the key holder's certificate, "
        "signed by the CA, whose subjectAltName lists every --host) and, with --client, "
        "OUT/client-NAME.pem + .key for mTLS. An existing CA in OUT is reused.",
    )
    cert.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder")
    cert.add_argument(
        "--host",
        action="append",
        required=True,
        metavar="NAME|IP",
        help="a DNS name or IP address hosts use in TENSAFE_KEY_HOLDER_URL (repeatable); TLS "
        "clients check it against the subjectAltName",
    )
    cert.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    cert.add_argument(
        "--client",
        action="append",
        default=[],
        metavar="NAME",
        help="also make a client certificate for host NAME (mTLS; repeatable)",
    )
    cert.add_argument("--force", action="store_true", help="replace existing certificates")
    cert.set_defaults(handler=_cert)


def _cert(args: argparse.Namespace) -> int:
    from vllm_tensafe.keyholder.server.tls import make_certificates

    paths = make_certificates(
        args.out, args.host, days=args.days, clients=args.client, force=args.force
    )
    print(f"CA:          {paths['ca']} (hosts: --tensafe-key-holder-ca {paths['ca']})")
    print(f"             {paths['ca_key']} (signs certificates; keep it offline)")
    print(
        f"key holder:  --tls-cert {paths['server']} --tls-key {paths['server_key']} "
        f"(subjectAltName: {', '.join(args.host)})"
    )
    for name in args.client:
        print(
            f"host {name}: --tensafe-key-holder-client-cert {paths[f'client:{name}']} "
            f"--tensafe-key-holder-client-key {paths[f'client_key:{name}']}"
        )
    if args.client:
        print(f"             (key holder: --client-ca {paths['ca']})")
    return 0


# --- token ---------------------------------------------------------------------------------------


def _add_token(actions: Any) -> None:
    token = actions.add_parser(
        "token",
        help="make a bearer token: a line for the key holder's token file, the token for a host",
        description="Make a random token, append its line to the key holder's --token-file "
        "(created mode 600) and write the bare token to --out (mode 600), the file a host "
        "passes as --tensafe-key-holder-token-file (or an admin to revoke/status).",
    )
    token.add_argument("--token-file", required=True, type=Path, metavar="F")
    token.add_argument("--out", required=True, type=Path, metavar="F", help="the token alone")
    token.add_argument("--role", choices=("decrypt", "admin"), default="decrypt")
    token.add_argument("--host", default="-", metavar="LABEL", help="audit label (host name)")
    token.add_argument(
        "--adapters",
        metavar="PATTERN[,...]",
        help="decrypt tokens: the adapter names (globs) it may decrypt for (default: all)",
    )
    token.add_argument("--force", action="store_true", help="replace an existing --out")
    token.set_defaults(handler=_token)


def _token(args: argparse.Namespace) -> int:
    from vllm_tensafe.keyholder.server.tokens import (
        new_token,
        parse_token_line,
        token_fingerprint,
        token_line,
    )

    refuse_overwrite([args.out], args.force, "choose another --out, or pass --force")
    adapters = tuple(args.adapters.split(",")) if args.adapters else None
    secret = new_token()
    line = token_line(secret, args.role, args.host, adapters)
    parse_token_line(line, "--host/--adapters")  # refuse what serve would refuse
    fd = os.open(args.token_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a", encoding="utf-8") as fh:
        fh.write(line + "\n")
    fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(secret + "\n")
    print(
        f"{args.role} token {token_fingerprint(secret)} (host {args.host}): added to "
        f"{args.token_file}, token in {args.out}"
    )
    return 0


# --- revoke / unrevoke / status -----------------------------------------------------------


def _add_admin(actions: Any) -> None:
    def common(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--url",
            default=os.environ.get(URL_ENV),
            help=f"the key holder's URL (default ${URL_ENV})",
        )
        parser.add_argument(
            "--token-file",
            type=Path,
            default=os.environ.get(ADMIN_TOKEN_ENV),
            metavar="F",
            help=f"file holding an admin token (default ${ADMIN_TOKEN_ENV})",
        )
        parser.add_argument(
            "--ca",
            default=os.environ.get(CA_ENV),
            metavar="F",
            help=f"CA certificate of the key holder's TLS certificate (default ${CA_ENV})",
        )
        parser.add_argument("--client-cert", metavar="F", help="client certificate (mTLS)")
        parser.add_argument("--client-key", metavar="F", help="its private key")

    for action, text in (
        ("revoke", "refuse every later decryption for ADAPTER (and its key)"),
        ("unrevoke", "lift ADAPTER's revocation"),
    ):
        parser = actions.add_parser(
            action,
            help=f"{text} (admin token)",
            description=f"POST /v1/adapters/ADAPTER/{action} on a running key holder and print "
            "the adapter's state as JSON. ADAPTER is the package's name (the adapter id).",
        )
        parser.add_argument("adapter", metavar="ADAPTER")
        common(parser)
        parser.set_defaults(handler=_admin, admin_action=action)
    status = actions.add_parser(
        "status",
        help="an adapter's (or every adapter's) budget, use, revocation, versions (admin token)",
        description="GET /v1/adapters[/ADAPTER] on a running key holder; prints JSON.",
    )
    status.add_argument("adapter", metavar="ADAPTER", nargs="?")
    common(status)
    status.set_defaults(handler=_admin, admin_action="status")


def _admin(args: argparse.Namespace) -> int:
    from vllm_tensafe.keyholder.remote import RemoteKeyHolder
    from vllm_tensafe.keyholder.server.tokens import read_token_file

    if not args.url:
        raise ConfigError("no key holder URL", f"pass --url or set {URL_ENV}")
    if args.token_file is None:
        raise ConfigError("no admin token", f"pass --token-file or set {ADMIN_TOKEN_ENV}")
    client = RemoteKeyHolder(
        args.url,
        read_token_file(args.token_file),
        ca_file=args.ca,
        client_cert=args.client_cert,
        client_key=args.client_key,
        retries=0,
    )
    try:
        if args.admin_action == "revoke":
            reply = client.revoke(args.adapter)
        elif args.admin_action == "unrevoke":
            reply = client.unrevoke(args.adapter)
        elif args.adapter:
            reply = client.adapter_status(args.adapter)
        else:
            reply = client.adapters()
    finally:
        client.close()
    json.dump(reply, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")
    return 0


# --- audit ---------------------------------------------------------------------------------


def _add_audit(actions: Any) -> None:
    audit = actions.add_parser(
        "audit",
        help="check the audit log's hash chain",
        description="Tools for the key holder's hash-chained audit log.",
    )
    sub = audit.add_subparsers(dest="audit_command", metavar="ACTION")
    audit.set_defaults(handler=lambda args: (audit.print_help(), 2)[1])
    verify = sub.add_parser(
        "verify",
        help="verify every line's hash and its link to the line before (exit 0 if intact)",
        description="Read FILE, check that each line is canonical, numbered in order, chained "
        "to the line before and matches its hash. Prints the line count and the head hash "
        "(keep it elsewhere to also detect lines cut off the end); exit 1 and the first "
        "broken line otherwise.",
    )
    verify.add_argument("file", type=Path, metavar="FILE")
    verify.set_defaults(handler=_audit_verify)


def _audit_verify(args: argparse.Namespace) -> int:
    from vllm_tensafe.keyholder.server.audit import verify_chain

    report = verify_chain(args.file)
    print(f"OK {args.file}: {report.lines} lines, chain intact, head {report.head}")
    return 0
