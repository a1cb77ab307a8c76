"""GPT-2 and Llama-like decoders on CKKS ciphertexts, with the KV cache encrypted on the server.

One query per forward of ``generate()``: the prompt, then one token at a time. The client embeds
the new tokens (GPT-2: token and position tables; Llama: the token table) and sends them
encrypted; the server runs every layer on ciphertexts and returns the final hidden states (after
the final norm) of the new positions, encrypted; the client applies the LM head. The model owner
gives the client the embedding tables and the LM head (see docs/threat-model.md, "he").

Layout: one sequence per ciphertext set (:class:`.layout.Layout`), token ``t`` of the sequence at
token position ``t``, so the cache never moves when the sequence grows: a query of ``past + new``
tokens runs the program of the block ``next_power_of_two(past + new)``, whatever block earlier
queries ran. The new tokens sit at positions ``past .. past + new - 1``; the client fills every
other position with copies of them (values in the approximations' ranges), whose results are
never used. Per layer and cache, the server keeps ``K`` (after RoPE) and ``V`` as ciphertexts
that are zero outside the cached positions: the new keys and values are multiplied by the 0/1
mask of the new positions (the level RoPE's tables take anyway, or one) and added.

Per layer, as transformers' ``GPT2Block`` / ``LlamaDecoderLayer`` (pre-norm): norm (GPT-2
LayerNorm; Llama RMSNorm), Q, K, V (GPT-2's fused ``c_attn`` split; grouped-query K/V repeated
to every head, as ``repeat_kv``), RoPE on Q and K (``q cos + rotate_half(q) sin``: in the layout
``rotate_half`` is a rotation by half the slots times a +-1 mask; the cos/sin tables from the
model's own rotary module), causal attention over the cache and the new tokens (a query attends
to keys at positions up to its own that the attention mask keeps), output projection, residual;
norm, MLP (GPT-2: GELU; Llama: ``down(silu(gate) * up)``), residual. Then the final norm, and
the result masked to the new positions (the client learns nothing of the others).
"""

from __future__ import annotations

import numpy as np
import torch

from ...errors import ProgramError, UnsupportedModelError
from . import operators as op
from .backend import CKKS, Ciphertext
from .layers import Bounds, LayerProgram, check_heads, layouts

GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


def capacity(slots: int, config) -> int:
    """The most tokens (cached and new) a sequence can reach: the token positions of the layout."""
    return min(layouts(slots, config, 1)[0].tokens, max_positions(config))


def max_positions(config) -> int:
    """The positions the model attends over in full: its position table's or RoPE's limit, and a
    sliding window's (Mistral: within the window, sliding-window attention is full attention)."""
    top = getattr(config, "n_positions", None) or config.max_position_embeddings
    window = getattr(config, "sliding_window", None)
    if window is not None and getattr(config, "use_sliding_window", True):
        top = min(top, window)
    return top


def check_decoder(config, family: str) -> None:
    """UnsupportedModelError for what :class:`DecoderProgram` does not run."""
    check_heads(config)
    if family == "gpt2":
        act = config.activation_function
        if act not in GPT2_ACTIVATIONS:
            raise UnsupportedModelError(f"protocol 'he' runs GPT-2 with GELU activations, not {act!r}")
        if getattr(config, "add_cross_attention", False):
            raise UnsupportedModelError("protocol 'he' runs GPT-2 without cross-attention")
    elif family in ("llama", "mistral", "qwen2"):
        if config.hidden_act != "silu":
            raise UnsupportedModelError(f"protocol 'he' runs {family} with SiLU, not {config.hidden_act!r}")
    else:
        raise UnsupportedModelError(f"protocol 'he' runs GPT-2 and Llama-like decoders, not {family}")


