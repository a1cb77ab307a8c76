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
import itertools
import os
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError

from ...accounting import Traffic
from ...errors import (
    InvalidInputError,
    MissingKeyError,
    ProgramError,
    ServerError,
    TamperedCheckpointError,
    UnknownOptionError,
    UnsupportedModelError,
)
from ...families import family_of
from ...keys import key_store_dir
from ...progress import progress
from ..engine import SecureEngine, causal_inputs
from ..fss.client import plain_weights
from .backend import CKKS, Params
from .bert import BertProgram
from .decoder import DecoderProgram, capacity, check_decoder, max_positions
from .layers import Bounds, calibrate, layouts, next_power_of_two
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


def calibration_ids(folder: str, config) -> torch.Tensor:
    """Token ids to calibrate on: the checkpoint's tokenizer on the project's calibration text,
    or random ids where the checkpoint has no tokenizer (random text reaches other ranges than
    real text: a tokenizer is better)."""
    from transformers import AutoTokenizer

    from ...convert.approximate import DEFAULT_CALIBRATION

    top = max_positions(config)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        ids = tokenizer(DEFAULT_CALIBRATION, return_tensors="pt", padding=True)["input_ids"]
    except (OSError, ValueError):
        ids = torch.zeros(0, 0, dtype=torch.long)
    if ids.shape[-1] == 0:
        return torch.randint(0, config.vocab_size, (4, min(64, top)), generator=torch.Generator().manual_seed(0))
    return ids.clamp(max=config.vocab_size - 1)[:, :top]


# The parameters the client holds beside its key, per family: the embedding tables (and the LM
# head of a decoder; GPT-2's is its token table). The server holds every other weight.
CLIENT_WEIGHTS = {"bert": ("embeddings.",), "gpt2": ("transformer.wte.", "transformer.wpe.", "lm_head."),
                  "llama": ("model.embed_tokens.", "lm_head.")}


def client_prefixes(family: str) -> tuple[str, ...]:
    return CLIENT_WEIGHTS["bert" if family == "bert" else "gpt2" if family == "gpt2" else "llama"]


def load_plain(folder: str, config, embeddings_only: bool = False):
    """The checkpoint as its family's plain transformers model in float32 (``BertModel``,
    ``GPT2LMHeadModel``, ``*ForCausalLM``); UnsupportedModelError if weights are missing
    (``embeddings_only``: only the client's part, :data:`CLIENT_WEIGHTS`, is needed)."""
    spec = family_of(config)
    plain = (spec.model_class(config, add_pooling_layer=False) if spec.name == "bert" else spec.model_class(config))
    plain = plain.eval()
    try:
        missing, _ = plain.load_state_dict(plain_weights(folder, spec.name), strict=False)
    except (RuntimeError, OSError, SafetensorError) as err:  # shapes that do not match the config, a cut file
        raise TamperedCheckpointError(f"the checkpoint in {folder} does not load: {err}") from err
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
        missing = [k for k in missing if k != "lm_head.weight"]
    missing = [k for k in missing if k.startswith(client_prefixes(spec.name)) or not embeddings_only]
    if missing:
        raise UnsupportedModelError(f"the checkpoint lacks {sorted(missing)[:4]}")
    return plain


def client_parts(plain) -> tuple:
    """``(embeddings, position table or None, LM head or None)``: the modules of a plain model
    whose weights the client holds (:data:`CLIENT_WEIGHTS`); BERT's embeddings are its whole
    embeddings module, GPT-2's positions its ``wpe``."""
    family = family_of(plain.config).name
    if family == "bert":
        return plain.embeddings, None, None
    return (plain.get_input_embeddings(), plain.transformer.wpe if family == "gpt2" else None,
            plain.get_output_embeddings())


def check_model(config, causal: bool) -> None:
    """UnsupportedModelError for what the he protocol does not run: BERT encoders with GELU,
    GPT-2 and Llama-like decoders (:func:`.decoder.check_decoder`), heads of a power-of-two size."""
    spec = family_of(config)
    if causal != spec.causal:
        wanted = "SecureModelForCausalLM" if spec.causal else "SecureModel"
        raise UnsupportedModelError(f"this {spec.name} checkpoint runs as {wanted} with protocol='he'")
    spec.refuse(config)  # the variants no protocol computes (e.g. GPT-2 without the 1/sqrt(d) scaling)
    if spec.name == "bert":
        BertProgram.check(config)
    else:
        check_decoder(config, spec.name)


