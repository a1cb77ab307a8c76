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
from ...errors import MissingKeyError, ProgramError, ServerError, UnknownOptionError, UnsupportedModelError
from ...families import family_of
from ...keys import key_store_dir
from ...progress import progress
from ..engine import EncoderEngine
from ..fss.client import plain_weights
from .backend import CKKS, Params
from .bert import BertProgram, Bounds, layouts, next_power_of_two
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


def load_bert(folder: str, config, embeddings_only: bool = False):
    """The checkpoint's ``BertModel`` in float32 (UnsupportedModelError if weights are missing;
    ``embeddings_only``: only the embedding tables are needed, the client's part)."""
    from transformers import BertModel

    plain = BertModel(config, add_pooling_layer=False).eval()
    missing, _ = plain.load_state_dict(plain_weights(folder, "bert"), strict=False)
    missing = [k for k in missing if k.startswith("embeddings.") or not embeddings_only]
    if missing:
        raise UnsupportedModelError(f"the checkpoint lacks {sorted(missing)[:4]}")
    return plain


def check_model(config, causal: bool) -> None:
    """UnsupportedModelError for what the he protocol does not run (so far: BERT encoders with
    GELU and power-of-two heads)."""
    spec = family_of(config)
    if spec.name != "bert" or causal:
        raise UnsupportedModelError(f"protocol 'he' runs BERT encoders (SecureModel) so far, not {spec.name}")
    BertProgram.check(config)


class HEServer:
    """The server's side: the model's encoder layers on ciphertexts, one program per block size.
    It never holds a secret key: only the evaluation keys the client sends (:meth:`with_keys`)."""

    def __init__(self, config, weights: dict[str, np.ndarray], params: Params, bounds: Bounds):
        self.config, self.weights, self.params, self.bounds = config, weights, params, bounds
        self.ctx: CKKS | None = None
        self.programs: dict[int, BertProgram] = {}

    @classmethod
    def from_model(cls, folder: str, plain, params: Params) -> "HEServer":
        """The server of a plaintext ``BertModel`` (``plain``, from ``folder``), its ranges
        calibrated on it (:func:`calibrate`); no keys yet."""
        weights = {k: v.detach().double().numpy() for k, v in plain.state_dict().items()}
        return cls(plain.config, weights, params, calibrate(plain, calibration_ids(folder, plain.config)))

    def with_keys(self, blob: bytes) -> "HEServer":
        """A server of the same model holding the evaluation keys ``blob`` (one per client)."""
        server = HEServer(self.config, self.weights, self.params, self.bounds)
        server.load_keys(blob)
        return server

    def load_keys(self, blob: bytes) -> None:
        """Take the evaluation keys ``blob`` (replacing any; the programs are rebuilt on them)."""
        self.ctx = CKKS(self.params, evaluation_keys=blob)
        self.programs = {}

    def bounds_dict(self) -> dict:
        return dataclasses.asdict(self.bounds)

    def program(self, block: int) -> BertProgram:
        if self.ctx is None:
            raise UnknownOptionError("the he server has no evaluation keys yet")
        if block not in self.programs:
            self.programs[block] = BertProgram(self.ctx, self.config, self.weights, block, self.bounds)
        return self.programs[block]

    def check_query(self, block: int, count: int, valid: np.ndarray) -> None:
        """ProgramError unless ``count`` ciphertexts and ``valid`` fit the program of ``block``."""
        if type(block) is not int or block < 1 or block & (block - 1) or block > self.config.max_position_embeddings:
            raise ProgramError(f"block {block!r} is not a power of two within the model's positions")
        hidden, _ = layouts(self.params.slots, self.config, block)
        if count != hidden.count or valid.shape != (hidden.tokens,) or not np.isin(valid, (0.0, 1.0)).all():
            raise ProgramError(f"a query of block {block} takes {hidden.count} ciphertexts and a 0/1 valid vector "
                               f"of {hidden.tokens}, not {count} and {valid.shape}")

    def forward(self, block: int, inputs: list[bytes], valid: np.ndarray, client) -> tuple[list[bytes], Traffic]:
        """The final hidden states (serialized at the lowest level) of the encrypted embeddings
        ``inputs``; ``client(request) -> answer`` answers refreshes. Returns them and the
        refreshes' traffic."""
        self.check_query(block, len(inputs), valid)
        program = self.program(block)
        refresher = Refresher(self.ctx, client)
        x = [self.ctx.deserialize(b) for b in inputs]
        with progress(len(program.layers), "he: encoder layers", "layer") as bar:
            x = program.forward(x, valid, refresher, on_layer=lambda: bar.update(1))
        return [self.ctx.serialize(self.ctx.to_level(c, 0)) for c in x], refresher.traffic


