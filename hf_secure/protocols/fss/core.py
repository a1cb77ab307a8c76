"""Two-party computation on masked values with FSS keys from a dealer (Sigma, PoPETs 2024).

Roles: servers 0 and 1 compute; the dealer makes each query's keys beforehand and takes no part in
the online phase. Every secret ``x`` of the online phase lives on the servers as a *masked value*
``x^ = x + r (mod 2^n)``: both servers hold the same ``x^``, only the dealer knows the mask ``r``
(:class:`Masked`). Between two openings a value may also be held as additive shares
``x = x_0 + x_1`` (:class:`Shares`); opening shares under a fresh mask (:meth:`FSS.reveal`) is one
round in which each server sends ``n`` bits per element, packed (:mod:`.packing`).

One program, two executions. The dealer runs the model's program on *masks*: a :class:`Masked`
on the dealer holds ``r``; each protocol step draws its output masks and writes the keys that
step needs into both servers' key streams (:mod:`.keyfile`). A server runs the same program on
masked values and reads the keys back in the same order. So keys always match the program that
reads them, and a key made for another model, shape or step is refused at its first record.

Randomness without key bytes: the dealer gives each server a 16-byte seed (in its key header).
Draw number ``k`` of a server's stream is AES-CTR under ``SHA-256(seed | k)`` (:class:`~..mpc.prg.PRG`),
and the dealer, knowing both seeds, draws the same. A fresh mask is the sum of both servers'
draws (no key bytes; each server knows its share of every mask). A dealer value that is not
uniform (a product of masks, a DPF's sign) is shared as a draw for one server and a correction
``v - draw`` stored in the other's key; the server that stores corrections alternates.

Threat model: two semi-honest servers that do not collude, and a dealer trusted to make keys
correctly and to see nothing online. A server sees masked values (uniform, because each mask is
fresh and uniform on the value's ring), its shares, its key and the sizes of everything; it
learns nothing else about the input or the weights (see docs/threat-model.md, fss).
"""

from __future__ import annotations

import hashlib
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from ...errors import ProgramError
from ..mpc.prg import PRG
from . import dpf
from .packing import pack, packed_words, unpack

SERVER0, SERVER1, DEALER = 0, 1, 2
_BATCHED_POINTS = 1 << 16  # comparisons evaluate all their points in one pass up to this many


def wrap(v: torch.Tensor, bits: int) -> torch.Tensor:
    """Canonical representative in ``[0, 2^bits)`` (int64 two's complement for 64 bits)."""
    return v if bits >= 64 else v & ((1 << bits) - 1)


def signed(v: torch.Tensor, bits: int) -> torch.Tensor:
    """The signed integer of a ring element of ``Z_2^bits``."""
    if bits >= 64:
        return v
    v = wrap(v, bits)
    return torch.where(v >= (1 << (bits - 1)), v - (1 << bits), v)


@dataclass
class Params:
    """Fixed-point and ring parameters of one program (recorded in every key header).

    ``ring_bits``: the ring ``Z_2^n`` of activations, at most 51 (Sigma: 50 for BERT-base and
    GPT-2, 48 for Llama 2, 51 for GPT-Neo); ``frac_bits``: fractional bits of every activation
    (Sigma: 12).
    """

    ring_bits: int = 50
    frac_bits: int = 12

    def __post_init__(self):
        if not 16 <= self.ring_bits <= 51 or not 1 <= self.frac_bits <= 24 or 2 * self.frac_bits + 2 >= self.ring_bits:
            raise ValueError(f"unsupported fixed point: ring {self.ring_bits} bits, {self.frac_bits} fractional")

    def as_dict(self) -> dict:
        return {"ring_bits": self.ring_bits, "frac_bits": self.frac_bits}