MAX_CACHES = 16  # KV caches one key set may hold open (GPT-2-size: ~0.4 GB each at 128 tokens)


class HEServer:
    """The server's side: the model's layers on ciphertexts, one program per block size, and the
    decoders' KV caches (ciphertexts, by cache id). It never holds a secret key: only the
    evaluation keys the client sends (:meth:`with_keys`)."""

    def __init__(self, config, weights: dict[str, np.ndarray], params: Params, bounds: Bounds, rotary=None):
        self.config, self.weights, self.params, self.bounds, self.rotary = config, weights, params, bounds, rotary
        self.family = family_of(config).name
        self.ctx: CKKS | None = None
        self.programs: dict[int, BertProgram | DecoderProgram] = {}
        self.caches: dict[str, tuple[int, list]] = {}  # cache id -> (tokens held, per layer (K, V) or None)

    @classmethod
    def from_model(cls, folder: str, plain, params: Params) -> "HEServer":
        """The server of a plaintext transformers model (``plain``, from ``folder``), its ranges
        calibrated on it (:func:`.layers.calibrate`); no keys yet."""
        spec = family_of(plain.config)
        weights = {k: v.detach().double().numpy() for k, v in plain.state_dict().items()
                   if not k.startswith(client_prefixes(spec.name))}
        bounds = calibrate(plain, spec, calibration_ids(folder, plain.config))
        rotary = plain.model.rotary_emb if spec.rope else None
        return cls(plain.config, weights, params, bounds, rotary)

    def with_keys(self, blob: bytes) -> "HEServer":
        """A server of the same model holding the evaluation keys ``blob`` (one per client)."""
        server = HEServer(self.config, self.weights, self.params, self.bounds, self.rotary)
        server.load_keys(blob)
        return server

    def load_keys(self, blob: bytes) -> None:
        """Take the evaluation keys ``blob`` (replacing any; the programs are rebuilt on them and
        the caches, encrypted under the old ones, dropped)."""
        self.ctx = CKKS(self.params, evaluation_keys=blob)
        self.programs, self.caches = {}, {}

    def bounds_dict(self) -> dict:
        return dataclasses.asdict(self.bounds)

    def program(self, block: int) -> BertProgram | DecoderProgram:
        if self.ctx is None:
            raise UnknownOptionError("the he server has no evaluation keys yet")
        if block not in self.programs:
            layout = layouts(self.params.slots, self.config, block)[0]
            twin = next((p.layers for p in self.programs.values() if p.layout == layout), None)  # share its layers
            if self.family == "bert":
                self.programs[block] = BertProgram(self.ctx, self.config, self.weights, block, self.bounds, twin)
            else:
                self.programs[block] = DecoderProgram(self.ctx, self.config, self.family, self.weights, block,
                                                      self.bounds, self.rotary, twin)
        return self.programs[block]

    def check_query(self, block: int, count: int, valid: np.ndarray, cache: str | None = None, past: int = 0,
                    positions: np.ndarray | None = None) -> None:
        """ProgramError unless ``count`` ciphertexts, ``valid`` and (decoders) the cache id, the
        tokens it holds and the new tokens' ``positions`` fit the program of ``block``."""
        decoder = self.family != "bert"
        top = capacity(self.params.slots, self.config) if decoder else self.config.max_position_embeddings
        if type(block) is not int or block < 1 or block & (block - 1) or block > top:
            raise ProgramError(f"block {block!r} is not a power of two within the model's {top} positions")
        hidden, _ = layouts(self.params.slots, self.config, block)
        if decoder:
            if cache is None or positions is None or positions.ndim != 1 or type(past) is not int:
                raise ProgramError("a decoder query names its cache, the tokens it holds and the new positions")
            new = len(positions)
            if cache not in self.caches and len(self.caches) >= MAX_CACHES:
                raise ProgramError(f"{MAX_CACHES} KV caches are open on this server (each holds a sequence's "
                                   "keys and values per layer): close a session first")
            held = self.caches.get(cache, (0, None))[0]
            if past not in (0, held):
                raise ProgramError(f"cache {cache!r} holds {held} tokens, not {past} (he caches cannot be cropped)")
            if new < 1 or next_power_of_two(past + new) != block or valid.shape != (past + new,):
                raise ProgramError(f"{past} cached and {new} new tokens take block {next_power_of_two(past + new)} "
                                   f"and a valid vector of {past + new}, not {block} and {valid.shape}")
            if positions.min() < 0 or positions.max() >= max_positions(self.config):
                raise ProgramError("a new token's position is outside the model's")
        elif cache is not None or positions is not None or valid.shape != (hidden.tokens,):
            raise ProgramError(f"an encoder query of block {block} takes a 0/1 valid vector of {hidden.tokens} "
                               "and no cache")
        if count != hidden.count or not np.isin(valid, (0.0, 1.0)).all():
            raise ProgramError(f"a query of block {block} takes {hidden.count} ciphertexts and a 0/1 valid vector, "
                               f"not {count}")

    def forward(self, block: int, inputs: list[bytes], valid: np.ndarray, client, cache: str | None = None,
                past: int = 0, positions: np.ndarray | None = None) -> tuple[list[bytes], Traffic]:
        """The final hidden states (serialized at the lowest level) of the encrypted embeddings
        ``inputs``; ``client(request) -> answer`` answers refreshes. Decoders: ``cache`` (its id;
        a new id starts an empty cache, ``past=0`` restarts one), ``past`` (the tokens it holds),
        ``positions`` (the new tokens' position ids, ``[new]`` ints). Returns the outputs and the
        refreshes' traffic."""
        self.check_query(block, len(inputs), valid, cache, past, positions)
        program = self.program(block)
        refresher = Refresher(self.ctx, client)
        x = [self.ctx.deserialize(b) for b in inputs]
        with progress(len(program.layers), "he: layers", "layer") as bar:
            if cache is None:
                x = program.forward(x, valid, refresher, on_layer=lambda: bar.update(1))
            else:
                layers = list(self.caches[cache][1]) if past else [None] * len(program.layers)
                x = program.forward(x, layers, past, len(positions), valid, positions, refresher,
                                    on_layer=lambda: bar.update(1))
                self.caches[cache] = (past + len(positions), layers)  # only once the query succeeded
        return [self.ctx.serialize(self.ctx.to_level(c, 0)) for c in x], refresher.traffic

    def drop(self, cache: str) -> None:
        """Forget a KV cache (unknown ids are ignored)."""
        self.caches.pop(cache, None)