class HEEngine(EncoderEngine):
    """BERT encoders under CKKS: the client encrypts its embeddings, the server evaluates the
    encoder layers, the client decrypts the final hidden states. :attr:`stats`: bytes each way
    (inputs, refreshes, outputs), rounds (one per query plus one per refresh), seconds.

    Options: ``key`` (the he key file; None: the key store's, made on first use), ``server_url``
    (``hf-secure serve DIR --protocol he``; None: the server runs in this process),
    ``server_token`` and ``ca_bundle`` (for ``server_url``)."""

    name = "he"
    options = ("key", "server_url", "server_token", "ca_bundle")
    creates_keys = True

    def __init__(self, folder: str, config, key=None, server=None):
        self.vocab_size = config.vocab_size
        self.config = config
        self.params = MODEL_PARAMS
        self.client = load_or_create_key(key, self.params)
        plain = load_bert(folder, config, embeddings_only=server is not None)
        self.embeddings = plain.embeddings  # the client's part
        # server=False: a remote one, set by connect; None: one in this process
        self.server = HEServer.from_model(folder, plain, self.params) if server is None else server
        self.stats = Traffic()
        self.client_seconds = 0.0
        self.key_bytes = 0  # evaluation keys sent (in stats.bytes_sent too)
        self.refreshes = 0
        self._keys_for: set[int] = set()

    @classmethod
    def connect(cls, folder: str, config, *, causal: bool, dtype: torch.dtype, timeout: float, key=None,
                server_url: str | None = None, server_token: str | None = None,
                ca_bundle: str | None = None) -> "HEEngine":
        check_model(config, causal)
        if server_url is None:
            if server_token is not None or ca_bundle is not None:
                raise UnknownOptionError("server_token and ca_bundle need a server_url")
            return cls(folder, config, key)
        from ...server.backends import HttpBackend
        from .service import RemoteHEServer, embeddings_digest, shape_of

        backend = HttpBackend(server_url, timeout=timeout, token=server_token, ca_bundle=ca_bundle)
        try:
            info = backend.info()
            if info.get("protocol") != "he":
                raise ServerError(f"the server at {server_url} runs protocol {info.get('protocol')!r}, not 'he'")
            engine = cls(folder, config, key, server=False)
            mismatch = [what for what, mine in (("params_fingerprint", MODEL_PARAMS.fingerprint().hex()),
                                                ("shape", shape_of(config)),
                                                ("embeddings", embeddings_digest(engine.embeddings)))
                        if info.get(what) != mine]
            if mismatch:
                raise ServerError(f"the server at {server_url} runs another model or parameter set than {folder} "
                                  f"(differs in {', '.join(mismatch)})")
            engine.server = RemoteHEServer(backend, info)
        except BaseException:
            backend.close()
            raise
        return engine

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
        self.key_bytes += len(blob)
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
        lay, _ = layouts(self.params.slots, self.config, block)
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
            client_time = time.perf_counter() - start_time
            outputs, t = self.server.forward(block, inputs, valid, self._answer)
            decrypt_start = time.perf_counter()
            hidden = lay.unpack([self.client.decrypt(self.client.deserialize(o)) for o in outputs])
            self.client_seconds += client_time + time.perf_counter() - decrypt_start
            for slot, r in enumerate(rows):
                out[r] = torch.from_numpy(hidden[slot * block:slot * block + s]).float()
            self.stats.record(sum(map(len, inputs)) + t.bytes_received, sum(map(len, outputs)) + t.bytes_sent,
                              time.perf_counter() - start_time)
            self.stats.rounds += t.rounds
            self.stats.messages += t.messages
            self.refreshes += t.rounds
        return out, None

    def _answer(self, request: bytes) -> bytes:
        """The client's answer to one refresh (its compute time counted in :attr:`client_seconds`)."""
        start = time.perf_counter()
        try:
            return answer_refresh(self.client, request)
        finally:
            self.client_seconds += time.perf_counter() - start

    def report(self) -> dict | None:
        """The parameters, the ranges the server's approximations are built for, and the
        client's compute seconds, the evaluation-key bytes sent and the refreshes since binding
        (the client's seconds: encryption, refresh answers, decryption)."""
        return {"params": self.params.as_dict(), "bounds": self.server.bounds_dict(),
                "client_seconds": self.client_seconds, "evaluation_key_bytes": self.key_bytes,
                "refreshes": self.refreshes}

    def close(self) -> None:
        if isinstance(self.server, HEServer):
            self.server.programs.clear()
        elif self.server:
            self.server.close()
            self.server = None