class DecoderProgram(LayerProgram):
    """The layers of a GPT-2 or Llama-like checkpoint on one CKKS context, for sequences of up to
    ``block`` tokens (cached and new).

    ``weights``: float arrays by transformers' state-dict keys of ``GPT2LMHeadModel`` /
    ``LlamaForCausalLM`` (the embeddings and LM head are not used: the client's).
    ``rotary``: the model's rotary embedding module (Llama-like; ``rotary(x, position_ids) ->
    (cos, sin)``), None for GPT-2. ``layers``: those of a program of another block (every block
    has the same layout), shared instead of built again. Raises UnsupportedModelError
    (:func:`check_decoder`).
    """

    def __init__(self, ctx: CKKS, config, family: str, weights: dict[str, np.ndarray], block: int,
                 bounds: Bounds = Bounds(), rotary=None, layers: list | None = None):
        check_decoder(config, family)
        super().__init__(ctx, config, block, bounds)
        if self.block > self.layout.tokens:
            raise ProgramError(f"a block of {self.block} tokens exceeds the layout's {self.layout.tokens}")
        self.family, self.rotary = family, rotary
        if family == "gpt2":
            self.activation, self.eps, self.center = GPT2_ACTIVATIONS[config.activation_function], \
                config.layer_norm_epsilon, True
            build, prefix, final = self._gpt2_layer, "transformer.h.", "transformer.ln_f"
        else:
            if rotary is None:
                raise ProgramError(f"a {family} program needs the model's rotary embedding")
            self.activation, self.eps, self.center = "silu", config.rms_norm_eps, False
            build, prefix, final = self._llama_layer, "model.layers.", "model.norm"
        self.layers = layers if layers is not None else [build(weights, f"{prefix}{i}.")
                                                         for i in range(config.num_hidden_layers)]
        self.final = self._norm_weights(weights, final)
        self.half_sign = np.where(self.feature < self.group // 2, -1.0, 1.0)  # rotate_half's signs

    # -- weights ---------------------------------------------------------------------------------
    def _norm_weights(self, w: dict[str, np.ndarray], name: str) -> tuple:
        beta = w.get(f"{name}.bias")
        return (self.layout.per_feature(w[f"{name}.weight"]),
                None if beta is None else self.layout.per_feature(beta))

    def _gpt2_layer(self, w: dict[str, np.ndarray], p: str) -> dict:
        hidden = self.config.hidden_size
        qkv, qkv_bias = w[f"{p}attn.c_attn.weight"], w[f"{p}attn.c_attn.bias"]  # Conv1D: [in, out]
        q, k, v = (self.linear(qkv[:, i * hidden:(i + 1) * hidden], qkv_bias[i * hidden:(i + 1) * hidden])
                   for i in range(3))
        return {"q": q, "k": k, "v": v, "o": self.linear(w[f"{p}attn.c_proj.weight"], w[f"{p}attn.c_proj.bias"]),
                "up": self.linear(w[f"{p}mlp.c_fc.weight"], w[f"{p}mlp.c_fc.bias"], wide_out=True),
                "down": self.linear(w[f"{p}mlp.c_proj.weight"], w[f"{p}mlp.c_proj.bias"], wide_in=True),
                "ln1": self._norm_weights(w, f"{p}ln_1"), "ln2": self._norm_weights(w, f"{p}ln_2")}

    def _llama_layer(self, w: dict[str, np.ndarray], p: str) -> dict:
        cfg = self.config
        groups = cfg.num_attention_heads // (getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)

        def linear(name, repeat=1, **wide):  # nn.Linear: [out, in]; grouped K/V heads repeated
            weight, bias = w[f"{p}{name}.weight"], w.get(f"{p}{name}.bias")
            if repeat > 1:
                g = self.group
                weight = np.repeat(weight.reshape(-1, g, weight.shape[1]), repeat, axis=0).reshape(-1, weight.shape[1])
                bias = None if bias is None else np.repeat(bias.reshape(-1, g), repeat, axis=0).reshape(-1)
            return self.linear(weight.T, bias, **wide)

        return {"q": linear("self_attn.q_proj"), "k": linear("self_attn.k_proj", groups),
                "v": linear("self_attn.v_proj", groups), "o": linear("self_attn.o_proj"),
                "gate": linear("mlp.gate_proj", wide_out=True), "up": linear("mlp.up_proj", wide_out=True),
                "down": linear("mlp.down_proj", wide_in=True),
                "ln1": self._norm_weights(w, f"{p}input_layernorm"),
                "ln2": self._norm_weights(w, f"{p}post_attention_layernorm")}

    @staticmethod
    def steps_needed(ctx: CKKS, config, block: int) -> set[int]:
        """:meth:`LayerProgram.steps_needed`, and half the slots for RoPE's ``rotate_half``."""
        return LayerProgram.steps_needed(ctx, config, block) | {ctx.params.slots // 2}

    # -- one query ---------------------------------------------------------------------------------
    def forward(self, x: list[Ciphertext], cache: list, past: int, new: int, valid: np.ndarray,
                positions: np.ndarray, refresh, on_layer=None) -> list[Ciphertext]:
        """The final hidden states of the new tokens (``x``: their embeddings at positions ``past
        .. past + new - 1``, ``layout.count`` ciphertexts), zero at every other position.

        ``cache``: one entry per layer, ``None`` (empty) or ``(K, V)`` ciphertext lists holding
        ``past`` tokens; updated in place to hold ``past + new``. ``valid``: ``[past + new]`` 0/1
        (the attention mask: keys to attend to). ``positions``: ``[new]`` the new tokens'
        position ids (RoPE; GPT-2's are in its embeddings). Raises ProgramError on a shape that
        does not fit the program."""
        tokens = self.layout.tokens
        if not (0 < new and past + new <= self.block) or len(cache) != len(self.layers):
            raise ProgramError(f"{past} cached and {new} new tokens do not fit a block of {self.block}")
        if valid.shape != (past + new,) or positions.shape != (new,):
            raise ProgramError(f"valid must be [{past + new}] and positions [{new}]")
        at = np.arange(tokens)
        fresh = ((at >= past) & (at < past + new)).astype(np.float64)
        new_mask = np.tile(fresh, self.ctx.params.slots // tokens)  # slot s holds token s mod tokens
        keys = np.zeros(tokens, dtype=bool)
        keys[:past + new] = valid > 0

        def allowed(t, key):  # causal: keys up to the query's own position; a masked query attends to itself
            return (key <= t) & (keys[key] | (key == t))

        keep = self._keep_masks(allowed)
        rope = self._rope_tables(past, positions, new_mask) if self.rotary is not None else None
        for i, layer in enumerate(self.layers):
            x = self._layer_forward(layer, x, cache, i, keep, new_mask, rope, refresh)
            if on_layer is not None:
                on_layer()
        gamma, beta = self.final  # masked to the new positions: every other one comes out 0
        final = ([g * new_mask for g in gamma], None if beta is None else [b * new_mask for b in beta])
        return self._norm(x, final, self.eps, refresh, self.center)

    def _rope_tables(self, past: int, positions: np.ndarray, new_mask: np.ndarray):
        """Slot vectors ``(cos, sin)`` for the queries and ``(cos, sin)`` masked to the new
        positions for the keys (``sin`` with rotate_half's signs), from the rotary module."""
        lay = self.layout
        pos = np.arange(lay.tokens)
        pos[past:past + len(positions)] = positions
        with torch.no_grad():
            cos, sin = self.rotary(torch.zeros(1, dtype=torch.float64), torch.from_numpy(pos)[None])
        cos, sin = cos[0].double().numpy(), sin[0].double().numpy()  # [tokens, head size]
        t = np.arange(self.ctx.params.slots) % lay.tokens  # each slot's token
        cos_s, sin_s = cos[t, self.feature], sin[t, self.feature] * self.half_sign
        return (cos_s, sin_s), (cos_s * new_mask, sin_s * new_mask)

    def _rotate(self, x: Ciphertext, tables, refresh) -> Ciphertext:
        """``x cos + rotate_half(x) sin`` (one level; ``sin`` is all zero at position 0 alone)."""
        cos, sin = tables
        ctx = self.ctx
        x = op.ensure(x, 1, refresh)
        out = ctx.multiply_plain(x, cos)
        return out + ctx.multiply_plain(ctx.rotate(x, ctx.params.slots // 2), sin) if np.any(sin) else out

    def _cached(self, new: list[Ciphertext], old: list[Ciphertext] | None, new_mask: np.ndarray, rope, refresh):
        """The cache ``old`` with ``new`` (keys or values of every position) added at the new
        positions: ``new`` masked (with RoPE's key tables when given) at the level attention
        takes it (3 above the refresh floor), so ``old + new`` stays at that level query after query."""
        out = []
        for i, c in enumerate(new):
            c = op.fit(c, 4, refresh)
            c = self._rotate(c, rope, refresh) if rope is not None else self.ctx.multiply_plain(c, new_mask)
            out.append(c if old is None else old[i] + c)
        return out

    def _layer_forward(self, w: dict, x: list[Ciphertext], cache: list, index: int, keep, new_mask, rope,
                       refresh) -> list[Ciphertext]:
        ctx = self.ctx
        h = self._norm(x, w["ln1"], self.eps, refresh, self.center)
        h_low = [op.fit(c, 1, refresh) for c in h]
        q, k, v = w["q"](h_low), w["k"](h_low), w["v"](h_low)
        if rope is not None:
            q = [self._rotate(op.fit(c, 3, refresh), rope[0], refresh) for c in q]
        old_k, old_v = cache[index] if cache[index] is not None else (None, None)
        k = self._cached(k, old_k, new_mask, None if rope is None else rope[1], refresh)
        v = self._cached(v, old_v, new_mask, None, refresh)
        cache[index] = (k, v)
        context = [self._attention(qc, kc, vc, keep, refresh) for qc, kc, vc in zip(q, k, v)]
        x = [a + r for a, r in zip(self._linear(w["o"], context, refresh), x)]
        h = self._norm(x, w["ln2"], self.eps, refresh, self.center)
        if self.family == "gpt2":
            inner = [op.activation(ctx, c, self.activation, self.bounds.activation, refresh=refresh)
                     for c in self._linear(w["up"], h, refresh)]
        else:
            gate = [op.activation(ctx, c, "silu", self.bounds.activation, refresh=refresh)
                    for c in self._linear(w["gate"], h, refresh)]
            inner = [ctx.multiply(op.fit(a, 1, refresh), op.fit(u, 1, refresh))
                     for a, u in zip(gate, self._linear(w["up"], h, refresh))]
        return [a + r for a, r in zip(self._linear(w["down"], inner, refresh), x)]

