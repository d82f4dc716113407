"""Scoped bearer tokens of the key holder.

Token file, one token per line, fields separated by spaces; ``#`` starts a comment line::

    # token                                                           role     options
    3f9c...e1  decrypt  host=gpu-1 adapters=sql-*,billing
    a71d...04  admin    host=owner-laptop

* ``decrypt`` tokens may call ``POST /v1/decrypt`` and ``POST /v1/check``, for the adapters
  matching ``adapters=`` (globs; default: every adapter of the policy). Give each host its own.
* ``admin`` tokens may read status and revoke or un-revoke adapters; they cannot decrypt.
* ``host=`` is a label for the audit log. A line with only a token is a decrypt token for
  every adapter.

Tokens are compared as SHA-256 digests in constant time against every known token. Logs and
the audit trail name a token by its fingerprint (the first 12 hex digits of its SHA-256),
never by the token.

A host's token file (``--tensafe-key-holder-token-file``, an admin's ``--token-file``) holds
one bare token, read by ``read_token_file`` under the same line rules.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from vllm_tensafe.errors import ConfigError
from vllm_tensafe.tssp.manifest import is_adapter_name, is_name_pattern, name_matches

log = logging.getLogger("vllm_tensafe.key_holder")

ROLES = ("decrypt", "admin")
MIN_TOKEN_LENGTH = 16
_LABEL_OK = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-@:")


def token_fingerprint(token: str) -> str:
    """Identifies a token in logs and the audit log without revealing it."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()[:12]


@dataclass(frozen=True)
class Token:
    """A known token's scope (the token itself is kept only as its digest)."""

    digest: bytes
    fingerprint: str
    role: str
    host: str = "-"
    adapters: tuple[str, ...] | None = None  # glob patterns; None: every adapter

    def may_decrypt(self, adapter: str) -> bool:
        if self.role != "decrypt":
            return False
        return self.adapters is None or any(name_matches(adapter, p) for p in self.adapters)

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    @property
    def caller(self) -> str:
        return f"token={self.fingerprint} host={self.host} role={self.role}"


class TokenStore:
    def __init__(self, tokens: Iterable[Token]) -> None:
        self._tokens = list(tokens)
        if not self._tokens:
            raise ConfigError("the key holder has no token", "add one token per line")
        digests = [t.digest for t in self._tokens]
        if len(set(digests)) != len(digests):
            raise ConfigError(
                "the same token is listed twice in the token file",
                "give each host and each admin its own token",
            )

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> TokenStore:
        p = Path(path)
        lines = token_file_lines(
            p,
            "token file",
            "pass --token-file with one token per line (vllm-tensafe key-holder token makes them)",
        )
        tokens = [parse_token_line(line, f"token file {p}, line {n}") for n, line in lines]
        if not tokens:
            raise ConfigError(f"token file {str(p)!r} holds no token", "add one token per line")
        return cls(tokens)

    @classmethod
    def from_secrets(
        cls,
        decrypt: Iterable[str] = (),
        admin: Iterable[str] = (),
        *,
        adapters: tuple[str, ...] | None = None,
    ) -> TokenStore:
        """In-process use (tests, benchmarks): plain token strings by role."""
        made = [make_token(t, "decrypt", adapters=adapters) for t in decrypt]
        made += [make_token(t, "admin") for t in admin]
        return cls(made)

    def authenticate(self, header: str | None) -> Token | None:
        """The token presented as ``Authorization: Bearer ...``, or None."""
        if not header or not header.startswith("Bearer "):
            return None
        digest = hashlib.sha256(header[len("Bearer ") :].strip().encode("utf-8")).digest()
        found = None
        for token in self._tokens:
            # Compare against every token: timing does not reveal which one (or whether) matched.
            if hmac.compare_digest(digest, token.digest):
                found = token
        return found

    def __len__(self) -> int:
        return len(self._tokens)

    @property
    def tokens(self) -> list[Token]:
        return list(self._tokens)


