"""Messages between parties over torch.distributed, checked and counted.

Every message is a fixed-size header followed by the tensor. The header carries a magic number,
the session id, a dtype code and the shape, so a receiver that expects something else (another
session, another shape or dtype) fails with a clear error instead of reading garbage. A peer that
dies closes its sockets: gloo raises at once and we turn it into :class:`PartyFailedError`; a
peer that hangs runs into the process group's timeout.

With ``links`` (:mod:`.secure_link`, parties on several machines) every message is sealed with
its peer's AES-GCM link: header and payload are authenticated and encrypted, and a message that
does not verify raises PartyFailedError.

Accounting: bytes sent and received (the tensors' bytes, before sealing), messages, and rounds
(one round = one wait for a peer's message; an exchange, where both sides send then receive, is
one round), per scope (a layer name) and per party.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections import defaultdict
import torch
import torch.distributed as dist

from ..accounting import Traffic
from ..errors import PartyFailedError
from .secure_link import TAG_BYTES

MAGIC = 0x6866736563  # "hfsec"
MAX_DIMS = 6
_DTYPES = [torch.int64, torch.float32, torch.float64, torch.int32, torch.uint8, torch.bool, torch.int8]
_HEADER_LEN = 4 + MAX_DIMS
PEER_FAILED = "peer failed or timed out"


class Channel:
    """Point-to-point tensor messages for one party of a session."""

    def __init__(self, rank: int, session: int, group=None, links: dict | None = None):
        self.rank = rank
        self.session = session
        self.group = group
        self.links = links
        self.stats: dict[str, Traffic] = defaultdict(Traffic)
        self._scope = "setup"

    @contextlib.contextmanager
    def scope(self, name: str):
        """Attribute the communication inside the block to ``name`` (e.g. "layer.3.attention")."""
        previous, self._scope = self._scope, name
        start = time.perf_counter()
        try:
            yield
        finally:
            self.stats[name].seconds += time.perf_counter() - start
            self._scope = previous

    def _header(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.dim() > MAX_DIMS:
            raise PartyFailedError(f"cannot send a {tensor.dim()}-d tensor (max {MAX_DIMS})")
        shape = list(tensor.shape) + [-1] * (MAX_DIMS - tensor.dim())
        return torch.tensor([MAGIC, self.session, _DTYPES.index(tensor.dtype), tensor.dim(), *shape], dtype=torch.int64)

    def _call(self, fn, *args):
        try:
            return fn(*args)
        except RuntimeError as exc:  # gloo: connection closed by peer, timeout
            raise PartyFailedError(f"party {self.rank}: {PEER_FAILED} ({str(exc).splitlines()[0]})") from exc

    def _send_raw(self, tensor: torch.Tensor, to: int) -> None:
        if self.links is not None:
            tensor = _as_bytes_tensor(self.links[to].seal(_bytes_of(tensor)))
        self._call(dist.send, tensor, to, self.group)

    def _recv_raw(self, out: torch.Tensor, frm: int) -> torch.Tensor:
        if self.links is None:
            self._call(dist.recv, out, frm, self.group)
            return out
        sealed = torch.empty(out.numel() * out.element_size() + TAG_BYTES, dtype=torch.uint8)
        self._call(dist.recv, sealed, frm, self.group)
        data = self.links[frm].open(_bytes_of(sealed))
        return torch.frombuffer(bytearray(data), dtype=out.dtype).view(out.shape) if out.numel() else out

    def send(self, tensor: torch.Tensor, to: int) -> None:
        tensor = tensor.contiguous()
        self._send_raw(self._header(tensor), to)
        self._send_raw(tensor, to)
        stats = self.stats[self._scope]
        stats.bytes_sent += tensor.numel() * tensor.element_size()
        stats.messages += 1

    def recv(self, frm: int, shape=None, dtype: torch.dtype | None = None) -> torch.Tensor:
        header = self._recv_raw(torch.empty(_HEADER_LEN, dtype=torch.int64), frm)
        magic, session, dtype_code, ndim = header[:4].tolist()
        if magic != MAGIC:
            raise PartyFailedError(f"party {self.rank}: message from {frm} is not an hf_secure message")
        if session != self.session:
            raise PartyFailedError(f"party {self.rank}: message from {frm} belongs to session {session}, not {self.session}")
        if not 0 <= dtype_code < len(_DTYPES) or not 0 <= ndim <= MAX_DIMS:
            raise PartyFailedError(f"party {self.rank}: malformed header from {frm}")
        got_shape = tuple(header[4 : 4 + ndim].tolist())
        got_dtype = _DTYPES[dtype_code]
        if shape is not None and tuple(shape) != got_shape:
            raise PartyFailedError(f"party {self.rank}: expected shape {tuple(shape)} from {frm}, got {got_shape}")
        if dtype is not None and dtype != got_dtype:
            raise PartyFailedError(f"party {self.rank}: expected {dtype} from {frm}, got {got_dtype}")
        out = self._recv_raw(torch.empty(got_shape, dtype=got_dtype), frm)
        stats = self.stats[self._scope]
        stats.bytes_received += out.numel() * out.element_size()
        stats.rounds += 1
        return out

    def exchange(self, tensor: torch.Tensor, peer: int) -> torch.Tensor:
        """Send ``tensor`` to ``peer`` and receive its tensor of the same shape and dtype: one round."""
        return self.exchange_many([tensor], peer)[0]

    def exchange_many(self, tensors: list[torch.Tensor], peer: int) -> list[torch.Tensor]:
        """Exchange several int64 tensors with ``peer`` (the same shapes on both sides): one round.

        Both sides know the shapes, so header and payloads travel as one int64 message (the hot
        path of every protocol round), written into one buffer with a single copy; the peer's
        header is still checked.
        """
        if any(t.dtype != torch.int64 for t in tensors):
            raise PartyFailedError(f"exchange carries int64 ring elements, got {[t.dtype for t in tensors]}")
        sizes = [t.numel() for t in tensors]
        total = sum(sizes)
        outgoing = torch.empty(_HEADER_LEN + total, dtype=torch.int64)
        outgoing[:_HEADER_LEN] = self._header(torch.empty(total, dtype=torch.int64, device="meta"))
        offset = _HEADER_LEN
        for t, n in zip(tensors, sizes):
            outgoing[offset : offset + n].view(t.shape).copy_(t)
            offset += n
        link = self.links[peer] if self.links is not None else None
        wire_out = outgoing if link is None else _as_bytes_tensor(link.seal(_bytes_of(outgoing)))
        wire_in = torch.empty_like(wire_out)
        request = self._call(dist.isend, wire_out, peer, self.group)
        self._call(dist.recv, wire_in, peer, self.group)
        self._call(request.wait)
        incoming = wire_in if link is None else torch.frombuffer(bytearray(link.open(_bytes_of(wire_in))),
                                                                 dtype=torch.int64)
        if not torch.equal(incoming[:_HEADER_LEN], outgoing[:_HEADER_LEN]):
            raise PartyFailedError(
                f"party {self.rank}: exchange with {peer} out of step (header {incoming[:4].tolist()}, "
                f"expected session {self.session}, {total} elements)"
            )
        stats = self.stats[self._scope]
        stats.bytes_sent += total * 8
        stats.bytes_received += total * 8
        stats.messages += 1
        stats.rounds += 1
        out, offset = [], _HEADER_LEN
        for t, n in zip(tensors, sizes):
            out.append(incoming[offset : offset + n].view(t.shape))
            offset += n
        return out

    def send_json(self, obj, to: int) -> None:
        """A small JSON-encodable object (a manifest, a report) as one uint8 message."""
        self.send(torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8), to)

    def recv_json(self, frm: int):
        return json.loads(self.recv(frm, dtype=torch.uint8).numpy().tobytes().decode())

    def summary(self) -> dict[str, dict]:
        return {name: s.snapshot() for name, s in self.stats.items()}


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes, without a copy (contiguous CPU tensors)."""
    return memoryview(tensor.contiguous().numpy()).cast("B")


def _as_bytes_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)
