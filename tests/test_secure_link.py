"""Sealed links between parties (issue 10): handshake signed with each role's key, AES-GCM messages;
a tampered, replayed or foreign message, a party posing as another role, or a bad key file is refused."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist

from hf_secure.cli import main
from hf_secure.errors import PartyFailedError, UnknownOptionError
from hf_secure.runtime import Channel, Role, run_parties
from hf_secure.runtime.secure_link import PartyIdentity, handshake, identity_from_env

IDENTITIES = PartyIdentity.generate_all(2)


def _sealed(role, channel, identity, attack):
    links = handshake(identity, 2, channel.session)
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
        elif attack == "reflect":  # server 0's own header, sealed with its own key, sent back to it
            reflected = links[0]._receive.encrypt((2).to_bytes(12, "big"), b"\0" * 80, None)
            dist.send(torch.frombuffer(bytearray(reflected), dtype=torch.uint8), 0)
        else:
            sealed.send(torch.ones(2, dtype=torch.int64), 0)
        return theirs.tolist()
    got = sealed.recv(1, dtype=torch.float32)
    last = sealed.recv(1)
    return theirs.tolist(), got.tolist(), last.tolist()


def _args(attack, identities=IDENTITIES):
    return {Role.SERVER0: (identities[0], attack), Role.SERVER1: (identities[1], attack)}


def test_sealed_exchange_send_and_receive():
    results = run_parties(_sealed, _args("none"), timeout_s=30)
    theirs, got, last = results[Role.SERVER0]
    assert theirs == [[0, 2, 4], [6, 8, 10]] and results[Role.SERVER1] == [[0, 1, 2], [3, 4, 5]]
    assert got == [7.0] * 5 and last == [1, 1]


@pytest.mark.parametrize("attack", ["tamper", "replay", "reflect"])
def test_tampered_replayed_or_reflected_message_is_refused(attack):
    with pytest.raises(PartyFailedError, match="failed authentication"):
        run_parties(_sealed, _args(attack), timeout_s=30)


def _handshake_only(role, channel, identity):
    handshake(identity, 2, channel.session)
    return "joined"


def test_a_party_posing_as_another_role_is_refused():
    """Whoever holds one role's key (say the client's) cannot take another role's place, nor can a key
    of another session: the peer checks the signature against the roster entry of the claimed rank."""
    other_session = PartyIdentity.generate_all(2)[1]
    for second in (dataclasses.replace(IDENTITIES[0], rank=1),  # role 0's key, claiming rank 1
                   dataclasses.replace(other_session, roster=IDENTITIES[1].roster), other_session):
        with pytest.raises(PartyFailedError, match="not who this session's roster says"):
            run_parties(_handshake_only, {Role.SERVER0: (IDENTITIES[0],), Role.SERVER1: (second,)}, timeout_s=30)


def test_party_key_files(tmp_path, capsys):
    assert main(["party-keys", "--out", str(tmp_path / "keys")]) == 0
    files = sorted(p.name for p in (tmp_path / "keys").iterdir())
    assert files == ["client.key", "dealer.key", "owner.key", "server0.key", "server1.key"]
    client = PartyIdentity.load(tmp_path / "keys" / "client.key", int(Role.CLIENT), len(Role))
    server0 = PartyIdentity.load(tmp_path / "keys" / "server0.key", 0, len(Role))
    assert client.roster == server0.roster and client.private != server0.private
    assert (tmp_path / "keys" / "client.key").stat().st_mode & 0o777 == 0o600
    with pytest.raises(UnknownOptionError, match="role 'server0'"):
        PartyIdentity.load(tmp_path / "keys" / "server0.key", int(Role.CLIENT), len(Role))
    (tmp_path / "keys" / "dealer.key").chmod(0o644)
    with pytest.raises(UnknownOptionError, match="chmod 600"):
        PartyIdentity.load(tmp_path / "keys" / "dealer.key", int(Role.DEALER), len(Role))
    (tmp_path / "bad.key").write_text("{not json")
    (tmp_path / "bad.key").chmod(0o600)
    with pytest.raises(UnknownOptionError, match="malformed"):
        PartyIdentity.load(tmp_path / "bad.key", 0, len(Role))
    with pytest.raises(UnknownOptionError, match="HF_SECURE_PARTY_KEY"):
        identity_from_env(0, len(Role), environ={})
