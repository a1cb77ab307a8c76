"""fss across real processes: client, model owner, two servers and the dealer.

The session machinery is the mpc protocol's (:class:`~..mpc.run.MPCSession`: the launcher, the
authenticated channels, the client's loop and the wire format between client and parties); what
each party does is this module's :func:`session_party`.

Setup, once: the owner lays its weights out (the program's ``derive``, in the clear on the
owner's side), encodes them with ``f`` fractional bits and sends each server an additive share;
the dealer sends each server a setup seed; the servers open every weight under a mask drawn from
both seeds (one round), so each holds the masked weights and its share of their masks, and the
dealer holds the masks. Nobody else learns a weight.

Per query:

1. the client sends every party the public fields and the dealer the input shapes, and the
   servers additive shares of the one-hot token rows;
2. offline: the dealer runs the program on masks and streams each server its key record by
   record (:mod:`.keyfile`); the server writes it to its key folder as it arrives, so neither
   side holds a whole key in memory;
3. online: the servers open the inputs under fresh masks, run the program reading their keys
   back in order (the dealer takes no part), and send the client their output shares; a used key
   is deleted and its id entered in the folder's ledger, so it is never used twice;
4. every party sends the client its report (traffic per scope, seconds, key bytes, peak memory).
"""

from __future__ import annotations

import resource
import shutil
import tempfile
import time
from pathlib import Path

import torch

from ...errors import PartyFailedError
from ...runtime import Channel, Role
from ..mpc.prg import PRG
from ..mpc.ring import encode
from ..mpc.run import _FORWARD, _STOP, MPCSession, answer_client, _client_loop, _recv_public
from .core import DEALER, FSS, SERVER0, SERVER1, KeySink, Masked, Params, Shares, key_id, new_seeds, wrap
from .keyfile import KeyReader, KeyWriter
from .ranges import verify_ranges

_SERVERS = (SERVER0, SERVER1)
_CLIENT, _OWNER = int(Role.CLIENT), int(Role.OWNER)
_RECORD, _END = 1, 0


class _StreamWriter:
    """The dealer's end of a key stream: each record goes to its server as it is made."""

    def __init__(self, channel: Channel, party: int, header: dict):
        self.channel, self.party = channel, party
        self.records = 0
        self.nbytes = 0
        channel.send_json(header, party)

    def put(self, tensor: torch.Tensor) -> None:
        tensor = tensor.contiguous()
        self.channel.send(torch.tensor([_RECORD]), self.party)
        self.channel.send(tensor, self.party)
        self.records += 1
        self.nbytes += tensor.numel() * tensor.element_size()

    def close(self) -> None:
        self.channel.send(torch.tensor([_END]), self.party)


def _receive_key(channel: Channel, key_dir: Path) -> tuple[Path, str, int]:
    """A server's end: write the dealer's records, as they arrive, to a file named by the key's
    random id (sessions may share a key folder); returns (path, key id, bytes)."""
    header = channel.recv_json(DEALER)
    received = str(header.get("key_id", ""))
    if not received.isalnum():
        raise PartyFailedError(f"the dealer's key header has no usable key id: {received!r}")
    path = key_dir / f"key-{received}.bin"
    writer = KeyWriter(path, header)
    while int(channel.recv(DEALER, shape=(1,)).item()) == _RECORD:
        writer.put(channel.recv(DEALER))
    writer.close()
    return path, received, writer.nbytes


