"""Two-party additive secret sharing with a dealer: the context and the shared tensor type.

Parties: computing servers 0 and 1 hold additive shares of every secret value on Z_2^64
(:mod:`.ring`); the dealer makes correlated randomness and never sees inputs, weights or outputs.

Correlated randomness, without a round trip: at setup the dealer gives server ``i`` a seed
``s_i``. Request number ``k`` of a protocol run derives, from ``(s_i, k)``, server i's share of
each uniform mask (Beaver's ``a`` and ``b``); the dealer knows both seeds, so it knows the masks,
computes the product ``c = a * b`` (or ``a @ b``), and sends server 1 the correction
``c_1 = c - c_0`` where ``c_0`` is again derived from ``s_0``. Non-uniform dealer secrets (e.g. the
sine protocol's mask and its sines) are shared the same way: server 0's share from its seed,
server 1's as a correction. Only corrections travel, dealer to server 1.

Offline phase: protocols are data-oblivious, so the dealer runs the *same program* on meta
tensors (shapes only, no data) and thereby produces every correction in order before the query;
server 1 receives them as one batch. Each server replays the program on shapes too
(:meth:`MPC.prepare`) and keeps, in order, everything it will need that does not depend on the
input: its shares of every mask and dealer secret (AES-CTR output) and products of masks with
public values such as ``A @ (W - B)`` in a linear layer. The online phase is then
server-to-server only and spends no time on randomness.

Threat model: semi-honest servers that do not collude with each other or with the dealer; the
dealer is trusted to follow the protocol and to learn nothing else (it sees no message of the
online phase). Each opened value is masked by a fresh uniform ring element, so a server's view is
uniform apart from what the protocol deliberately reveals.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import torch

from ...errors import ProgramError, ProgramMismatchError
from ...runtime.channel import Channel
from .prg import PRG
from .ring import DEFAULT_FRAC_BITS, encode

SERVER0, SERVER1, DEALER = 0, 1, 2


@dataclass
class DealerLog:
    """What the dealer produced for server 1 in one offline phase."""

    corrections: list[torch.Tensor] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.corrections)


class MPC:
    """One party's view of a two-party computation (role 0, 1: servers; 2: dealer)."""

    def __init__(self, role: int, channel: Channel | None, seeds: tuple[bytes, bytes] | bytes,
                 frac_bits: int = DEFAULT_FRAC_BITS):
        self.role = role
        self.channel = channel
        self.frac_bits = frac_bits
        self.scale = 1 << frac_bits
        # servers know their own seed; the dealer knows both
        self.seeds = seeds if role == DEALER else {role: seeds}
        self.counter = 0
        self.log = DealerLog()
        self._corrections: deque[torch.Tensor] = deque()
        self.recording = False  # a server replaying the program on shapes (see prepare)
        self._tape: deque[torch.Tensor] | None = None  # what that replay kept, in order
        self.where = ""  # the program's current scope (a layer), named in range checks
        self.range_checks: list = []  # inputs whose ranges are compared at the end of the query (.ranges)
        self.view: list | None = None  # audit mode: (scope, kind, tensor) this server saw online (see)

    @property
    def offline(self) -> bool:
        """True while the program runs on shapes only: always on the dealer, on a server in :meth:`prepare`."""
        return self.is_dealer or self.recording

    @property
    def prepared(self) -> bool:
        """Online after :meth:`prepare`: input-independent values come from the preparation."""
        return self._tape is not None and not self.recording

    @property
    def is_dealer(self) -> bool:
        return self.role == DEALER

    @property
    def peer(self) -> int:
        return 1 - self.role

    # -- correlated randomness ------------------------------------------------------------
    def _uniform(self, party: int, shape, label: str) -> torch.Tensor:
        if self.prepared:
            return self.take(shape)
        value = PRG.derive(self.seeds[party], self.counter, label).ring(shape)
        return self.keep(value)

    # -- a server's offline preparation ----------------------------------------------------
    def prepare(self, replay) -> None:
        """Server: run ``replay()`` (the program on placeholders) and keep what the online run will take.

        Every mask share drawn during the replay, and every value a protocol :meth:`keep`s, is
        stored in order; the online run of the same program then :meth:`take`s them back in the
        same order instead of computing them. The request counter is rewound, so the online run
        sees the same requests.
        """
        counter, self._tape, self.recording = self.counter, deque(), True
        try:
            replay()
        finally:
            self.counter, self.recording = counter, False

    def keep(self, value: torch.Tensor) -> torch.Tensor:
        """During :meth:`prepare`: store an input-independent value for the online run."""
        if self.recording:
            self._tape.append(value)
        return value

    def take(self, shape) -> torch.Tensor:
        """Online, after :meth:`prepare`: the next value the replay kept (its shape is checked)."""
        if not self._tape:
            raise ProgramMismatchError("the offline preparation ran out: offline and online programs differ")
        value = self._tape.popleft()
        if tuple(value.shape) != tuple(shape):
            raise ProgramMismatchError(f"prepared value has shape {tuple(value.shape)}, expected {tuple(shape)}")
        return value

    def finish(self) -> None:
        """After an online run: everything prepared must have been used."""
        left, self._tape = self._tape, None
        if left:
            raise ProgramMismatchError(f"{len(left)} prepared values were not used: offline and online programs differ")

    def masks(self, *shapes, binary: bool = False) -> list[torch.Tensor]:
        """Fresh uniform masks: this server's shares (dealer: the masks themselves).

        Arithmetic shares add up to the mask; ``binary`` shares XOR to it (bitwise sharing).
        """
        labels = [f"mask{i}" for i in range(len(shapes))]
        if self.is_dealer:
            join = torch.bitwise_xor if binary else torch.add
            return [join(self._uniform(0, s, lb), self._uniform(1, s, lb)) for s, lb in zip(shapes, labels)]
        return [self._uniform(self.role, s, lb) for s, lb in zip(shapes, labels)]

    def dealt(self, values: list[torch.Tensor] | None, shapes, binary: bool = False) -> list[torch.Tensor]:
        """Shares of dealer-computed ``values`` (only the dealer passes them; servers pass None)."""
        labels = [f"dealt{i}" for i in range(len(shapes))]
        if self.is_dealer:
            split = torch.bitwise_xor if binary else torch.sub
            for value, shape, label in zip(values, shapes, labels):
                self.log.corrections.append(split(value, self._uniform(0, shape, label)))
            return values
        if self.role == SERVER0:
            return [self._uniform(0, s, lb) for s, lb in zip(shapes, labels)]
        if self.recording:  # server 1's shares are the dealer's corrections, received separately
            return [torch.empty(tuple(s), dtype=torch.int64, device="meta") for s in shapes]
        out = []
        for shape in shapes:
            if not self._corrections:
                raise ProgramMismatchError("server 1 ran out of dealer corrections: offline and online programs differ")
            correction = self._corrections.popleft()
            if tuple(correction.shape) != tuple(shape):
                raise ProgramMismatchError(f"dealer correction has shape {tuple(correction.shape)}, expected {tuple(shape)}")
            out.append(correction)
        return out

    def next_request(self) -> None:
        """Start a new request: the masks drawn next come from fresh AES-CTR keys (seed, counter, label)."""
        self.counter += 1

    def receive_offline(self) -> None:
        """Server 1: receive the dealer's batch of corrections for the next program run."""
        count = int(self.channel.recv(DEALER, shape=(1,), dtype=torch.int64).item())
        self._corrections = deque(self.channel.recv(DEALER, dtype=torch.int64) for _ in range(count))

    def send_offline(self) -> int:
        """Dealer: send server 1 the corrections of the program just replayed; return their bytes."""
        log, self.log = self.log, DealerLog()
        self.channel.send(torch.tensor([len(log.corrections)]), SERVER1)
        for correction in log.corrections:
            self.channel.send(correction, SERVER1)
        return log.nbytes

    # -- what a server sees (hf-secure audit) ----------------------------------------------
    def see(self, kind: str, value: torch.Tensor) -> torch.Tensor:
        """In audit mode (``view`` a list), keep ``value`` -- a share this server holds or a value it
        opened -- with the current scope as part of this server's view; ``value`` unchanged."""
        if self.view is not None and not self.offline:
            self.view.append((self.where or "online", kind, value.clone()))
        return value

    # -- values -------------------------------------------------------------------------
    def shared(self, share: torch.Tensor) -> "Shared":
        """Wrap this party's int64 share (fixed point, ``frac_bits``) as a :class:`Shared`."""
        return Shared(self, share)

    def placeholder(self, shape) -> "Shared":
        """The dealer's stand-in for a shared value: shape only."""
        return Shared(self, torch.empty(tuple(shape), dtype=torch.int64, device="meta"))

    def open(self, x: "Shared") -> torch.Tensor:
        """Reconstruct ``x`` on both servers (one round). Offline: a meta tensor."""
        if self.offline:
            return x.share
        return self.see("opened", x.share + self.channel.exchange(x.share, self.peer))

    def open_modulo(self, x: "Shared", modulus: int) -> torch.Tensor:
        """Reconstruct ``x mod modulus`` only (``modulus`` a power of two; one round): each server
        sends its share reduced modulo ``modulus``, so nothing of ``x``'s higher bits travels."""
        if modulus & (modulus - 1) or not 1 < modulus <= 1 << 62:
            raise ProgramError(f"modulus must be a power of two up to 2^62, got {modulus}")
        if self.offline:
            return x.share
        low = x.share & (modulus - 1)
        return self.see("opened", (low + self.channel.exchange(low, self.peer)) & (modulus - 1))

    def open_many(self, *xs: "Shared") -> list[torch.Tensor]:
        """Open several values in one round (one message)."""
        if self.offline or not xs:
            return [x.share for x in xs]
        theirs = self.channel.exchange_many([x.share for x in xs], self.peer)
        return [self.see("opened", x.share + t) for x, t in zip(xs, theirs)]

    def products(self, pairs: list[tuple["Shared", "Shared"]], op=torch.mul, scale: float = 1.0) -> list["Shared"]:
        """``scale * op(x, y)`` for every pair, with Beaver triples, all opened in one round.

        A ``scale`` of ``2^-j`` is folded into the truncation (by ``f + j`` bits: no extra round);
        any other public ``scale`` multiplies the first operands first (:meth:`Shared.mul_public`).

        With masks ``a, b`` and ``c = op(a, b)`` from the dealer, the servers open ``e = x - a`` and
        ``f = y - b`` and compute ``op(x, y) = c + op(e, b) + op(a, f) + op(e, f)`` (the last term
        on server 0 only), then truncate. ``op`` must be bilinear (elementwise product with
        broadcasting, matmul). Each distinct operand (the same object in several pairs, or both
        sides of a square) gets one mask and is opened once.
        """
        bits = self.scaled_truncation(scale)
        if bits is None:
            pairs, bits = [(x.mul_public(scale), y) for x, y in pairs], self.frac_bits
        self.next_request()
        operands: dict[int, int] = {}  # id(operand) -> its index in ``distinct``
        distinct = []
        for v in (v for pair in pairs for v in pair):
            if id(v) not in operands:
                operands[id(v)] = len(distinct)
                distinct.append(v)
        index = [(operands[id(x)], operands[id(y)]) for x, y in pairs]
        masks = self.masks(*[v.shape for v in distinct])
        shapes = [product_shape(op, x.shape, y.shape) for x, y in pairs]
        cs = self.dealt([op(masks[i], masks[j]) for i, j in index] if self.is_dealer else None, shapes)
        if self.offline:
            out = [self.placeholder(shape) for shape in shapes]
        else:
            opened = self.open_many(*[v - self.shared(m) for v, m in zip(distinct, masks)])
            out = []
            for c, (i, j) in zip(cs, index):
                e, f = opened[i], opened[j]
                z = c + op(e, masks[j]) + op(masks[i], f)
                if self.role == SERVER0:
                    z = z + op(e, f)
                out.append(self.shared(z))
        return self.truncate_many(out, bits)  # offline too: it draws the same dealer material

    def scaled_truncation(self, scale: float) -> int | None:
        """The truncation (bits) that also multiplies by the public ``scale``, when ``scale = 2^-j``
        for an integer ``0 <= j <= 62 - f``; None for any other scale."""
        mantissa, exponent = math.frexp(scale)
        j = 1 - exponent
        if mantissa == 0.5 and 0 <= j <= 62 - self.frac_bits:
            return self.frac_bits + j
        return None

    def truncate_many(self, xs: list["Shared"], bits: int | None = None) -> list["Shared"]:
        """``floor(x / 2^bits)`` for every ``x`` (``1 <= bits <= 62``), in one round: the result is
        ``floor(x / 2^bits)`` or one unit more (a bias of half a unit in the last place).

        Dealer-assisted truncation with a known top bit. The servers shift ``y = x + 2^62`` into
        ``[0, 2^63)`` (needs ``|x| < 2^62`` ring units: a product of two values with ``f``
        fractional bits below ``2^(62 - 2f)``, 2^30 for f = 16) and open ``c = y + r`` for a
        uniform ``r`` from the dealer: ``c`` is uniform, it reveals nothing. The dealer also
        shares ``r_hi = floor(r / 2^bits)`` and ``m = msb(r)`` (``r`` read unsigned). Over the
        integers ``y = c - r + w 2^64`` with the wrap bit ``w = m (1 - msb(c))`` (``y`` has its top
        bit clear), so ``floor(y / 2^bits) = floor(c / 2^bits) - r_hi + w 2^(64 - bits) - carry``,
        ``carry`` in {0, 1}: linear in the shares of ``r_hi`` and ``m``. Unlike local share
        truncation (SecureML), which fails with probability ``|x| 2^-64`` per element by an error
        of 2^(64 - bits), nothing can wrap: no failure for any ``x`` in range.
        """
        bits = self.frac_bits if bits is None else bits
        if not 1 <= bits <= 62:
            raise ProgramError(f"truncation by {bits} bits: 1 to 62 are supported")
        self.next_request()
        shapes = [x.shape for x in xs]
        rs = self.masks(*shapes)
        secrets = None
        if self.is_dealer:
            secrets = [part for r in rs for part in (_unsigned_shift(r, bits), _unsigned_shift(r, 63))]
        dealt = self.dealt(secrets, [shape for shape in shapes for _ in range(2)])
        wrap = _wrapped(1 << (64 - bits))
        if self.offline:
            return [Shared(self, _meta(shape), Truncation(_meta(shape), _meta(shape), r_hi, top, wrap))
                    for shape, r_hi, top in zip(shapes, dealt[0::2], dealt[1::2])]
        offset = _TRUNCATION_OFFSET if self.role == SERVER0 else 0
        opened = self.open_many(*[self.shared(x.share + offset + r) for x, r in zip(xs, rs)])
        out = []
        for c, r_hi, top in zip(opened, dealt[0::2], dealt[1::2]):
            record = Truncation(_unsigned_shift(c, bits) - (_TRUNCATION_OFFSET >> bits), 1 - _unsigned_shift(c, 63),
                                r_hi, top, wrap)
            out.append(Shared(self, record.share(self.role), record))
        return out

    def square_of_truncation(self, x: "Shared") -> "Shared":
        """``x^2`` (truncated) for ``x`` the output of a truncation, with nothing opened but the new
        truncation's value: one round instead of two.

        ``x = P - s`` with ``P`` public and ``s = r_hi - k W m`` (:class:`Truncation`), so
        ``x^2 = P^2 - 2 P s + r_hi^2 - 2 k W (m r_hi) + k W^2 m`` (``m^2 = m``, ``k^2 = k``): linear in
        the shares of ``s``, ``m``, and of ``r_hi^2`` and ``m r_hi``, which the dealer adds (it knows
        ``r``). Exact in the ring, like a Beaver square.
        """
        t = x.truncation
        self.next_request()
        squares = self.dealt([t.r_hi * t.r_hi, t.top * t.r_hi] if self.is_dealer else None, [x.shape, x.shape])
        if self.offline:
            return self.truncate_many([self.placeholder(x.shape)])[0]
        r_hi_squared, top_r_hi = squares
        z = (-2 * t.public * t.secret() + r_hi_squared - _wrapped(2 * t.wrap) * t.keep * top_r_hi
             + _wrapped(t.wrap * t.wrap) * t.keep * t.top)
        if self.role == SERVER0:
            z = z + t.public * t.public
        return self.truncate_many([self.shared(z)])[0]

