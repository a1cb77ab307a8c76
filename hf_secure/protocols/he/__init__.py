"""The he protocol: NEXUS's non-interactive CKKS inference (Zhang et al., NDSS 2025) at 128 bits.

The client encrypts its input under RNS-CKKS with its own secret key; one server evaluates the
model on ciphertexts with its plaintext weights and returns ciphertexts only the client can
decrypt. Modules:

* :mod:`.backend` -- CKKS through SEAL 4.3 (TenSEAL's ``sealapi``): parameters checked at 128-bit
  security, keys, levels and exact scales, framed serialization.
* :mod:`.rns` -- exact integer coefficients of plaintexts (for refreshes and coefficient packing).
* :mod:`.refresh` -- the masked refresh through the client that stands in for bootstrapping.
* :mod:`.operators` -- NEXUS's operators: polynomials, composite sign, QuickSum/QuickMax, argmax,
  GELU/SiLU, exp, Goldschmidt inverse, Newton inverse square root, softmax, LayerNorm, RMSNorm.
* :mod:`.layout`, :mod:`.linear` -- where values sit in the slots; matrix products (NEXUS's
  compressed one, and baby-step giant-step diagonals on slot-packed activations).
* :mod:`.layers` -- what every model program shares (attention, norms, ranges and their
  calibration); :mod:`.bert` (encoders) and :mod:`.decoder` (GPT-2, Llama-like, with the KV cache
  encrypted on the server).
* :mod:`.client` -- the engine behind ``from_pretrained(DIR, protocol="he")`` and the in-process
  server; :mod:`.service` -- the server as ``hf-secure serve DIR --protocol he`` and its client.

Threat model: docs/threat-model.md, section "he".
"""
