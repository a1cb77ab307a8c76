"""The input ranges of the fixed-point approximations, checked on every query: fail closed.

Each approximation is accurate only on an interval of its input, and outside it the result is not
slightly off but garbage (a Goldschmidt iteration diverges, a packed comparison wraps, the limit
form of ``exp`` oscillates). The intervals, in real units:

===========================================  ==================================  =============
input                                        interval                            lanes
===========================================  ==================================  =============
LayerNorm variance / RMSNorm mean square     ``[0.9e-4, 2.5] * bound``           64 bits
(+ eps), per row                             (calibrated; :data:`.nonlinear.INV_SQRT_CHECKED`)
GeLU/SiLU input ``x``, per element           ``|x| <= 1000`` (15-bit lanes keep  fine
(skipped where the weights prove it)         ``|x| < 1024``)
softmax exponent ``t = s - max``, per        ``[-240, 4]`` (``(1 + t/256)^256``  fine
element                                      needs ``t > -256``)
softmax row sum, per row                     ``[0.85, 1.15 n]`` (Goldschmidt)    64 bits
2Quad row sum, per row                       ``[1, 256 n]`` (Goldschmidt)        64 bits
logits, per element, when only the token is  ``|l| <= 1000`` (the argmax's 20-bit  fine
revealed                                     lanes keep differences below 2048)
===========================================  ==================================  =============

A program records each such input as it runs (:func:`expect_within`); after the forward pass
:func:`verify_ranges` compares all of them at once: one batched comparison per lane layout (the
``64``-bit ones exact; ``fine``: 15-bit lanes after dropping 16 bits, resolution 1, covering
``|x| < 2^14``), then one opening of one count per kind and layer. The servers refuse the query
(:class:`~hf_secure.errors.OutOfRangeError` at the client) if any count is not zero; the session
goes on. A value beyond the fine lanes' own cover (``2^14``, far outside every range above) could
wrap and escape the check: that is the limit of this check.

Not checked per element: a LayerNorm/RMSNorm input whose square leaves the ring (``|x| >= 2^15.5``
with 16 fractional bits). Its square wraps to a pseudo-random value, and the row's statistic then
lands in its checked interval with probability about ``2.5 bound / 2^48``; the exception is an
input that is an exact multiple of ``2^16`` (its square vanishes modulo the ring).

Leakage: for a query in range every count opens as 0, which the servers knew would happen for a
well-formed query; a refused query tells them how many values of each kind and layer were out of
range. Cost per query: one comparison per recorded element, and about 15 rounds once at the end
(a 64-bit and a 15-bit comparison, then one opening).
"""

from __future__ import annotations

import torch

from ...errors import OutOfRangeError
from .comparison import msb
from .core import MPC, Shared

EXACT = (64, 0)
FINE = (15, 16)


def expect_within(x: Shared, low: float | None, high: float | None, kind: str, lanes=EXACT) -> None:
    """Record that every element of ``x`` lies in ``[low, high]`` (None: unbounded on that side).

    Checked by :func:`verify_ranges` at the end of the query; ``lanes`` as in the module docstring.
    """
    mpc = x.mpc
    where = f"{kind} ({mpc.where})" if mpc.where else kind
    if low is not None:
        mpc.range_checks.append((where, x.add_public(-low), lanes))
    if high is not None:
        mpc.range_checks.append((where, (-x).add_public(high), lanes))


def verify_ranges(mpc: MPC) -> dict[str, int]:
    """Compare every recorded value with its range; ``{kind (layer): values out of range}``, empty if none.

    Runs on the dealer and in the servers' offline replays too (on shapes: it returns {}), so that
    the comparisons' correlated randomness is dealt like any other step's.
    """
    checks, mpc.range_checks = mpc.range_checks, []
    if not checks:
        return {}
    kinds = list(dict.fromkeys(kind for kind, _, _ in checks))
    totals = []
    for lanes in sorted({lanes for _, _, lanes in checks}):
        group = [(kind, x) for kind, x, layout in checks if layout == lanes]
        flat = mpc.shared(torch.cat([x.share.reshape(-1) for _, x in group]))
        below = msb(flat, *lanes).arithmetic().share  # fixed-point 1 where a value is below its end
        start = 0
        for kind, x in group:
            n = x.share.numel()
            totals.append((kinds.index(kind), below[start : start + n].sum()))
            start += n
    counts = torch.zeros(len(kinds), dtype=torch.int64, device=totals[0][1].device)
    for index, total in totals:
        counts[index] += total
    opened = mpc.open(mpc.shared(counts))
    if mpc.offline:
        return {}
    out = [round(v / mpc.scale) for v in opened.tolist()]
    return {kind: n for kind, n in zip(kinds, out) if n}


def refusal(out_of_range: dict[str, int]) -> OutOfRangeError:
    """The client's error for a refused query: ``{kind: values out of range}`` as the servers opened them."""
    return OutOfRangeError(
        "the servers refused the query: values left the ranges the fixed-point approximations cover ("
        + "; ".join(f"{kind}: {n} values" for kind, n in out_of_range.items())
        + "). See docs/threat-model.md, 'Ranges'. The session stays usable."
    )