_TRUNCATION_OFFSET = 1 << 62


def _meta(shape) -> torch.Tensor:
    return torch.empty(tuple(shape), dtype=torch.int64, device="meta")


def _wrapped(value: int) -> int:
    """``value`` modulo 2^64 as a signed 64-bit integer (a ring constant torch can multiply by)."""
    value %= 1 << 64
    return value - (1 << 64) if value >= 1 << 63 else value


@dataclass(frozen=True)
class Truncation:
    """How a truncation's output is made (:meth:`MPC.truncate_many`): ``x = P - s``, with ``P`` public
    to both servers and ``s = r_hi - k W m`` secret, where ``k = 1 - msb(c)`` is public, ``W = 2^(64 - bits)``
    and the dealer knows ``r_hi`` and ``m``. Kept with the value so that its square needs no opening
    (:meth:`MPC.square_of_truncation`); adding a public constant keeps it (``P`` moves).
    On a server ``r_hi`` and ``top`` (``m``) are its shares, on the dealer the values; offline, ``public``
    and ``keep`` are meta tensors.
    """

    public: torch.Tensor
    keep: torch.Tensor
    r_hi: torch.Tensor
    top: torch.Tensor
    wrap: int

    def secret(self) -> torch.Tensor:
        """This server's share of ``s``."""
        return self.r_hi - self.keep * self.wrap * self.top

    def share(self, role: int) -> torch.Tensor:
        """This server's share of ``x = P - s`` (``P`` counted on server 0)."""
        return self.public - self.secret() if role == SERVER0 else -self.secret()

    def shifted(self, constant: torch.Tensor) -> "Truncation":
        """The record of ``x + constant`` (``constant`` public, fixed point)."""
        return Truncation(self.public + constant, self.keep, self.r_hi, self.top, self.wrap)


