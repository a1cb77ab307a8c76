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

Threat model: docs/threat-model.md, section "he".
"""