class HEEngine(SecureEngine):
    """Models under CKKS: the client encrypts its embeddings, the server evaluates the layers,
    the client decrypts the final hidden states (and, for a decoder, applies the LM head).
    :attr:`stats`: bytes each way (keys, inputs, refreshes, outputs), rounds (one per query plus
    one per refresh), seconds.

    BERT: :meth:`hidden_states`. GPT-2 and Llama-like decoders: :meth:`logits`, with each
    sequence's KV cache encrypted on the server (:meth:`open_session` names one per
    ``generate()``; one cache per row of the batch).

    Options: ``key`` (the he key file; None: the key store's, made on first use), ``server_url``
    (``hf-secure serve DIR --protocol he``; None: the server runs in this process),
    ``server_token`` and ``ca_bundle`` (for ``server_url``)."""

    name = "he"
    options = ("key", "server_url", "server_token", "ca_bundle")
    creates_keys = True

    def __init__(self, folder: str, config, key=None, server=None):
        self.vocab_size = config.vocab_size
        self.config = config
        self.family = family_of(config).name
        self.params = MODEL_PARAMS
        self.client = load_or_create_key(key, self.params)
        plain = load_plain(folder, config, embeddings_only=server is not None)
        self.client_parts = client_parts(plain)  # the client's part
        self.embeddings, self.positions, self.lm_head = self.client_parts
        # server=False: a remote one, set by connect; None: one in this process
        self.server = HEServer.from_model(folder, plain, self.params) if server is None else server
        self.stats = Traffic()
        self.client_seconds = 0.0
        self.key_bytes = 0  # evaluation keys sent (in stats.bytes_sent too)
        self.refreshes = 0
        self._keys_for: set[int] = set()
        self._ids = itertools.count(1)
        self._sessions: dict[str, int] = {}  # open KV-cache handles (decoders): tokens held
        self._caches: set[str] = set()  # the server's caches: "{session}/{row}"

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
        from .service import RemoteHEServer, client_digest, shape_of

        backend = HttpBackend(server_url, timeout=timeout, token=server_token, ca_bundle=ca_bundle)
        try:
            info = backend.info()
            if info.get("protocol") != "he":
                raise ServerError(f"the server at {server_url} runs protocol {info.get('protocol')!r}, not 'he'")
            engine = cls(folder, config, key, server=False)
            mismatch = [what for what, mine in (("params_fingerprint", MODEL_PARAMS.fingerprint().hex()),
                                                ("shape", shape_of(config)),
                                                ("embeddings", client_digest(engine.client_parts)))
                        if info.get(what) != mine]
            if mismatch:
                raise ServerError(f"the server at {server_url} runs another model or parameter set than {folder} "
                                  f"(differs in {', '.join(mismatch)})")
            engine.server = RemoteHEServer(backend, info)
        except BaseException:
            backend.close()
            raise
        return engine

    def _blocks(self, block: int) -> set[int]:
        """The blocks one key set serves: a decoder's sequence grows through every power of two
        up to its capacity (one upload for a whole generation), an encoder's ``block``."""
        if self.family == "bert":
            return {block}
        top = capacity(self.params.slots, self.config)
        return {1 << i for i in range(top.bit_length())}

    def _send_keys(self, block: int) -> None:
        """Evaluation keys for the programs of ``block`` (made by the client, once per block)."""
        if block in self._keys_for:
            return
        program = BertProgram if self.family == "bert" else DecoderProgram
        blocks = self._keys_for | self._blocks(block)
        steps = set().union(*(program.steps_needed(self.client, self.config, b) for b in blocks))
        with progress(1, "he: evaluation keys", "set") as bar:
            blob = self.client.evaluation_keys(steps=sorted(steps))
            bar.update(1)
        self._live().load_keys(blob)
        self.stats.record(len(blob), 0, 0.0)
        self.key_bytes += len(blob)
        self._keys_for = blocks

    def _encrypt(self, x: np.ndarray, lay) -> tuple[list[bytes], float]:
        start = time.perf_counter()
        inputs = [self.client.encrypt_plaintext(self.client.encode(v, self.params.levels, self.params.scale))
                  for v in lay.pack(x)]
        return inputs, time.perf_counter() - start

    def _query(self, lay, x: np.ndarray, block: int, valid: np.ndarray, **decoder) -> np.ndarray:
        """One round trip: ``x`` (``[tokens, hidden]``) encrypted, the server's layers, the final
        hidden states decrypted (``[tokens, hidden]``); accounted in :attr:`stats`."""
        start = time.perf_counter()
        inputs, client_time = self._encrypt(x, lay)
        outputs, t = self._live().forward(block, inputs, valid, self._answer, **decoder)
        decrypt_start = time.perf_counter()
        hidden = lay.unpack([self.client.decrypt(self.client.deserialize(o)) for o in outputs])
        self.client_seconds += client_time + time.perf_counter() - decrypt_start
        self.stats.record(sum(map(len, inputs)) + t.bytes_received, sum(map(len, outputs)) + t.bytes_sent,
                          time.perf_counter() - start)
        self.stats.rounds += t.rounds
        self.stats.messages += t.messages
        self.refreshes += t.rounds
        return hidden

    def hidden_states(self, input_ids, inputs_embeds, attention_mask, token_type_ids, position_ids):
        if self.family != "bert":
            raise UnknownOptionError(f"a {self.family} checkpoint under he runs as SecureModelForCausalLM")
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
            hidden = self._query(lay, x, block, valid)
            for slot, r in enumerate(rows):
                out[r] = torch.from_numpy(hidden[slot * block:slot * block + s]).float()
        return out, None

    # -- decoders ------------------------------------------------------------------------------------
    def open_session(self) -> str:
        if self.family == "bert":
            raise UnknownOptionError("a BERT encoder keeps no KV cache")
        sid = str(next(self._ids))
        self._sessions[sid] = 0
        return sid

    def close_session(self, session_id: str) -> None:
        if self._sessions.pop(session_id, None) is not None and self.server:
            self._drop(session_id)

    def _embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor, token_type_ids) -> torch.Tensor:
        """The new tokens' embeddings as the family's model computes them (GPT-2: token plus
        position table, token types through the token table), float64 ``[batch, new, hidden]``."""
        with torch.no_grad():
            emb = self.embeddings(input_ids)
            if self.positions is not None:
                emb = emb + self.positions(position_ids)
                if token_type_ids is not None:
                    emb = emb + self.embeddings(token_type_ids)
            elif token_type_ids is not None:
                raise UnknownOptionError(f"{self.family} takes no token_type_ids")
        return emb.double()

    def logits(self, input_ids, inputs_embeds, attention_mask, position_ids, session, logits_to_keep,
               token_type_ids) -> torch.Tensor:
        """Logits ``(batch, kept, vocab)`` (float32) of the new tokens ``input_ids`` after the
        ``session.length`` tokens cached on the server (None: no cache, a one-off query). One
        query per row of the batch: the row's new embeddings encrypted, its cache continued on
        the server, the final hidden states of the new positions decrypted, the LM head applied
        here. Raises InvalidInputError (``inputs_embeds``, masks, a cache that cannot continue, a
        sequence longer than the layout holds), ServerError."""
        if self.family == "bert":
            raise UnknownOptionError("a BERT encoder has no LM head: use SecureModel")
        if input_ids is None or inputs_embeds is not None:
            raise InvalidInputError("protocol 'he' embeds on the client: pass input_ids, not inputs_embeds")
        batch, new = input_ids.shape
        past = session.length if session is not None else 0
        top = capacity(self.params.slots, self.config)
        if past + new > top:
            raise InvalidInputError(f"protocol 'he' holds at most {top} tokens per sequence for this model "
                                    f"(cached and new), not {past + new}")
        if session is not None:
            held = self._sessions.get(session.session_id)
            if held is None:
                raise InvalidInputError(f"cache {session.session_id} is closed or of another model")
            if past not in (0, held):
                raise InvalidInputError(f"cache {session.session_id} holds {held} tokens, cannot continue from "
                                        f"{past} (he caches cannot be cropped)")
        attention_mask, position_ids = causal_inputs(batch, past, new, attention_mask, position_ids)
        if position_ids.numel() and (position_ids.min() < 0 or position_ids.max() >= max_positions(self.config)):
            raise InvalidInputError(f"position ids must lie in [0, {max_positions(self.config)}) for this model")
        emb = self._embed(input_ids, position_ids, token_type_ids)
        block = next_power_of_two(past + new)
        self._send_keys(block)
        lay, _ = layouts(self.params.slots, self.config, block)
        kept = new if logits_to_keep == 0 else min(logits_to_keep, new)
        hidden = torch.zeros(batch, kept, self.config.hidden_size)
        one_off = session is None
        sid = f"q{next(self._ids)}" if one_off else session.session_id
        done = False
        try:
            for r in range(batch):
                cache = f"{sid}/{r}"
                x = pad_tokens(emb[r].numpy(), new)[(np.arange(lay.tokens) - past) % new]  # new rows at past..
                self._caches.add(cache)
                out = self._query(lay, x, block, attention_mask[r].double().numpy(), cache=cache, past=past,
                                  positions=position_ids[r].long().numpy().copy())
                hidden[r] = torch.from_numpy(out[past + new - kept:past + new]).float()
            done = True
        finally:
            if one_off or not done:  # a failed query leaves the rows' caches apart: the session starts over
                self._drop(sid)
                if not one_off:
                    self._sessions[sid] = 0
        if session is not None:
            session.length = self._sessions[session.session_id] = past + new
        with torch.no_grad():
            return self.lm_head(hidden).float()

    def _drop(self, sid: str) -> None:
        for cache in [c for c in self._caches if c.split("/")[0] == sid]:
            self._caches.discard(cache)
            if self.server:
                self.server.drop(cache)

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
        return {"params": self.params.as_dict(), "bounds": self.server.bounds_dict() if self.server else None,
                "client_seconds": self.client_seconds, "evaluation_key_bytes": self.key_bytes,
                "refreshes": self.refreshes}

    def close(self) -> None:
        if isinstance(self.server, HEServer):
            self.server.programs.clear()
            self.server.caches.clear()
        elif self.server:
            self.server.close()
        self.server = None

    def _live(self):
        """The server, or ServerError once the engine is closed."""
        if not self.server:
            raise ServerError("this model's he engine is closed: load the model again")
        return self.server