@dataclass
class Masked:
    """A masked tensor: on a server ``data = x + r`` and ``share`` its additive share of ``r`` (None
    where the server has no share yet); on the dealer ``data = r`` and ``share`` zeros where the
    servers have shares (so both sides agree on when a share must be dealt). ``bits``: the ring
    ``Z_2^bits`` (1 for masked bits)."""

    ctx: "FSS"
    data: torch.Tensor
    bits: int
    share: torch.Tensor | None = None

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    def _like(self, data, share, bits=None) -> "Masked":
        bits = self.bits if bits is None else bits
        return Masked(self.ctx, wrap(data, bits), bits, None if share is None else wrap(share, bits))

    def _check(self, other: "Masked") -> None:
        if not isinstance(other, Masked) or other.ctx.role != self.ctx.role or other.bits != self.bits:
            raise ProgramError(f"masked operands must share a party and a ring, got {self.bits} and "
                               f"{getattr(other, 'bits', type(other).__name__)} bits")

    def __add__(self, other: "Masked") -> "Masked":
        self._check(other)
        share = None if self.share is None or other.share is None else self.share + other.share
        return self._like(self.data + other.data, share)

    def __sub__(self, other: "Masked") -> "Masked":
        self._check(other)
        share = None if self.share is None or other.share is None else self.share - other.share
        return self._like(self.data - other.data, share)

    def __neg__(self) -> "Masked":
        return self._like(-self.data, None if self.share is None else -self.share)

    def add_public(self, value) -> "Masked":
        """``x + c`` for a public integer tensor ``c``: the masked value moves, the mask does not."""
        if self.ctx.is_dealer:
            return self._like(self.data + torch.zeros_like(torch.as_tensor(value, device=self.data.device)), self.share)
        return self._like(self.data + torch.as_tensor(value, device=self.data.device), self.share)

    def mul_public(self, value) -> "Masked":
        """``c * x`` for a public integer tensor ``c`` (broadcast): value and mask scale together."""
        value = torch.as_tensor(value, dtype=torch.int64, device=self.data.device)
        return self._like(self.data * value, None if self.share is None else self.share * value)

    def apply(self, fn) -> "Masked":
        """A data movement (reshape, transpose, index, cat of one tensor) applied to value and mask."""
        return self._like(fn(self.data), None if self.share is None else fn(self.share))

    def reduce(self, bits: int) -> "Masked":
        """The same value modulo ``2^bits`` (exact: masks reduce with their values)."""
        if bits > self.bits:
            raise ProgramError(f"reduce goes to a smaller ring, not from {self.bits} to {bits} bits")
        return self._like(self.data, self.share, bits)

    def shift_down(self, shift: int) -> "Masked":
        """Truncate-reduce: ``floor(x / 2^shift)`` on the ring of ``bits - shift`` bits, plus the
        carry of the dropped bits (0 or 1: stochastic rounding): local, no key. Valid for any ``x`` of the ring (the
        result is taken modulo the smaller ring); the server's mask share is dropped (a shift of
        shares is not a share of the shift)."""
        if not 0 < shift < self.bits:
            raise ProgramError(f"cannot shift a {self.bits}-bit value by {shift}")
        return Masked(self.ctx, _logical_shift(self.data, shift, self.bits), self.bits - shift)

    @classmethod
    def zeros(cls, ctx: "FSS", shape, bits: int) -> "Masked":
        """The public zero (mask 0, the servers' mask shares 0)."""
        zero = torch.zeros(tuple(shape), dtype=torch.int64, device="cpu" if ctx.is_dealer else ctx.device)
        return cls(ctx, zero, bits, zero.clone())

    def where(self, condition: torch.Tensor, other: "Masked") -> "Masked":
        """``self`` where the public ``condition`` holds, else ``other`` (local: masks follow)."""
        self._check(other)
        condition = condition.to(self.data.device)
        share = (None if self.share is None or other.share is None
                 else torch.where(condition, self.share, other.share))
        return self._like(torch.where(condition, self.data, other.data), share)

    def put(self, index: torch.Tensor, values: "Masked") -> "Masked":
        """A copy with the flat positions ``index`` (public) replaced by ``values`` (local)."""
        self._check(values)
        index = index.to(self.data.device)
        data = self.data.clone().reshape(-1)
        data[index] = values.data.reshape(-1)
        share = None
        if self.share is not None and values.share is not None:
            share = self.share.expand(self.shape).clone().reshape(-1)
            share[index] = values.share.reshape(-1)
            share = share.view(self.shape)
        return self._like(data.view(self.shape), share)

    def segment_sum(self, segment: torch.Tensor, count: int) -> "Masked":
        """Sums of the entries of a flat ``x`` by their public ``segment`` ids (``count`` segments)."""
        segment = segment.to(self.data.device)
        data = torch.zeros(count, dtype=torch.int64, device=self.data.device).index_add_(0, segment, self.data)
        share = None
        if self.share is not None:
            share = torch.zeros(count, dtype=torch.int64, device=self.data.device).index_add_(
                0, segment, self.share.expand(self.shape).contiguous())
        return self._like(data, share)

    def to_shares(self) -> "Shares":
        """Additive shares of ``x``: server b holds ``b x^ - r_b`` (local)."""
        ctx = self.ctx
        share = ctx.share_of(self)
        if ctx.is_dealer:
            return Shares(ctx, _meta(self.shape), self.bits)
        return Shares(ctx, wrap(self.data * ctx.role - share, self.bits), self.bits)


