"""Encrypted, authenticated links between the parties of one session.

Every pair of parties agrees on keys when the session starts, and every message between them can
be sealed with AES-256-GCM (the ``cryptography`` package):

* **Identities.** Each role of a session has an Ed25519 key pair; every party holds its own
  private key and the *roster*, the public keys of all roles. :class:`PartyGroup` makes fresh
  ones for parties it starts on this machine; for parties on several machines the operator runs
  ``hf-secure party-keys --out DIR`` once per session and gives each party (and the client) only
  its own file (``--party-key`` / ``party_key=`` / ``HF_SECURE_PARTY_KEY``). A party therefore
  cannot pose as another role, the client included: it lacks their private keys.
* **Handshake.** Each pair ``i < j`` exchanges ephemeral X25519 public keys, each signed with the
  sender's Ed25519 key over the session id, both ranks, the sender, the key and the roster's
  digest; the receiver checks the signature against the roster. A signature that does not verify
  ends the session (PartyFailedError). The pair's two traffic keys (one per direction) are
  HKDF-SHA256 of the X25519 shared secret, bound to the session, the ranks and the roster:
  forward secrecy for the traffic, authentication from the identities.
* **Messages.** Each direction counts its messages; message ``n`` is sealed with nonce ``n``. A
  receiver opens the next message with the next nonce it expects, so a tampered, replayed,
  reflected, reordered or foreign message fails authentication: PartyFailedError, never data.
  (A message whose *size* is changed in transit is caught by gloo before us, which aborts the
  receiving process: the session stops, not cleanly.)

What an eavesdropper on the links sees: message sizes and timing (shapes are public anyway, see
docs/threat-model.md). The dealer's seeds and corrections, shares and masked openings are sealed.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import PartyFailedError, UnknownOptionError
from ..keys import read_private_text

PARTY_KEY_ENV = "HF_SECURE_PARTY_KEY"
TAG_BYTES = 16
_PUBLIC_BYTES = 32
_RAW = (serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@dataclass(frozen=True)
class PartyIdentity:
    """One role's Ed25519 private key (raw, 32 bytes) and the roster of every role's public key."""

    rank: int
    private: bytes
    roster: tuple[bytes, ...]

    @classmethod
    def generate_all(cls, world_size: int) -> list[PartyIdentity]:
        keys = [Ed25519PrivateKey.generate() for _ in range(world_size)]
        roster = tuple(k.public_key().public_bytes(*_RAW) for k in keys)
        raw = serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        return [cls(rank, key.private_bytes(*raw), roster) for rank, key in enumerate(keys)]

    @property
    def roster_digest(self) -> bytes:
        return hashlib.sha256(b"".join(self.roster)).digest()

    def sign(self, data: bytes) -> bytes:
        return Ed25519PrivateKey.from_private_bytes(self.private).sign(data)

    def verify(self, rank: int, signature: bytes, data: bytes) -> bool:
        try:
            Ed25519PublicKey.from_public_bytes(self.roster[rank]).verify(signature, data)
        except InvalidSignature:
            return False
        return True

    def save(self, path: str | os.PathLike, role_name: str) -> None:
        """Write this role's key file (JSON, mode 0600): its private key and the roster."""
        text = json.dumps({"role": role_name, "rank": self.rank, "private": self.private.hex(),
                           "roster": [p.hex() for p in self.roster]})
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike, rank: int, world_size: int) -> PartyIdentity:
        """Read a key file for ``rank``; UnknownOptionError if it is missing, readable by others,
        malformed, or another role's."""
        text = read_private_text(path, "party key file", "`hf-secure party-keys --out DIR` makes one per role")
        try:
            data = json.loads(text)
            identity = cls(int(data["rank"]), bytes.fromhex(data["private"]),
                           tuple(bytes.fromhex(p) for p in data["roster"]))
            Ed25519PrivateKey.from_private_bytes(identity.private)
        except (ValueError, KeyError, TypeError):
            raise UnknownOptionError(f"party key file {path} is malformed") from None
        if identity.rank != rank:
            raise UnknownOptionError(f"party key file {path} is role {data.get('role')!r}'s, not this party's")
        if len(identity.roster) != world_size or any(len(p) != _PUBLIC_BYTES for p in identity.roster):
            raise UnknownOptionError(f"party key file {path} has a malformed roster")
        return identity


def identity_from_env(rank: int, world_size: int, path: str | os.PathLike | None = None,
                      environ=os.environ) -> PartyIdentity:
    """This party's identity for a session on several machines: ``path``, else ``HF_SECURE_PARTY_KEY``."""
    path = path or environ.get(PARTY_KEY_ENV)
    if not path:
        raise UnknownOptionError(
            f"parties on several machines authenticate each other: give this party its key file "
            f"(--party-key, party_key=, or {PARTY_KEY_ENV}); `hf-secure party-keys --out DIR` makes one per role")
    return PartyIdentity.load(path, rank, world_size)


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


def _transcript(session: int, low: int, high: int, sender: int, public: bytes, roster_digest: bytes) -> bytes:
    return (b"hf_secure handshake" + b"".join(v.to_bytes(8, "big") for v in (session, low, high, sender))
            + public + roster_digest)


def handshake(identity: PartyIdentity, world_size: int, session: int, group=None) -> dict[int, Link]:
    """Agree on a :class:`Link` with every other party (pairs in a fixed order: no deadlock)."""
    rank, links, digest = identity.rank, {}, identity.roster_digest
    for low in range(world_size):
        for high in range(low + 1, world_size):
            if rank not in (low, high):
                continue
            peer = high if rank == low else low
            private = X25519PrivateKey.generate()
            public = private.public_key().public_bytes(*_RAW)
            signature = identity.sign(_transcript(session, low, high, rank, public, digest))
            outgoing = torch.frombuffer(bytearray(public + signature), dtype=torch.uint8)
            incoming = torch.empty_like(outgoing)
            try:
                request = dist.isend(outgoing, peer, group)
                dist.recv(incoming, peer, group)
                request.wait()
            except RuntimeError as exc:
                raise PartyFailedError(f"party {rank}: handshake with party {peer} failed ({exc})") from exc
            received = incoming.numpy().tobytes()
            their_public, their_signature = received[:_PUBLIC_BYTES], received[_PUBLIC_BYTES:]
            if not identity.verify(peer, their_signature, _transcript(session, low, high, peer, their_public, digest)):
                raise PartyFailedError(f"party {rank}: party {peer} is not who this session's roster says (its handshake "
                                       "signature does not verify): refusing to talk to it")
            shared = private.exchange(X25519PublicKey.from_public_bytes(their_public))
            info = b"hf_secure traffic" + b"".join(v.to_bytes(8, "big") for v in (session, low, high)) + digest
            keys = HKDF(hashes.SHA256(), 64, salt=None, info=info).derive(shared)
            low_to_high, high_to_low = keys[:32], keys[32:]
            links[peer] = Link(*((low_to_high, high_to_low) if rank == low else (high_to_low, low_to_high)), peer)
    return links
