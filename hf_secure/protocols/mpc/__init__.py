"""The mpc protocol: two-party additive secret sharing with a dealer (SecFormer, arXiv 2401.00793;
MPCFormer's distilled approximations, ICLR 2023, arXiv 2211.01452).

Two servers hold additive shares over Z_2^64 of the user's input and of the weights; a dealer
(SecFormer's "assistant server") makes the correlated randomness and never sees data; the model
owner shares the weights once; the client shares its one-hot token rows and alone reconstructs the
output. Semi-honest, non-colluding parties: docs/threat-model.md, "mpc".

Reading order (each module's docstring states its maths, rounds and what it reveals):

1. :mod:`.ring` -- fixed-point encoding on Z_2^64, additive sharing.
2. :mod:`.prg` -- AES-CTR streams from 16-byte seeds: the dealer's seeds make every mask.
3. :mod:`.core` -- :class:`.core.MPC` (one party's context) and :class:`.core.Shared` (its share of
   a tensor): Beaver products, truncation, opening.
4. :mod:`.comparison` (most significant bit on bits, DReLU, select, max, argmax) and
   :mod:`.nonlinear` (sine series, GeLU, SiLU, exp, Goldschmidt inverse (square root), LayerNorm,
   RMSNorm, softmax, 2Quad); :mod:`.ranges` checks their inputs per query.
5. :mod:`.layers` -- linear layers with fixed-mask weights, embedding rows.
6. The programs: :mod:`.bert`, :mod:`.decoder` with :mod:`.gpt2` and :mod:`.llama`;
   :mod:`.approximations` names the approximation each nonlinearity uses.
7. :mod:`.run` -- the parties as processes, one session, the :class:`.run.Program` contract.
8. :mod:`.client` -- the engine behind ``SecureModel`` / ``SecureModelForCausalLM``.

Glossary of our names, in the field's terms:

* ``MPC`` -- one party's protocol context (CrypTen keeps it global; here it is passed explicitly):
  its role, its channel, its seeds, the request counter.
* ``open`` -- reconstruct (CrypTen's ``reveal``) a masked value on both servers.
* ``masks`` -- uniform masks derived from the dealer's seeds (each server its share; the dealer all).
* ``dealt`` -- a dealer-computed secret (a Beaver product ``c = a b``, a truncation pair, the sine
  protocol's trigonometric values) shared as server 0's seed stream plus a correction sent to
  server 1: a "tuple" of CrypTen's ``TupleProvider``.
* ``prepare`` / ``keep`` / ``take`` -- a server's offline phase: it replays the program on shapes,
  keeping every input-independent value (mask shares, ``A @ (W - B)``), then the online run takes
  them back in order (``finish`` checks none is left).
* ``fix`` -- give a shared value a fixed mask and open ``value - mask`` once, so later products
  with it open only the other operand (weights at setup; a decoder's cached keys and values).
* ``placeholder`` -- a shape-only stand-in for a shared value, what offline replays compute on.
* ``SharedBit`` -- a secret bit ``z XOR rho`` with ``z`` public and ``rho`` the dealer's.
* ``Truncation`` -- how a truncation's output ``P - s`` was made, so that its square opens nothing.
"""