@dataclass
class Shares:
    """Additive shares on ``Z_2^bits`` (bits 1: XOR shares). The dealer holds a meta tensor (shape only)."""

    ctx: "FSS"
    data: torch.Tensor
    bits: int

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    def _like(self, data) -> "Shares":
        return Shares(self.ctx, data if self.ctx.is_dealer else wrap(data, self.bits), self.bits)

    def _other(self, other) -> torch.Tensor:
        if isinstance(other, Masked):
            other = other.to_shares()
        if not isinstance(other, Shares) or other.bits != self.bits:
            raise ProgramError(f"shares combine with shares of the same ring, got {type(other).__name__}")
        return other.data

    def __add__(self, other) -> "Shares":
        return self._like(self.data + self._other(other))

    def __sub__(self, other) -> "Shares":
        return self._like(self.data - self._other(other))

    def __neg__(self) -> "Shares":
        return self._like(-self.data)

    def apply(self, fn) -> "Shares":
        return self._like(fn(self.data))


def _zeros(shape) -> torch.Tensor:
    return torch.zeros((), dtype=torch.int64).expand(tuple(shape))


def _meta(shape) -> torch.Tensor:
    return torch.empty(tuple(shape), dtype=torch.int64, device="meta")


def _logical_shift(v: torch.Tensor, shift: int, bits: int) -> torch.Tensor:
    """``v >> shift`` of a canonical element of ``Z_2^bits`` (logical, also for 64 bits)."""
    out = v >> shift
    return out & ((1 << (min(bits, 64) - shift)) - 1) if bits - shift < 64 else out


LIMB_BITS = 17  # three limbs cover 51 bits; limb products summed over 2^19 terms stay below 2^53


