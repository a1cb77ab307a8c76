"""Encrypted, authenticated links between the parties of one session.

Every pair of parties agrees on keys when the session starts, and every message between them is
sealed with AES-256-GCM (the ``cryptography`` package):

* **Session key.** All parties of a session share a 32-byte secret. :class:`PartyGroup` makes a
  fresh one for parties it starts on this machine; parties on several machines are given the same
  one out of band (``HF_SECURE_SESSION_KEY``, 64 hex digits; ``hf-secure session-key`` prints one).
  It pins the session: whoever lacks it cannot take part, nor sit in the middle.
* **Handshake.** Each pair ``i < j`` exchanges ephemeral X25519 public keys, each with an
  HMAC-SHA256 tag under the session key over the session id, both ranks and the public key. A tag
  that does not verify ends the session (PartyFailedError). The pair's two traffic keys (one per
  direction) are HKDF-SHA256 of the X25519 shared secret, salted with the session key: forward
  secrecy for the traffic, authentication from the session key.
* **Messages.** Each direction counts its messages; message ``n`` is sealed with nonce ``n``. A
  receiver opens the next message with the next nonce it expects, so a tampered, replayed,
  reordered or foreign message fails authentication: PartyFailedError, never data.

What an eavesdropper on the links sees: message sizes and timing (shapes are public anyway, see
docs/threat-model.md). The dealer's seeds and corrections, shares and masked openings are sealed.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re

import torch
import torch.distributed as dist
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import PartyFailedError, UnknownOptionError

SESSION_KEY_ENV = "HF_SECURE_SESSION_KEY"
TAG_BYTES = 16
_PUBLIC_BYTES = 32


def session_key_from_env(environ=os.environ) -> bytes:
    """The session key shared by parties on several machines; UnknownOptionError if unset or malformed."""
    text = environ.get(SESSION_KEY_ENV, "").strip()
    if not re.fullmatch(r"[0-9a-fA-F]{64}", text):
        raise UnknownOptionError(
            f"parties on several machines share a session key: set {SESSION_KEY_ENV} to the same 64 hex digits "
            "on every party and on the client (`hf-secure session-key` prints a fresh one)")
    return bytes.fromhex(text)


class Link:
    """One direction pair of sealed traffic with one peer (AES-256-GCM, counter nonces)."""

    def __init__(self, send_key: bytes, receive_key: bytes, peer: int):
        self._send, self._receive = AESGCM(send_key), AESGCM(receive_key)
        self._sent = self._received = 0
        self.peer = peer

    @staticmethod
    def _nonce(counter: int) -> bytes:
        return counter.to_bytes(12, "big")

    def seal(self, data) -> bytes:
        """Encrypt and authenticate the next outgoing message (``len(data) + 16`` bytes)."""
        sealed = self._send.encrypt(self._nonce(self._sent), data, None)
        self._sent += 1
        return sealed

    def open(self, sealed) -> bytes:
        """Authenticate and decrypt the next incoming message; PartyFailedError if it does not verify."""
        try:
            data = self._receive.decrypt(self._nonce(self._received), sealed, None)
        except InvalidTag:
            raise PartyFailedError(f"a message from party {self.peer} failed authentication (tampered, replayed, "
                                   "out of order, or from outside this session)") from None
        self._received += 1
        return data


def _transcript(session: int, low: int, high: int, sender: int, public: bytes) -> bytes:
    return b"hf_secure handshake" + b"".join(v.to_bytes(8, "big") for v in (session, low, high, sender)) + public


def handshake(rank: int, world_size: int, session: int, session_key: bytes, group=None) -> dict[int, Link]:
    """Agree on a :class:`Link` with every other party (pairs in a fixed order: no deadlock)."""
    links = {}
    for low in range(world_size):
        for high in range(low + 1, world_size):
            if rank not in (low, high):
                continue
            peer = high if rank == low else low
            private = X25519PrivateKey.generate()
            public = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            tag = hmac.new(session_key, _transcript(session, low, high, rank, public), hashlib.sha256).digest()
            outgoing = torch.frombuffer(bytearray(public + tag), dtype=torch.uint8)
            incoming = torch.empty_like(outgoing)
            try:
                request = dist.isend(outgoing, peer, group)
                dist.recv(incoming, peer, group)
                request.wait()
            except RuntimeError as exc:
                raise PartyFailedError(f"party {rank}: handshake with party {peer} failed ({exc})") from exc
            received = incoming.numpy().tobytes()
            their_public, their_tag = received[:_PUBLIC_BYTES], received[_PUBLIC_BYTES:]
            expected = hmac.new(session_key, _transcript(session, low, high, peer, their_public), hashlib.sha256).digest()
            if not hmac.compare_digest(their_tag, expected):
                raise PartyFailedError(f"party {rank}: party {peer} does not hold this session's key (handshake tag "
                                       "does not verify): refusing to talk to it")
            shared = private.exchange(X25519PublicKey.from_public_bytes(their_public))
            keys = HKDF(hashes.SHA256(), 64, salt=session_key,
                        info=b"hf_secure traffic" + b"".join(v.to_bytes(8, "big") for v in (session, low, high))
                        ).derive(shared)
            low_to_high, high_to_low = keys[:32], keys[32:]
            links[peer] = Link(*((low_to_high, high_to_low) if rank == low else (high_to_low, low_to_high)), peer)
    return links