def _rebind(ctx: FSS, obj):
    """The weights' masked values attached to this query's context (the one that reads its key)."""
    if isinstance(obj, Masked):
        return Masked(ctx, obj.data, obj.bits, obj.share)
    if isinstance(obj, dict):
        return {k: _rebind(ctx, v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_rebind(ctx, v) for v in obj)
    return obj


def session_party(role: Role, channel: Channel, program, private, params: Params, record_views: bool = False):
    """The life of one party of an fss session (see the module docstring). ``private``: the
    owner's float weights by state-dict key, the client's pipe; for a server, its options
    (``{"device": ..., "key_dir": ...}``) or None."""
    if role == Role.CLIENT:
        return _client_loop(channel, private, params.frac_bits, record_views, ring_bits=params.ring_bits)
    if role == Role.OWNER:
        with channel.scope("setup"):
            derived, _ = program.derive(private)
            manifest = {name: list(t.shape) for name, t in derived.items()}
            for party in (*_SERVERS, DEALER):
                channel.send_json(manifest, party)
            for name in manifest:
                w = encode(derived[name], params.frac_bits)
                w0 = PRG.fresh().ring(w.shape)
                channel.send(w0, SERVER0)
                channel.send(w - w0, SERVER1)
            channel.send_json({"ready": role.name}, _CLIENT)
        return {"stats": channel.summary()}

    options = private or {}
    device = options.get("device", "cpu")
    key_dir = ledger = None
    if role != Role.DEALER:
        if options.get("key_dir"):  # a private folder per server: whoever reads both servers' keys reads everything
            key_dir = Path(options["key_dir"]) / role.name.lower()
            key_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            key_dir.chmod(0o700)
        else:
            key_dir = Path(tempfile.mkdtemp(prefix=f"hf-secure-fss-{role.name.lower()}-"))
        ledger = key_dir / "used-keys"
    with channel.scope("setup"):
        manifest = channel.recv_json(_OWNER)
        names = list(manifest)
        if role == Role.DEALER:
            seeds = new_seeds()
            for server, seed in zip(_SERVERS, seeds):
                channel.send(torch.frombuffer(bytearray(seed), dtype=torch.int64), server)
            setup = FSS(DEALER, seeds, None, params=params)
            shares = [Shares(setup, torch.empty(manifest[n], dtype=torch.int64, device="meta"), params.ring_bits)
                      for n in names]
        else:
            seed = channel.recv(DEALER, shape=(2,), dtype=torch.int64).numpy().tobytes()
            setup = FSS(int(role), seed, None, channel, params, device)
            shares = [Shares(setup, wrap(channel.recv(_OWNER, shape=manifest[n], dtype=torch.int64), params.ring_bits)
                             .to(device), params.ring_bits) for n in names]
        weights = {}
        for name, share in zip(names, shares):  # one opening per weight: no second copy of the model
            (weights[name],) = setup.reveal(share)
        del shares
        channel.send_json({"ready": role.name}, _CLIENT)
    state: dict = {}
    queries = 0
    try:
        while True:
            op, n_inputs, n_public = channel.recv(_CLIENT, shape=(3,), dtype=torch.int64).tolist()
            if op == _STOP:
                return {"stats": channel.summary()}
            if op != _FORWARD:
                raise PartyFailedError(f"{role.name}: unknown request {op} from the client")
            channel.stats.clear()
            queries += 1
            public = _recv_public(channel, n_public)
            report, view = _query(role, channel, program, params, weights, state, public, n_inputs, key_dir, ledger,
                                  device, queries, record_views)
            report["stats"] = channel.summary()
            report["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            with channel.scope("report"):
                channel.send_json(report, _CLIENT)
                if view is not None:  # hf-secure audit: what this server saw
                    channel.send_json([[where, kind] for where, kind, _ in view], _CLIENT)
                    for _, _, value in view:
                        channel.send(value, _CLIENT)
    finally:
        if key_dir is not None and not options.get("key_dir"):
            shutil.rmtree(key_dir, ignore_errors=True)


def _query(role, channel, program, params, weights, state, public, n_inputs, key_dir, ledger, device, number,
           record_views):
    """One query on this party: ``(report, view)``, the view (a server's, with ``record_views``) or None."""
    start = time.perf_counter()
    if role == Role.DEALER:
        shapes = [tuple(channel.recv(_CLIENT, dtype=torch.int64).tolist()) for _ in range(n_inputs)]
        seeds = new_seeds()
        header = {"key_id": key_id(seeds), "params": params.as_dict(), "query": number,
                  "shapes": [list(s) for s in shapes], "public": {k: list(v.shape) for k, v in public.items()}}
        with channel.scope("offline"):
            writers = [_StreamWriter(channel, p, {**header, "party": p, "seed": seeds[p].hex()}) for p in _SERVERS]
            ctx = FSS(DEALER, seeds, KeySink(writers), params=params)
            inputs = ctx.reveal(*[Shares(ctx, torch.empty(s, dtype=torch.int64, device="meta"), params.ring_bits)
                                  for s in shapes])
            outputs = program.forward(ctx, _rebind(ctx, weights), inputs, public, state)
            verify_ranges(ctx)
            for out in outputs:  # the servers' output shares: nothing dealt, kept in step
                if isinstance(out, Masked):
                    out.to_shares()
            for w in writers:
                w.close()
        return {"key_bytes": [w.nbytes for w in writers], "offline_seconds": time.perf_counter() - start}, None
    inputs = [channel.recv(_CLIENT, dtype=torch.int64) for _ in range(n_inputs)]
    with channel.scope("offline"):
        path, received_id, key_bytes = _receive_key(channel, key_dir)
        channel.exchange(torch.zeros(1, dtype=torch.int64), 1 - int(role))  # both hold their keys
    start = time.perf_counter()
    reader = KeyReader(path, expect={"key_id": received_id, "party": int(role), "params": params.as_dict(), "query": number},
                       ledger=ledger)
    try:
        ctx = FSS(int(role), bytes.fromhex(reader.header["seed"]), reader, channel, params, device)
        if record_views:
            ctx.view = []
            for x in inputs:
                ctx.see("input share", x)
        with channel.scope("online"):
            masked = ctx.reveal(*[Shares(ctx, wrap(x.to(device), params.ring_bits), params.ring_bits) for x in inputs])
            outputs = program.forward(ctx, _rebind(ctx, weights), masked, public, state)
            with channel.scope("ranges"):
                out_of_range = verify_ranges(ctx)
            shares = [out.to_shares() if isinstance(out, Masked) else out for out in outputs]
        reader.finish()
    finally:
        reader.close()
    answer_client(channel, role, out_of_range, [out.data.cpu() for out in shares])
    return {"key_bytes": key_bytes, "online_seconds": time.perf_counter() - start}, ctx.view


class FSSSession(MPCSession):
    """Long-lived fss parties for one program (:class:`~..mpc.run.MPCSession` with fss parties).

    ``server_options``: what each server process gets (``device``: "cpu" or "cuda";
    ``key_dir``: where its keys are written, default a private temporary folder removed at the
    end).
    """

    party_function = staticmethod(session_party)
    description = "fss session setup"

    def __init__(self, program, weights, params: Params = Params(), timeout_s: float = 300.0, threads: int = 1,
                 rendezvous: str | None = None, party_key: str | None = None, server_options: dict | None = None,
                 record_views: bool = False):
        self.party_private = server_options
        super().__init__(program, weights, params, timeout_s, threads, rendezvous, party_key, record_views)
