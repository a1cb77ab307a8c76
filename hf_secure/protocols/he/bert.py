"""BERT encoders on CKKS ciphertexts: the server's program of the he protocol.

The client computes the embeddings (word, position and token type, and their LayerNorm: the model
owner gives it those tables, see the threat model) and sends them encrypted, slot-packed
(:class:`.layout.Layout`); the server runs every encoder layer on ciphertexts with its plaintext
weights and returns the final hidden states encrypted at the lowest level.

Per layer, as transformers' ``BertLayer`` (post-LayerNorm): Q, K, V (:class:`.linear.SlotLinear`),
attention over the sequence's block with padded keys excluded (:class:`.layers.LayerProgram`),
output projection, residual, LayerNorm; FFN with GELU (:func:`.operators.activation`), residual,
LayerNorm.
"""

from __future__ import annotations

import numpy as np

from ...errors import UnsupportedModelError
from . import operators as op
from .backend import CKKS, Ciphertext
from .layers import Bounds, LayerProgram, check_heads


class BertProgram(LayerProgram):
    """The encoder layers of a BERT checkpoint on one CKKS context.

    ``weights``: float arrays by transformers' state-dict keys of ``BertModel`` (``encoder.layer.
    {i}.…``). ``block``: the sequence block (padded length, a power of two); several sequences
    share a ciphertext when they fit. ``layers``: those of a program of another block on the same
    layout, shared instead of built again (their products depend on the layout, not the block).
    Raises UnsupportedModelError for what it does not implement (non-GELU activations, heads that
    are not of a power-of-two size).
    """

    def __init__(self, ctx: CKKS, config, weights: dict[str, np.ndarray], block: int, bounds: Bounds = Bounds(),
                 layers: list | None = None):
        self.check(config)
        super().__init__(ctx, config, block, bounds)
        self.activation = "gelu" if config.hidden_act == "gelu" else "gelu_tanh"
        self.eps = config.layer_norm_eps
        self.layers = layers if layers is not None else [self._layer(weights, f"encoder.layer.{i}.")
                                                         for i in range(config.num_hidden_layers)]

    def _layer(self, w: dict[str, np.ndarray], p: str) -> dict:
        lay = self.layout

        def linear(name, **wide):
            return self.linear(w[f"{p}{name}.weight"].T, w[f"{p}{name}.bias"], **wide)

        return {
            "q": linear("attention.self.query"), "k": linear("attention.self.key"),
            "v": linear("attention.self.value"), "o": linear("attention.output.dense"),
            "ff1": linear("intermediate.dense", wide_out=True), "ff2": linear("output.dense", wide_in=True),
            "ln1": (lay.per_feature(w[f"{p}attention.output.LayerNorm.weight"]),
                    lay.per_feature(w[f"{p}attention.output.LayerNorm.bias"])),
            "ln2": (lay.per_feature(w[f"{p}output.LayerNorm.weight"]),
                    lay.per_feature(w[f"{p}output.LayerNorm.bias"])),
        }

    @staticmethod
    def check(config) -> None:
        """UnsupportedModelError for what the program does not run: activations other than GELU,
        head sizes that are not powers of two (absolute position embeddings do not matter: the
        client embeds)."""
        act = getattr(config, "hidden_act", "gelu")
        if act not in ("gelu", "gelu_new", "gelu_pytorch_tanh"):
            raise UnsupportedModelError(f"protocol 'he' runs BERT with GELU activations, not {act!r}")
        check_heads(config)

    # -- one query ------------------------------------------------------------------------------
    def forward(self, x: list[Ciphertext], valid: np.ndarray, refresh, on_layer=None) -> list[Ciphertext]:
        """The final hidden states of the embeddings ``x`` (``layout.count`` ciphertexts);
        ``valid``: ``[tokens]`` 0/1, the real (unpadded) token positions (keys to attend to).
        ``on_layer``: called after each layer (progress)."""
        keep = self._keep_masks(lambda t, key: valid[key] > 0)
        for layer in self.layers:
            x = self._layer_forward(layer, x, keep, refresh)
            if on_layer is not None:
                on_layer()
        return x

    def _layer_forward(self, w: dict, x: list[Ciphertext], keep: list[np.ndarray], refresh) -> list[Ciphertext]:
        ctx = self.ctx
        x_low = [op.fit(c, 1, refresh) for c in x]
        q, k, v = w["q"](x_low), w["k"](x_low), w["v"](x_low)
        context = [self._attention(qc, kc, vc, keep, refresh) for qc, kc, vc in zip(q, k, v)]
        attn = self._linear(w["o"], context, refresh)
        h = self._norm([a + r for a, r in zip(attn, x)], w["ln1"], self.eps, refresh)
        inner = self._linear(w["ff1"], h, refresh)
        inner = [op.activation(ctx, c, self.activation, self.bounds.activation, refresh=refresh) for c in inner]
        out = self._linear(w["ff2"], inner, refresh)
        return self._norm([a + r for a, r in zip(out, h)], w["ln2"], self.eps, refresh)