def token_file_lines(path: Path, what: str, fix: str) -> list[tuple[int, str]]:
    """The numbered token lines of a token file: blank lines and ``#`` comments skipped."""
    try:
        text = path.read_text(encoding="utf-8")
        mode = path.stat().st_mode
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise ConfigError(f"{what} {str(path)!r} cannot be read: {reason}", fix) from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("%s %s is accessible to group/others; chmod 600 it", what, path)
    out = []
    # Split on "\n" only: str.splitlines() also splits at U+2028 and other separators.
    for number, raw in enumerate(text.split("\n"), 1):
        line = raw.strip(" \t\r")
        if line and not line.startswith("#"):
            out.append((number, line))
    return out


def read_token_file(path: str | os.PathLike[str]) -> str:
    """The one bearer token of a host's (or an admin's) token file."""
    p = Path(path)
    lines = token_file_lines(
        p,
        "key holder token file",
        "set TENSAFE_KEY_HOLDER_TOKEN_FILE to a readable file holding the token",
    )
    if len(lines) != 1:
        raise ConfigError(
            f"key holder token file {str(p)!r} holds {len(lines)} tokens, expected 1",
            "put exactly one bearer token in the file",
        )
    return lines[0][1]


def make_token(
    secret: str, role: str, *, host: str = "-", adapters: tuple[str, ...] | None = None
) -> Token:
    if not secret or any(ch.isspace() for ch in secret) or len(secret) < MIN_TOKEN_LENGTH:
        raise ConfigError(
            f"a token must be at least {MIN_TOKEN_LENGTH} characters without spaces",
            "use long random tokens: vllm-tensafe key-holder token makes them",
        )
    if role not in ROLES:
        raise ConfigError(f"unknown token role {role!r}", "use decrypt or admin")
    return Token(
        digest=hashlib.sha256(secret.encode("utf-8")).digest(),
        fingerprint=token_fingerprint(secret),
        role=role,
        host=host,
        adapters=adapters,
    )


def parse_token_line(line: str, where: str) -> Token:
    fields = line.split()
    secret, role, options = fields[0], "decrypt", fields[1:]
    if options and "=" not in options[0]:
        role, options = options[0], options[1:]
    if role not in ROLES:
        raise ConfigError(f"{where}: unknown role {role!r}", "use decrypt or admin")
    host, adapters = "-", None
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or not value:
            raise ConfigError(f"{where}: option {option!r} is not KEY=VALUE", "use host=NAME")
        if key == "host":
            if not set(value) <= _LABEL_OK or len(value) > 128:
                raise ConfigError(
                    f"{where}: host label {value!r} is not allowed", "use A-Z 0-9 .-_"
                )
            host = value
        elif key == "adapters":
            if role != "decrypt":
                raise ConfigError(f"{where}: adapters= applies to decrypt tokens only", "drop it")
            patterns = tuple(value.split(","))
            bad = [p for p in patterns if not is_name_pattern(p)]
            if bad:
                raise ConfigError(
                    f"{where}: adapter pattern {bad[0]!r} is not allowed",
                    "use adapter names or globs like sql-*",
                )
            adapters = patterns
        else:
            raise ConfigError(f"{where}: unknown option {key!r}", "use host= or adapters=")
    try:
        return make_token(secret, role, host=host, adapters=adapters)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc.cause}", exc.fix) from None


def new_token() -> str:
    return secrets.token_hex(32)


def token_line(secret: str, role: str, host: str, adapters: tuple[str, ...] | None) -> str:
    parts = [secret, role]
    if host != "-":
        parts.append(f"host={host}")
    if adapters:
        parts.append("adapters=" + ",".join(adapters))
    return " ".join(parts)


def check_adapter_patterns(patterns: Iterable[str]) -> tuple[str, ...]:
    out = tuple(patterns)
    for p in out:
        if not is_name_pattern(p) and not is_adapter_name(p):
            raise ConfigError(f"adapter pattern {p!r} is not allowed", "use names or globs")
    return out
