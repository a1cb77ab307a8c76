"""The client side of the he protocol for drop-in models: ``SecureModel.from_pretrained(DIR,
protocol="he")`` on an unmodified BERT checkpoint.

Roles: the client holds the CKKS secret key (kept in the local key store, made on first use) and
the embedding tables (word, position, token type, their LayerNorm), which the model owner gives it
(see docs/threat-model.md, "he"); the server holds every encoder weight and sees ciphertexts only.
Here the server runs in this process (:class:`HEServer`), and its refreshes go to this client
through a callback, one round each, counted in :attr:`HEEngine.stats`.

Per query: embeddings of each sequence (padded to a power-of-two block, the padding filled with
copies of real rows), several sequences per ciphertext when they fit, encrypted (seed-compressed)
and sent; the server returns the final hidden states at the lowest level.

Options: ``key`` (path of the client's he key file; None: the key store's, made on first use).
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import numpy as np
import torch

from ...accounting import Traffic
from ...errors import MissingKeyError, UnknownOptionError, UnsupportedModelError
from ...families import family_of
from ...keys import key_store_dir
from ...progress import progress
from ..engine import EncoderEngine
from ..fss.client import plain_weights
from .backend import CKKS, Params
from .bert import BertProgram, Bounds, next_power_of_two
from .layout import pad_tokens
from .refresh import Refresher, answer_refresh

# N = 2^15 with 12 levels: 128-bit by SEAL's check (600 of the 881 bits it allows), Galois keys of
# ~80 MB (half the 19-level chain's); 10 levels between refreshes (the GELU series of BERT's wide
# activation range is 10 deep), refreshes through the client supply the rest.
MODEL_PARAMS = Params(2**15, (60,) + (40,) * 12 + (60,), 40)


def load_or_create_key(path: str | os.PathLike | None, params: Params) -> CKKS:
    """The client's CKKS context with its secret key from ``path`` (None: the key store's he key
    for ``params``, created on first use, file mode 0600 in a 0700 folder)."""
    if path is None:
        folder = key_store_dir()
        path = folder / f"he-{params.fingerprint().hex()}.key"
        if not path.exists():
            folder.mkdir(parents=True, exist_ok=True)
            os.chmod(folder, 0o700)
            ctx = CKKS.keygen(params)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(ctx.secret_key_bytes())
            return ctx
    path = Path(path)
    if not path.is_file():
        raise MissingKeyError(f"no he key file at {path} (key=None uses the key store's, made on first use)")
    return CKKS(params, secret_key=path.read_bytes())


def calibrate(model, input_ids: torch.Tensor, margin: float = 1.5, floor: float = 4.0) -> Bounds:
    """The approximations' ranges for a plaintext ``BertModel``, measured on ``input_ids``:
    ``margin`` times the largest score and FFN pre-activation (at least ``floor``), LayerNorm
    variances within ``[min / 8, 8 max]``. The server's model owner states them with the model;
    inputs that leave them get wrong results (the server cannot see or check values)."""
    seen = {"scores": 0.0, "act": 0.0, "var": [float("inf"), 0.0]}
    hooks = []
    cfg = model.config
    head = cfg.hidden_size // cfg.num_attention_heads

    def attention(module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        b, s, _ = hidden.shape
        q = module.query(hidden).view(b, s, -1, head).transpose(1, 2)
        k = module.key(hidden).view(b, s, -1, head).transpose(1, 2)
        seen["scores"] = max(seen["scores"], float((q @ k.transpose(-1, -2)).abs().max()) / head**0.5)

    def ffn(module, args, output):
        seen["act"] = max(seen["act"], float(output.abs().max()))

    def norm(module, args, output):
        var = args[0].double().var(-1, unbiased=False) + module.eps
        seen["var"] = [min(seen["var"][0], float(var.min())), max(seen["var"][1], float(var.max()))]

    for layer in model.encoder.layer:
        hooks.append(layer.attention.self.register_forward_hook(attention, with_kwargs=True))
        hooks.append(layer.intermediate.dense.register_forward_hook(ffn))
        hooks.append(layer.attention.output.LayerNorm.register_forward_hook(norm))
        hooks.append(layer.output.LayerNorm.register_forward_hook(norm))
    try:
        with torch.no_grad():
            model(input_ids)
    finally:
        for h in hooks:
            h.remove()
    return Bounds(scores=max(floor, margin * seen["scores"]), activation=max(floor, margin * seen["act"]),
                  variance=(seen["var"][0] / 8, seen["var"][1] * 8))


def calibration_ids(folder: str, config) -> torch.Tensor:
    """Token ids to calibrate on: the checkpoint's tokenizer on the project's calibration text,
    or random ids where the checkpoint has no tokenizer (random text reaches other ranges than
    real text: a tokenizer is better)."""
    from transformers import AutoTokenizer

    from ...convert.approximate import DEFAULT_CALIBRATION

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError):
        return torch.randint(0, config.vocab_size, (4, min(64, config.max_position_embeddings)),
                             generator=torch.Generator().manual_seed(0))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    ids = tokenizer(DEFAULT_CALIBRATION, return_tensors="pt", padding=True)["input_ids"]
    return ids.clamp(max=config.vocab_size - 1)[:, :config.max_position_embeddings]


class HEServer:
    """The server's side: the model's encoder layers on ciphertexts, one program per block size.
    It never holds a secret key: only the evaluation keys the client sends."""

    def __init__(self, config, weights: dict[str, np.ndarray], params: Params, bounds: Bounds):
        self.config, self.weights, self.params, self.bounds = config, weights, params, bounds
        self.ctx: CKKS | None = None
        self.programs: dict[int, BertProgram] = {}

    def program(self, block: int) -> BertProgram:
        if self.ctx is None:
            raise UnknownOptionError("the he server has no evaluation keys yet")
        if block not in self.programs:
            self.programs[block] = BertProgram(self.ctx, self.config, self.weights, block, self.bounds)
        return self.programs[block]

    def load_keys(self, blob: bytes) -> None:
        self.ctx = CKKS(self.params, evaluation_keys=blob)
        self.programs = {}

    def forward(self, block: int, inputs: list[bytes], valid: np.ndarray, client) -> tuple[list[bytes], Refresher]:
        program = self.program(block)
        refresher = Refresher(self.ctx, client)
        x = [self.ctx.deserialize(b) for b in inputs]
        with progress(len(program.layers), "he: encoder layers", "layer") as bar:
            x = program.forward(x, valid, refresher, on_layer=lambda: bar.update(1))
        return [self.ctx.serialize(self.ctx.to_level(c, 0)) for c in x], refresher


class HEEngine(EncoderEngine):
    """BERT encoders under CKKS: the client encrypts its embeddings, the server evaluates the
    encoder layers, the client decrypts the final hidden states. :attr:`stats`: bytes each way
    (inputs, refreshes, outputs), rounds (one per query plus one per refresh), seconds."""

    name = "he"
    options = ("key",)
    creates_keys = True

    def __init__(self, folder: str, config, key=None):
        from transformers import BertModel

        self.vocab_size = config.vocab_size
        self.config = config
        self.params = MODEL_PARAMS
        self.client = load_or_create_key(key, self.params)
        weights = plain_weights(folder, "bert")
        plain = BertModel(config, add_pooling_layer=False).eval()
        missing, _ = plain.load_state_dict(weights, strict=False)
        if missing:
            raise UnsupportedModelError(f"the checkpoint lacks {sorted(missing)[:4]}")
        self.embeddings = plain.embeddings  # the client's part
        self.bounds = calibrate(plain, calibration_ids(folder, config))
        self.server = HEServer(config, {k: v.double().numpy() for k, v in weights.items()}, self.params, self.bounds)
        self.stats = Traffic()
        self._keys_for: set[int] = set()

    @classmethod
    def connect(cls, folder: str, config, *, causal: bool, dtype: torch.dtype, timeout: float, key=None) -> "HEEngine":
        spec = family_of(config)
        if spec.name != "bert" or causal:
            raise UnsupportedModelError(f"protocol 'he' runs BERT encoders (SecureModel) so far, not {spec.name}")
        BertProgram.check(config)
        return cls(folder, config, key)

    def _send_keys(self, block: int) -> None:
        """Evaluation keys for the program of ``block`` (made by the client, once per block)."""
        if block in self._keys_for:
            return
        steps = set().union(*(BertProgram.steps_needed(self.client, self.config, b) for b in self._keys_for | {block}))
        with progress(1, "he: evaluation keys", "set") as bar:
            blob = self.client.evaluation_keys(steps=sorted(steps))
            bar.update(1)
        self.server.load_keys(blob)
        self.stats.record(len(blob), 0, 0.0)
        self._keys_for.add(block)

    def hidden_states(self, input_ids, inputs_embeds, attention_mask, token_type_ids, position_ids):
        if input_ids is None:
            raise UnknownOptionError("protocol 'he' embeds on the client: pass input_ids")
        b, s = input_ids.shape
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        with torch.no_grad():
            emb = self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids, position_ids=position_ids)
        block = next_power_of_two(s)
        self._send_keys(block)
        program = self.server.program(block)
        lay = program.layout
        per_query = lay.tokens // block
        out = torch.zeros(b, s, self.config.hidden_size, dtype=torch.float32)
        for start in range(0, b, per_query):
            rows = range(start, min(b, start + per_query))
            x = np.zeros((lay.tokens, lay.width))
            valid = np.zeros(lay.tokens)
            for slot, r in enumerate(rows):
                x[slot * block:(slot + 1) * block] = pad_tokens(emb[r].double().numpy(), block)
                # a row masked entirely is padding: it attends to all its tokens (transformers' additive
                # mask makes that attention uniform instead; neither is meaningful), rather than to none
                keep = mask[r].numpy() if mask[r].any() else np.ones(s)
                valid[slot * block:slot * block + s] = keep
            if len(rows) < per_query:  # unused blocks: copies of the first sequence, never attended to
                x[len(rows) * block:] = np.tile(x[:block], (per_query - len(rows), 1))
            start_time = time.perf_counter()
            inputs = [self.client.encrypt_plaintext(self.client.encode(v, self.params.levels, self.params.scale))
                      for v in lay.pack(x)]
            outputs, refresher = self.server.forward(block, inputs, valid,
                                                     lambda request: answer_refresh(self.client, request))
            hidden = lay.unpack([self.client.decrypt(self.client.deserialize(o)) for o in outputs])
            for slot, r in enumerate(rows):
                out[r] = torch.from_numpy(hidden[slot * block:slot * block + s]).float()
            t = refresher.traffic
            self.stats.record(sum(map(len, inputs)) + t.bytes_received, sum(map(len, outputs)) + t.bytes_sent,
                              time.perf_counter() - start_time)
            self.stats.rounds += t.rounds
            self.stats.messages += t.messages
        return out, None

    def report(self) -> dict | None:
        return {"params": self.params.as_dict(), "bounds": dataclasses.asdict(self.bounds)}

    def close(self) -> None:
        self.server.programs.clear()
