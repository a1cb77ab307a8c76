"""Who may call ``hf-secure serve``: bearer tokens.

The operator gives ``serve`` its tokens in a file (``--token-file``) or in the environment
variable ``HF_SECURE_SERVER_TOKENS``. Each entry is ``NAME:TOKEN`` or a bare ``TOKEN``; in the
file one entry per line (``#`` starts a comment), in the variable entries separated by commas or
newlines. A token is at least 16 characters of ``[A-Za-z0-9._~+/=-]`` (what
``secrets.token_urlsafe(32)`` prints is fine); a bare token is named ``token-`` plus the first 8 hex
digits of its SHA-256. The name, never the token, is what sessions, quotas and messages refer to.

A client sends ``Authorization: Bearer TOKEN`` (``server_token=`` or ``HF_SECURE_TOKEN``).
Presented tokens are compared with every configured one through their SHA-256 digests with
:func:`hmac.compare_digest`, so the time taken depends neither on where a guess first differs nor on
which token matched. Without any token configured the server is open: every request comes from the
one caller ``anonymous`` and shares its quotas; ``serve`` allows that only on a loopback address or
with ``--no-auth``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass

from ..errors import UnknownOptionError
from ..keys import read_private_text
from .runtime import ANONYMOUS

SERVER_TOKENS_ENV = "HF_SECURE_SERVER_TOKENS"
MIN_TOKEN_CHARS = 16
_TOKEN = re.compile(r"[A-Za-z0-9._~+/=-]+")
_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


def _is_token(text: str) -> bool:
    return len(text) >= MIN_TOKEN_CHARS and _TOKEN.fullmatch(text) is not None


def _add_caller(callers: list[tuple[str, bytes]], name: str, digest: bytes, repeated: str) -> None:
    """Append ``(name, digest)``; UnknownOptionError(``repeated``) if either is listed already."""
    if any(name == n or digest == d for n, d in callers):
        raise UnknownOptionError(repeated)
    callers.append((name, digest))


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


@dataclass(frozen=True)
class AccessPolicy:
    """The callers a server accepts: ``(name, SHA-256 of token)`` pairs, or nobody checked (open)."""

    callers: tuple[tuple[str, bytes], ...] = ()

    @property
    def open(self) -> bool:
        return not self.callers

    @classmethod
    def from_entries(cls, entries: Iterable[str], source: str = "the token list") -> AccessPolicy:
        """Parse ``NAME:TOKEN`` / ``TOKEN`` entries. Raises UnknownOptionError, naming the entry's
        position (never the token), for a malformed, short or repeated token or name."""
        callers: list[tuple[str, bytes]] = []
        for number, entry in enumerate(entries, 1):
            name, _, token = entry.rpartition(":")
            where = f"entry {number} of {source}"
            if not _is_token(token):
                raise UnknownOptionError(f"{where}: a token is at least {MIN_TOKEN_CHARS} characters of "
                                         "[A-Za-z0-9._~+/=-]; make one with `python -c \"import secrets; "
                                         "print(secrets.token_urlsafe(32))\"`")
            digest = _digest(token)
            name = name or f"token-{digest.hex()[:8]}"
            if not _NAME.fullmatch(name) or name == ANONYMOUS:
                raise UnknownOptionError(f"{where}: a name is 1-64 characters of [A-Za-z0-9._-], not {ANONYMOUS!r}")
            _add_caller(callers, name, digest, f"{where}: its name or token is already listed")
        return cls(tuple(callers))

    @classmethod
    def load(cls, token_file: str | os.PathLike | None = None, environ=os.environ) -> AccessPolicy:
        """Tokens from ``token_file`` and from ``HF_SECURE_SERVER_TOKENS``; open when neither has any.

        Raises UnknownOptionError for a missing, empty or non-UTF-8 file, a file other users may
        read, a variable that is set but lists nothing, a malformed entry, or a name or token
        listed twice (within or across the two sources).
        """
        sources: list[AccessPolicy] = []
        if token_file is not None:
            text = read_private_text(token_file, "token file")
            lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
            entries = [line for line in lines if line]
            if not entries:
                raise UnknownOptionError(f"token file {token_file} lists no token")
            sources.append(cls.from_entries(entries, str(token_file)))
        variable = environ.get(SERVER_TOKENS_ENV)
        if variable is not None:
            entries = [e.strip() for e in re.split(r"[,\n]", variable) if e.strip()]
            if not entries:
                raise UnknownOptionError(f"{SERVER_TOKENS_ENV} is set but lists no token: unset it to serve without tokens")
            sources.append(cls.from_entries(entries, SERVER_TOKENS_ENV))
        merged: list[tuple[str, bytes]] = []
        for name, digest in (caller for policy in sources for caller in policy.callers):
            _add_caller(merged, name, digest,
                        f"{name!r}: its name or token is listed both in {token_file} and in {SERVER_TOKENS_ENV}")
        return cls(tuple(merged))

    def identify(self, presented: str | None) -> str | None:
        """The caller's name for a presented token, ``anonymous`` on an open server, else None."""
        if self.open:
            return ANONYMOUS
        if presented is None:
            return None
        digest, found = _digest(presented), None
        for name, expected in self.callers:  # every entry, matched or not: constant time
            if hmac.compare_digest(digest, expected):
                found = name
        return found


def check_client_token(token: str) -> str:
    """A client's token with surrounding whitespace (a file's newline) removed; UnknownOptionError,
    without the token, when what is left cannot be a token."""
    token = token.strip()
    if not _is_token(token):
        raise UnknownOptionError(f"server_token (or HF_SECURE_TOKEN) is not a token: at least {MIN_TOKEN_CHARS} "
                                 "characters of [A-Za-z0-9._~+/=-] are expected")
    return token