def _unsigned_shift(v: torch.Tensor, bits: int) -> torch.Tensor:
    """``v >> bits`` with ``v`` read as an unsigned 64-bit integer (int64 ``>>`` is arithmetic)."""
    return (v >> bits) & ((1 << (64 - bits)) - 1)


def product_shape(op, x_shape, y_shape) -> torch.Size:
    """The shape of ``op(x, y)`` for ``op`` in (torch.mul, torch.matmul) (matmul: both at least 2-d)."""
    if op is torch.mul:
        return torch.broadcast_shapes(x_shape, y_shape)
    if op is torch.matmul and len(x_shape) >= 2 and len(y_shape) >= 2 and x_shape[-1] == y_shape[-2]:
        return torch.broadcast_shapes(x_shape[:-2], y_shape[:-2]) + (x_shape[-2], y_shape[-1])
    raise ProgramError(f"no product shape for {getattr(op, '__name__', op)} of {tuple(x_shape)} and {tuple(y_shape)}")


class Shared:
    """A secret-shared fixed-point tensor: this party's share, and the operations on it.

    Linear operations are local; ``*`` and ``@`` between two shared values use a Beaver triple
    (one round, both operands opened masked); products are truncated back to ``frac_bits``.
    """

    def __init__(self, mpc: MPC, share: torch.Tensor, truncation: Truncation | None = None):
        self.mpc = mpc
        self.share = share
        self.truncation = truncation  # set on a truncation's output (see Truncation)

    @property
    def shape(self) -> torch.Size:
        return self.share.shape

    def _like(self, share: torch.Tensor) -> "Shared":
        return Shared(self.mpc, share)

    # local, linear ------------------------------------------------------------------------
    def __add__(self, other):
        if isinstance(other, Shared):
            return self._like(self.share + other.share)
        return self.add_public(other)

    def __sub__(self, other):
        if isinstance(other, Shared):
            return self._like(self.share - other.share)
        return self.add_public(-other)

    def __neg__(self):
        return self._like(-self.share)

    def add_public(self, value) -> "Shared":
        """x + c for a public real c (only server 0 adds it; a truncation record moves with it)."""
        constant = encode(torch.as_tensor(value), self.mpc.frac_bits).to(self.share.device)
        truncation = None if self.truncation is None else self.truncation.shifted(constant)
        share = self.share + (constant if self.mpc.role == SERVER0 else torch.zeros_like(constant))  # same broadcast
        return Shared(self.mpc, share, truncation)

    def mul_public(self, value, truncate: bool = True) -> "Shared":
        """x * c for a public real c (tensor or number), truncated (``truncate=False``: with ``2f``
        fractional bits, to sum several such products before one truncation). An integer c is exact."""
        value = torch.as_tensor(value)
        if not value.is_floating_point():
            return self._like(self.share * value.long().to(self.share.device))
        product = self._like(self.share * encode(value, self.mpc.frac_bits).to(self.share.device))
        return product.truncate() if truncate else product

    def truncate(self, bits: int | None = None) -> "Shared":
        """``x / 2^bits`` (default: the fractional bits), one round: :meth:`MPC.truncate_many`."""
        return self.mpc.truncate_many([self], bits)[0]

    # shape ---------------------------------------------------------------------------------
    def reshape(self, *shape):
        return self._like(self.share.reshape(*shape))

    def transpose(self, a: int, b: int):
        return self._like(self.share.transpose(a, b))

    def sum(self, dim, keepdim: bool = False):
        return self._like(self.share.sum(dim, keepdim=keepdim))

    def __getitem__(self, index):
        return self._like(self.share[index])

    # Beaver products -------------------------------------------------------------------------
    def __mul__(self, other):
        if not isinstance(other, Shared):
            return self.mul_public(other)
        return self.mpc.products([(self, other)], torch.mul)[0]

    def __matmul__(self, other: "Shared"):
        return self.mpc.products([(self, other)], torch.matmul)[0]

    def square(self) -> "Shared":
        """``x^2``: one round for a truncation's output (:meth:`MPC.square_of_truncation`), else two."""
        if self.truncation is not None:
            return self.mpc.square_of_truncation(self)
        return self.mpc.products([(self, self)], torch.mul)[0]