def limb_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` of int64 tensors modulo ``2^51`` (batched like torch.matmul), for devices without
    an int64 matmul (CUDA): the operands are cut into 17-bit limbs whose float64 products are
    exact for inner dimensions up to 2^19, and only limb pairs below bit 51 are kept; hence exact
    on every fss ring (at most 51 bits, as Sigma's 37-51)."""
    if a.shape[-1] > (1 << 19):
        raise ProgramError(f"limb products are exact for inner dimensions up to 2^19, got {a.shape[-1]}")
    mask = (1 << LIMB_BITS) - 1
    la = [((a >> (LIMB_BITS * i)) & mask).double() for i in range(3)]
    lb = [((b >> (LIMB_BITS * i)) & mask).double() for i in range(3)]
    out = None
    for i in range(3):
        for j in range(3 - i):  # 17 (i + j) < 51
            term = torch.matmul(la[i], lb[j]).long() << (LIMB_BITS * (i + j))
            out = term if out is None else out + term
    return out


def msb(v: torch.Tensor, bits: int) -> torch.Tensor:
    """The top bit of a canonical element of ``Z_2^bits`` (0/1 int64)."""
    return (v >> (bits - 1)) & 1


class KeySink:
    """Where the dealer's key records go: one writer per server (see :mod:`.keyfile`)."""

    def __init__(self, writers):
        self.writers = writers

    def put(self, party: int, tensor: torch.Tensor) -> None:
        self.writers[party].put(tensor)


@dataclass
class FSS:
    """One party's side of an FSS computation (role 0, 1: servers; 2: dealer).

    ``seeds``: a server's own 16-byte seed, or both seeds on the dealer. ``keys``: a server's
    :class:`~.keyfile.KeyReader`, or the dealer's :class:`KeySink`. ``link``: a server's
    connection to the other server, an object with ``exchange_many(list[int64 tensors], peer)``
    (:class:`~hf_secure.runtime.channel.Channel`). ``device``: where a server computes (masks and
    keys are made on the dealer's CPU).
    """

    role: int
    seeds: bytes | tuple[bytes, bytes]
    keys: object
    link: object = None
    params: Params = field(default_factory=Params)
    device: str = "cpu"
    backend: str | None = None  # AES backend (None: by device, see .aes)
    limb_products: bool = False  # matmuls by float64 limbs (always on CUDA; on CPU to test that path)
    counter: int = 0
    range_checks: list = field(default_factory=list)  # (kind, XOR shares of out-of-range bits): .ranges
    view: list | None = None  # audit mode: (scope, kind, tensor) this server saw online (see)
    where: str = ""  # the program's current scope (a layer), named in the view

    @property
    def is_dealer(self) -> bool:
        return self.role == DEALER

    @property
    def peer(self) -> int:
        return 1 - self.role

    def see(self, kind: str, value: torch.Tensor) -> None:
        """In audit mode (``view`` a list), keep ``value`` -- an input share or a masked value this
        server opened -- with the current scope, as part of this server's view."""
        if self.view is not None and not self.is_dealer:
            self.view.append((self.where or "online", kind, value.cpu().clone()))

    @contextmanager
    def scope(self, name: str):
        """Name what the program does inside (``"layer.3"``) in the audit's view."""
        outer, self.where = self.where, name
        try:
            yield
        finally:
            self.where = outer

    # -- randomness and keys -------------------------------------------------------------
    def _draw(self, party: int, shape, bits: int) -> torch.Tensor:
        seed = self.seeds[party] if self.is_dealer else self.seeds
        stream = PRG.derive(seed, "fss", self.counter)
        return wrap(stream.ring(shape), bits).to(self.device if not self.is_dealer else "cpu")

    def mask(self, shape, bits: int) -> torch.Tensor:
        """A fresh uniform mask: the dealer gets it whole, a server its additive share (no key bytes)."""
        self.counter += 1
        if self.is_dealer:
            return wrap(self._draw(SERVER0, shape, bits) + self._draw(SERVER1, shape, bits), bits)
        return self._draw(self.role, shape, bits)

    def correlated(self, value: torch.Tensor | None, shape, bits: int) -> torch.Tensor | None:
        """Additive shares of a dealer value: the dealer passes ``value`` (returns None), a server gets
        its share. The stored correction is bit-packed at the ring's width (:mod:`.packing`)."""
        self.counter += 1
        explicit = self.counter % 2  # the server whose key stores the correction
        implicit = 1 - explicit
        shape = tuple(shape)
        if self.is_dealer:
            if tuple(value.shape) != shape:
                raise ProgramError(f"dealer value of shape {tuple(value.shape)} for a {shape} correlation")
            self.keys.put(explicit, pack(wrap(value - self._draw(implicit, shape, bits), bits), bits))
            return None
        if self.role == implicit:
            return self._draw(implicit, shape, bits)
        return unpack(self.keys.take((packed_words(math.prod(shape), bits),)).to(self.device), bits, shape)

    def dpf_keys(self, alpha: torch.Tensor | None, bits: int, count: int) -> dpf.DPFKey | tuple:
        """DPF keys for ``count`` points of a ``bits``-bit domain: the dealer passes ``alpha``."""
        depth = dpf.depth_of(bits)
        if self.is_dealer:
            roots = (PRG.fresh().ring((count, 2)), PRG.fresh().ring((count, 2)))
            keys = dpf.gen(alpha.reshape(-1), bits, roots)
            for party, key in enumerate(keys):
                self.keys.put(party, key.seed)
                self.keys.put(party, key.cw_seed)
                self.keys.put(party, _pack_bits(key.cw_t))
                self.keys.put(party, key.leaf)
            return keys
        take = self.keys.take
        seed = take((count, 2))
        cw_seed = take((depth, count, 2))
        cw_t = _unpack_bits(take((_packed_len(depth * count * 2),), torch.uint8), (depth, count, 2))
        leaf = take((count, 2))
        return dpf.DPFKey(self.role, bits, seed, cw_seed, cw_t, leaf).to(self.device)

    def share_of(self, x: Masked) -> torch.Tensor:
        """A server's share of ``x``'s mask, asking the dealer for it if the server has none yet."""
        if x.share is None:
            share = self.correlated(x.data if self.is_dealer else None, x.shape, x.bits)
            x.share = _zeros(x.shape) if self.is_dealer else share
        return x.share

    def matmul(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Ring matmul: torch's int64 matmul on CPU, :func:`limb_matmul` on CUDA (or when asked)."""
        if self.limb_products or a.device.type == "cuda":
            return limb_matmul(a, b)
        return torch.matmul(a, b)

    # -- openings ----------------------------------------------------------------------------
    def exchange(self, tensors: list[torch.Tensor], widths: list[int]) -> list[torch.Tensor]:
        """Send ``tensors`` (canonical, of ``widths`` bits) to the other server, get its: one round."""
        packed = [pack(t, w) for t, w in zip(tensors, widths)]
        received = self.link.exchange_many([p.cpu() for p in packed], self.peer)
        return [unpack(r.to(self.device), w, t.shape) for r, w, t in zip(received, widths, tensors)]

    def reveal(self, *xs: Shares) -> list[Masked]:
        """Open each of ``xs`` under a fresh mask of its ring, all in one round."""
        masks = [self.mask(x.shape, x.bits) for x in xs]
        if self.is_dealer:  # zeros (not stored: an expanded scalar) mark the servers' mask shares
            return [Masked(self, m, x.bits, _zeros(m.shape)) for m, x in zip(masks, xs)]
        mine = [wrap(x.data + m, x.bits) for x, m in zip(xs, masks)]
        theirs = self.exchange(mine, [x.bits for x in xs])
        out = [Masked(self, wrap(a + b, x.bits), x.bits, m) for a, b, x, m in zip(mine, theirs, xs, masks)]
        for x in out:
            self.see("opened", x.data)
        return out

    def open(self, x: "Shares | Masked") -> torch.Tensor | None:
        """The plain value of ``x`` on both servers (signed, one round); None on the dealer. For
        outputs the servers hand to the client and for tests, never inside a model."""
        if isinstance(x, Masked):
            x = x.to_shares()
        if self.is_dealer:
            return None
        mine = wrap(x.data, x.bits)
        (theirs,) = self.exchange([mine], [x.bits])
        return signed(mine + theirs, x.bits)

    # -- arithmetic ----------------------------------------------------------------------------
    def product(self, x: Masked, y: Masked, op=torch.mul) -> Shares:
        """Shares of ``op(x, y)`` for a bilinear ``op`` (elementwise product, matmul): local.

        ``op(x, y) = op(x^, y^) - op(x^, r_y) - op(r_x, y^) + op(r_x, r_y)``; the dealer shares
        ``op(r_x, r_y)``, each server its mask shares. ``x`` and ``y`` share a ring.
        """
        x._check(y)
        shape = op(_meta(x.shape), _meta(y.shape)).shape
        rx, ry = self.share_of(x), self.share_of(y)
        if self.is_dealer:
            self.correlated(wrap(op(x.data, y.data), x.bits), shape, x.bits)
            return Shares(self, _meta(shape), x.bits)
        rxy = self.correlated(None, shape, x.bits)
        z = rxy - op(x.data, ry) - op(rx, y.data)
        if self.role == SERVER0:
            z = z + op(x.data, y.data)
        return Shares(self, wrap(z, x.bits), x.bits)

    def truncate(self, x: Masked, shift: int) -> Shares:
        """Shares of ``floor(x / 2^shift)`` (exact) for ``|x| < 2^(n-2)``: one round of 1-bit openings.

        With ``x' = x + 2^(n-2)`` (in ``[0, 2^(n-1))``) and ``x'^ = x' + r``:
        ``x' = x'^ - r + 2^n w`` where the wrap ``w = msb(r) (1 - msb(x'^))`` (a value below
        ``2^(n-1)`` wraps exactly when the mask's top bit is set and the sum's is not), so
        ``floor(x' / 2^s) = (x'^ >> s) - (r >> s) - c + 2^(n-s) w`` with the borrow of the low
        bits ``c = [x'^ mod 2^s < r mod 2^s]`` (Sigma's exact truncation: a comparison on the low
        ``s`` bits). ``c``'s XOR shares come from a DPF key at ``r mod 2^s`` evaluated at the
        public ``x'^ mod 2^s`` (:func:`.dpf.eval_greater`); the servers open ``c^ = c xor m``
        (1 bit each) and hold ``c`` on the ring (:meth:`bits_to_ring`). The
        dealer also shares ``r >> s`` and ``msb(r)``. Key per element: an ``s``-bit DPF key and
        three ring elements.
        """
        n = x.bits
        if not 1 <= shift <= n - 3:
            raise ProgramError(f"a truncation of a {n}-bit value shifts by 1 to {n - 3} bits, not {shift}")
        low = (1 << shift) - 1
        count = x.data.numel()
        if self.is_dealer:
            self.correlated(_logical_shift(x.data, shift, n), x.shape, n)
            self.correlated(msb(x.data, n), x.shape, n)
            self.dpf_keys((x.data & low).reshape(-1), shift, count)
            self.bits_to_ring(Shares(self, _meta(x.shape), 1), n)
            return Shares(self, _meta(x.shape), n)
        high = self.correlated(None, x.shape, n)
        top = self.correlated(None, x.shape, n)
        key = self.dpf_keys(None, shift, count)
        shifted = wrap(x.data + (1 << (n - 2)), n)
        below = dpf.eval_greater(key, (shifted & low).reshape(-1), self.backend).view(x.shape)
        borrow = self.bits_to_ring(Shares(self, below, 1), n)
        t = (1 - msb(shifted, n)) * top * (1 << (n - shift)) - high - borrow.data
        if self.role == SERVER0:
            t = t + _logical_shift(shifted, shift, n) - (1 << (n - 2 - shift))
        return Shares(self, wrap(t, n), n)

    def bits_to_ring(self, bits: Shares, ring_bits: int) -> Shares:
        """Additive shares on ``Z_2^ring_bits`` of XOR-shared bits ``b``: one round of 1-bit openings.

        The servers open ``b^ = b xor m`` under a fresh mask bit ``m``; then ``b = b^ + m - 2 b^ m``
        is local from the dealer's shares of ``m`` on the ring. Key: one ring element per bit.
        """
        (masked,) = self.reveal(bits)
        if self.is_dealer:
            self.correlated(masked.data, bits.shape, ring_bits)
            return Shares(self, _meta(bits.shape), ring_bits)
        m = self.correlated(None, bits.shape, ring_bits)
        b = masked.data
        out = (1 - 2 * b) * m + (b if self.role == SERVER0 else 0)
        return Shares(self, wrap(out, ring_bits), ring_bits)

    # -- comparisons, selection and lookup tables --------------------------------------------
    def less_than(self, x: Masked, tests: list[tuple[int, int]]) -> list[Shares]:
        """XOR shares of ``[(x + o) mod 2^k < c]`` for each public pair ``(o, c)`` (``x`` read
        unsigned on its ring ``Z_2^k``, ``0 < c < 2^k``).

        One DPF key at the mask ``r`` serves every test: for ``y = x + o`` (masked ``y^ = x^ + o``
        under the same mask), ``[y < c] = A xor B xor [y^ < c]`` with ``A = [r > y^]`` and
        ``B = [r > (y^ - c) mod 2^k]`` (:func:`.dpf.eval_greater`). Cost per element: one key of
        ``k - 7`` levels and one path evaluation per distinct point.
        """
        k = x.bits
        for _, c in tests:
            if not 0 < c < (1 << k):
                raise ProgramError(f"comparison constant {c} outside (0, 2^{k})")
        key = self.dpf_keys(x.data.reshape(-1) if self.is_dealer else None, k, x.data.numel())
        if self.is_dealer:
            return [Shares(self, _meta(x.shape), 1) for _ in tests]
        flat = x.data.reshape(-1)
        offsets = sorted({o % (1 << k) for o, _ in tests} | {(o - c) % (1 << k) for o, c in tests})
        if len(offsets) * flat.numel() <= _BATCHED_POINTS:  # small batches: one pass for every point
            points = torch.cat([wrap(flat + o, k) for o in offsets])
            values = dpf.eval_greater(key.repeat(len(offsets)), points, self.backend).view(len(offsets), -1)
            greater = dict(zip(offsets, values))
        else:  # large ones: a pass per point, keys not copied
            greater = {o: dpf.eval_greater(key, wrap(flat + o, k), self.backend) for o in offsets}

        def above(offset: int) -> torch.Tensor:  # [r > x^ + offset]
            return greater[offset % (1 << k)]

        out = []
        for offset, c in tests:
            bit = above(offset) ^ above(offset - c)
            if self.role == SERVER0:
                bit = bit ^ (wrap(flat + offset, k) < c).long()
            out.append(Shares(self, bit.view(x.shape), 1))
        return out

    def sign_bit(self, x: Masked) -> Shares:
        """XOR shares of ``[x >= 0]`` (DReLU) for ``x`` signed on its ring."""
        (below_half,) = self.less_than(x, [(0, 1 << (x.bits - 1))])
        return below_half

    def mux(self, selectors: list[Masked], x: Masked | None, table: list[tuple[int, int]], bits: int) -> Shares:
        """Shares on ``Z_2^bits`` of ``a_j x + b_j`` where ``j = sum_i s_i 2^i`` indexes ``table``.

        ``selectors`` are opened masked bits ``s^_i = s_i xor m_i``. The dealer lays out, for each
        element, the ``2^len(selectors)`` pairs ``(a_j, b_j - a_j r_x)`` at slot ``j xor m`` and
        shares them; a server picks slot ``s^`` and computes ``A x^ + B``. Local (Sigma's mux).
        ``x`` may be None when every ``a_j`` is 0. Key: ``2^(len+1)`` ring elements per element.
        """
        slots = 1 << len(selectors)
        if x is not None and bits > x.bits:
            raise ProgramError(f"a mux maps {x.bits}-bit values to a ring of at most as many bits, not {bits}")
        if len(table) != slots:
            raise ProgramError(f"a mux on {len(selectors)} bits needs {slots} entries, got {len(table)}")
        shape = selectors[0].shape if x is None else x.shape
        a = torch.tensor([t[0] for t in table], dtype=torch.int64)
        b = torch.tensor([t[1] for t in table], dtype=torch.int64)
        if self.is_dealer:
            m = sum((s.data.expand(shape).long() << i) for i, s in enumerate(selectors))
            slot = torch.arange(slots).view(*([1] * len(shape)), slots)
            j = slot ^ m.unsqueeze(-1)
            rx = torch.zeros(shape, dtype=torch.int64) if x is None else signed(x.data, x.bits)
            coeff = a[j]
            offset = b[j] - coeff * rx.unsqueeze(-1)
            self.correlated(wrap(coeff, bits), (*shape, slots), bits)
            self.correlated(wrap(offset, bits), (*shape, slots), bits)
            return Shares(self, _meta(shape), bits)
        coeff = self.correlated(None, (*shape, slots), bits)
        offset = self.correlated(None, (*shape, slots), bits)
        pick = sum((s.data.expand(shape).long() << i) for i, s in enumerate(selectors)).unsqueeze(-1)
        out = offset.gather(-1, pick).squeeze(-1)
        if x is not None:
            out = out + coeff.gather(-1, pick).squeeze(-1) * signed(x.data, x.bits)
        return Shares(self, wrap(out, bits), bits)

    def _signed_lookups(self, items: list[tuple[Masked, torch.Tensor]], bits: int):
        """The round every lookup shares: per pair ``(x, T)`` the opened ``M = s T[x] + rho``,
        and on the dealer the sign ``s``. See :meth:`lookup`."""
        keys, partial = [], []
        for x, table in items:
            k = x.bits
            if table.numel() != 1 << k:
                raise ProgramError(f"a lookup on {k} bits needs {1 << k} entries, got {table.numel()}")
            key = self.dpf_keys(x.data.reshape(-1) if self.is_dealer else None, k, x.data.numel())
            keys.append(key)
            if self.is_dealer:
                partial.append(Shares(self, _meta(x.shape), bits))
            else:
                w = _rotated_inner_product(dpf.eval_all(key, self.backend), x.data.reshape(-1),
                                           table.to(self.device), k)
                partial.append(Shares(self, wrap(-w if self.role == SERVER1 else w, bits).view(x.shape), bits))
        opened = self.reveal(*partial)
        if not self.is_dealer:
            return [(None, m) for m in opened]
        signs = [(2 * dpf.eval_point(key[0], x.data.reshape(-1)) - 1).view(x.shape) for (x, _), key in zip(items, keys)]
        return list(zip(signs, opened))

    def lookup(self, items: list[tuple[Masked, torch.Tensor]], bits: int) -> list[Shares]:
        """Shares on ``Z_2^bits`` of ``T[x]`` for each pair ``(x, T)``: a public table of ``2^k``
        int64 entries and ``x`` on ``Z_2^k``. One round for all pairs.

        The dealer gives a DPF key at the mask ``r``. Each server evaluates it on the whole
        domain, ``t_b``, and computes ``w_b = (-1)^b sum_i t_b[i] T[x^ - i]``; then
        ``w_0 + w_1 = s T[x]`` with the sign ``s = t_0[r] - t_1[r]`` known to the dealer. The
        servers open ``M = s T[x] + rho`` (fresh mask) and hold ``T[x] = s M - s rho`` from
        the dealer's shares of ``s`` and ``s rho`` (Sigma, section 3.3, with the sign removed by
        shares instead of a second selection). Cost per element: a ``k``-bit DPF key evaluated on
        ``2^k`` points (``2^(k-7)`` leaves), ``2^k`` multiply-adds, ``bits`` bits sent.
        """
        out = []
        for (x, _), (sign, m) in zip(items, self._signed_lookups(items, bits)):
            if self.is_dealer:
                self.correlated(wrap(sign, bits), x.shape, bits)
                self.correlated(wrap(sign * m.data, bits), x.shape, bits)
                out.append(Shares(self, _meta(x.shape), bits))
            else:
                s = self.correlated(None, x.shape, bits)
                s_rho = self.correlated(None, x.shape, bits)
                out.append(Shares(self, wrap(s * m.data - s_rho, bits), bits))
        return out

    def lookup_product(self, first: tuple[Masked, torch.Tensor], second: tuple[Masked, torch.Tensor],
                       bits: int) -> Shares:
        """Shares of ``T1[x1] * T2[x2]`` (elementwise, same shapes) in the lookups' one round.

        With ``M_i = s_i T_i + rho_i`` opened, ``T1 T2 = s (M1 - rho1)(M2 - rho2)`` for
        ``s = s1 s2``: local from the dealer's shares of ``s``, ``s rho1``, ``s rho2`` and
        ``s rho1 rho2`` -- the round that would open both lookups before a product is saved.
        """
        (s1, m1), (s2, m2) = self._signed_lookups([first, second], bits)
        shape = first[0].shape
        if self.is_dealer:
            s = s1 * s2
            for value in (s, s * m1.data, s * m2.data, s * m1.data * m2.data):
                self.correlated(wrap(value, bits), shape, bits)
            return Shares(self, _meta(shape), bits)
        s, s_rho1, s_rho2, s_rho12 = (self.correlated(None, shape, bits) for _ in range(4))
        out = s * m1.data * m2.data - s_rho2 * m1.data - s_rho1 * m2.data + s_rho12
        return Shares(self, wrap(out, bits), bits)


def _rotated_inner_product(bits: torch.Tensor, x: torch.Tensor, table: torch.Tensor, k: int) -> torch.Tensor:
    """``sum_i bits[n, i] * table[(x[n] - i) mod 2^k]`` for each row ``n`` (int64, wrapping).

    Small tables (at most 512 entries, ``max |T| 2^k < 2^24``) take each row's rotation from the
    table's circulant ``C[x, i] = T[(x - i) mod 2^k]`` and sum in floating point: every partial
    sum is an integer below 2^24, so float32 is exact (float64 on CUDA, whatever its TF32
    setting). Others gather the table itself, in int64.
    """
    size = 1 << k
    chunk = max(1, (1 << 22) // size)  # rows per step: temporaries of 2^22 elements (32 MiB each)
    out = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    i = torch.arange(size, device=x.device)
    if size <= 512 and int(table.abs().max()) * size < (1 << 24):
        dtype = torch.float32 if x.device.type == "cpu" else torch.float64
        circulant = table[(i.unsqueeze(1) - i) & (size - 1)].to(dtype)  # row x: the table rotated by x
        for start in range(0, x.shape[0], chunk):
            rows = slice(start, start + chunk)
            rotated = circulant.index_select(0, x[rows])
            out[rows] = (bits[rows].to(dtype) * rotated).sum(dim=1).round().long()
        return out
    for start in range(0, x.shape[0], chunk):
        rows = slice(start, start + chunk)
        index = (x[rows].unsqueeze(1) - i) & (size - 1)
        out[rows] = (bits[rows].long() * table[index]).sum(dim=1)
    return out


def _packed_len(nbits: int) -> int:
    return (nbits + 7) // 8


def _pack_bits(bits: torch.Tensor) -> torch.Tensor:
    flat = bits.reshape(-1).to(torch.uint8)
    padded = torch.zeros(_packed_len(flat.numel()) * 8, dtype=torch.uint8)
    padded[: flat.numel()] = flat
    weights = torch.tensor([1 << k for k in range(8)], dtype=torch.uint8)
    return (padded.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)


def _unpack_bits(packed: torch.Tensor, shape) -> torch.Tensor:
    count = 1
    for d in shape:
        count *= d
    shifts = torch.arange(8, dtype=torch.uint8)
    return ((packed.unsqueeze(1) >> shifts) & 1).reshape(-1)[:count].view(tuple(shape))


def new_seeds() -> tuple[bytes, bytes]:
    return os.urandom(16), os.urandom(16)


def key_id(seeds: tuple[bytes, bytes]) -> str:
    return hashlib.sha256(b"".join(seeds)).hexdigest()[:32]
