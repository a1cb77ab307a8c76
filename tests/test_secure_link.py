"""Sealed links between parties (issue 10): handshake under the session key, AES-GCM messages;
a tampered, replayed or foreign message, or a party without the key, is refused."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from hf_secure.errors import PartyFailedError, UnknownOptionError
from hf_secure.runtime import Channel, Role, run_parties
from hf_secure.runtime.secure_link import handshake, session_key_from_env

KEY = bytes(range(32))


def _sealed(role, channel, key, attack):
    links = handshake(int(role), 2, channel.session, key)
    sealed = Channel(int(role), channel.session, links=links)
    x = torch.arange(6, dtype=torch.int64).view(2, 3) * (int(role) + 1)
    theirs = sealed.exchange(x, 1 - int(role))  # both sides: one sealed exchange
    if role == Role.SERVER1:
        sealed.send(torch.full((5,), 7.0), 0)
        if attack == "tamper":
            forged = bytearray(links[0].seal(b"\0" * 80))
            forged[3] ^= 1
            dist.send(torch.frombuffer(forged, dtype=torch.uint8), 0)
        elif attack == "replay":  # the first message again (sealed under nonce 0), after the counter moved on
            replayed = links[0]._send.encrypt((0).to_bytes(12, "big"), b"\0" * 80, None)
            dist.send(torch.frombuffer(bytearray(replayed), dtype=torch.uint8), 0)
        else:
            sealed.send(torch.ones(2, dtype=torch.int64), 0)
        return theirs.tolist()
    got = sealed.recv(1, dtype=torch.float32)
    last = sealed.recv(1)
    return theirs.tolist(), got.tolist(), last.tolist()


def test_sealed_exchange_send_and_receive():
    results = run_parties(_sealed, {Role.SERVER0: (KEY, "none"), Role.SERVER1: (KEY, "none")}, timeout_s=30)
    theirs, got, last = results[Role.SERVER0]
    assert theirs == [[0, 2, 4], [6, 8, 10]] and results[Role.SERVER1] == [[0, 1, 2], [3, 4, 5]]
    assert got == [7.0] * 5 and last == [1, 1]


@pytest.mark.parametrize("attack", ["tamper", "replay"])
def test_tampered_or_replayed_message_is_refused(attack):
    with pytest.raises(PartyFailedError, match="failed authentication"):
        run_parties(_sealed, {Role.SERVER0: (KEY, attack), Role.SERVER1: (KEY, attack)}, timeout_s=30)


def _handshake_only(role, channel, key):
    handshake(int(role), 2, channel.session, key)
    return "joined"


def test_a_party_without_the_session_key_is_refused():
    wrong = bytes(32)
    with pytest.raises(PartyFailedError, match="does not hold this session's key"):
        run_parties(_handshake_only, {Role.SERVER0: (KEY,), Role.SERVER1: (wrong,)}, timeout_s=30)


def test_session_key_from_the_environment():
    assert session_key_from_env({"HF_SECURE_SESSION_KEY": KEY.hex()}) == KEY
    for bad in ({}, {"HF_SECURE_SESSION_KEY": "abc"}, {"HF_SECURE_SESSION_KEY": "zz" * 32}):
        with pytest.raises(UnknownOptionError, match="HF_SECURE_SESSION_KEY"):
            session_key_from_env(bad)
