"""Linear layers with secret-shared weights, and embedding lookup of private token ids.

A weight ``W`` is shared once by the model owner. At setup each server also draws its share of a
fixed uniform mask ``B`` (from its dealer seed and the weight's name) and the servers open
``F = W - B``; ``F`` is uniform, so it says nothing about ``W``. Every later product ``X @ W``
then needs only a fresh mask ``A`` for ``X``: the dealer supplies ``C = A @ B``, the servers open
``E = X - A`` and compute ``X @ W = C + E @ B + A @ F + E @ F`` (server 0 keeps ``B_0 + F``
precomputed, so ``E @ B + E @ F`` is one local matmul). ``A @ F`` does not depend on the input:
each server computes its share ``A_i @ F`` in the offline phase (:meth:`.core.MPC.prepare`), so
the online phase costs one local matmul per server. Compared with a plain Beaver matmul this
never re-opens the weight, which is most of the traffic of a linear layer.

The same holds for any shared value used as the right operand of many products: the keys and
values of a causal model's KV cache are "fixed" (:func:`fix`) once when their token is computed,
and every later attention step opens only the query side (their ``F`` is known only online, so
``A @ F`` is computed online for them).

Embeddings: the client shares the one-hot rows of its token ids (integers, no fractional bits),
and the lookup is the product ``onehot @ E`` above, without truncation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...errors import ProgramError
from .core import MPC, SERVER0, Shared, product_shape
from .prg import PRG


@dataclass
class SharedWeight:
    """One party's view of a shared weight: its share, its share of the fixed mask, the opened difference.

    Server 0 stores ``B_0 + F`` as its ``mask`` so that ``E @ B_0 + E @ F`` is one product; server 1
    stores ``B_1``. On the dealer ``share`` and ``opened`` are meta tensors and ``mask`` is ``B``.
    ``static``: opened at setup (a model weight), so products with it can be prepared offline.
    """

    name: str
    share: torch.Tensor
    mask: torch.Tensor
    opened: torch.Tensor
    static: bool = False

    @property
    def shape(self) -> torch.Size:
        return self.share.shape

    def _map(self, fn) -> "SharedWeight":
        return SharedWeight(self.name, fn(self.share), fn(self.mask), fn(self.opened), self.static)

    def transpose(self, a: int, b: int) -> "SharedWeight":
        return self._map(lambda t: t.transpose(a, b))

    def narrow(self, dim: int, length: int) -> "SharedWeight":
        """The first ``length`` entries along ``dim`` (cropping a cache)."""
        return self._map(lambda t: t.narrow(dim, 0, length))

    def repeat_interleave(self, repeats: int, dim: int) -> "SharedWeight":
        """Each slice repeated ``repeats`` times (grouped-query attention's key/value heads)."""
        return self if repeats == 1 else self._map(lambda t: t.repeat_interleave(repeats, dim))

    def cat(self, other: "SharedWeight", dim: int) -> "SharedWeight":
        """Append ``other`` along ``dim`` (growing a cache); fixed masks stay what they were."""
        return SharedWeight(self.name, *(torch.cat([a, b], dim) for a, b in
                                         zip((self.share, self.mask, self.opened), (other.share, other.mask, other.opened))),
                            self.static and other.static)


def weight_mask(mpc: MPC, name: str, shape) -> torch.Tensor:
    """The fixed mask of weight ``name``: this server's share (dealer: the whole mask)."""
    parties = (0, 1) if mpc.is_dealer else (mpc.role,)
    masks = [PRG.derive(mpc.seeds[p], "weight", name).ring(shape) for p in parties]
    return masks[0] + masks[1] if mpc.is_dealer else masks[0]


def prepare_weights(mpc: MPC, shares: dict[str, torch.Tensor], matrices: set[str]) -> dict:
    """Setup: wrap the weight shares; for the ``matrices`` (right operands of products) draw their
    masks and open ``W - B`` for all of them in one round. Returns {name: SharedWeight | Shared}."""
    out = {name: mpc.shared(share) for name, share in shares.items() if name not in matrices}
    masks = {name: weight_mask(mpc, name, shares[name].shape) for name in matrices}
    if mpc.is_dealer:
        out.update({name: SharedWeight(name, shares[name], masks[name], shares[name], True) for name in matrices})
        return out
    names = sorted(matrices)
    diffs = mpc.open_many(*[mpc.shared(shares[name] - masks[name]) for name in names])
    for name, diff in zip(names, diffs):
        mask = masks[name] + diff if mpc.role == SERVER0 else masks[name]
        out[name] = SharedWeight(name, shares[name], mask, diff, True)
    return out


def fix(mpc: MPC, *values: Shared) -> list[SharedWeight]:
    """Give shared values fixed masks and open their differences, all in one round."""
    mpc.next_request()
    masks = mpc.masks(*[v.shape for v in values])
    if mpc.offline:  # the dealer keeps the masks B (for later products); a server's replay only shapes
        return [SharedWeight("fixed", v.share, m if mpc.is_dealer else v.share, v.share) for v, m in zip(values, masks)]
    diffs = mpc.open_many(*[v - mpc.shared(m) for v, m in zip(values, masks)])
    return [SharedWeight("fixed", v.share, m + d if mpc.role == SERVER0 else m, d)
            for v, m, d in zip(values, masks, diffs)]


def linear(x: Shared, weight: SharedWeight, bias: Shared | None = None, truncate: bool = True,
           scale: float = 1.0) -> Shared:
    """``scale * x @ W (+ bias)`` with ``W`` stored (in, out) (or batched: ``[..., in, out]``); one
    round, and one for the truncation. ``scale`` is public: a power of two ``2^-j`` is folded into
    the truncation, any other scale multiplies ``x`` first (one more round)."""
    mpc = x.mpc
    if not truncate and scale != 1.0:
        raise ProgramError("linear(truncate=False) takes no scale: the scale is applied by the truncation")
    bits = mpc.scaled_truncation(scale)
    if bits is None:
        x, bits = x.mul_public(scale), mpc.frac_bits
    mpc.next_request()
    (a,) = mpc.masks(x.shape)
    out_shape = product_shape(torch.matmul, x.shape, weight.shape)
    (c,) = mpc.dealt([a @ weight.mask] if mpc.is_dealer else None, [out_shape])
    if mpc.offline:
        if mpc.recording and weight.static:
            mpc.keep(a @ weight.opened)
        out = mpc.placeholder(out_shape)
    else:
        af = mpc.take(out_shape) if mpc.prepared and weight.static else a @ weight.opened
        e = mpc.open(x - mpc.shared(a))
        out = mpc.shared(c + af + e @ weight.mask)
    if truncate:
        out = out.truncate(bits)
    return out + bias if bias is not None else out


def rows(mpc: MPC, table: SharedWeight, index: torch.Tensor) -> Shared:
    """``table[index]`` for a *public* index (positions, token types): local, no communication."""
    if mpc.offline:
        return mpc.placeholder(tuple(index.shape) + tuple(table.shape[1:]))
    return mpc.shared(table.share[index])
