"""The server's model runtime, shared by the HTTP service and the in-process backend.

The server loads a converted checkpoint with plain transformers Auto classes (no hf_secure model
code), after checking its weight files against the digests in ``config.json``. It never holds a
key: what it receives is already permuted, and what it returns is permuted.

Causal models keep one KV cache per session. Every forward names the number of tokens the client
believes are cached (``past_length``): a shorter value crops the cache (a new generation that
reuses a prefix), a longer one is an error (the server lost state, e.g. it restarted); 0 starts
afresh, with any batch size, which a continuation must keep.

Sessions belong to the caller that opened them (the name of its bearer token, see
:mod:`hf_secure.server.access`): another caller naming the id gets the same answer as for an
unknown id. Each caller has its own quotas, on open sessions and on the bytes its KV caches hold;
a request past a quota is refused (:class:`QuotaExceededError`), nobody's session is evicted to
make room. Sessions idle for longer than the TTL are dropped.
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass, field

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, DynamicCache

from ..compat import CACHE_NAME
from ..errors import (
    InvalidRequestError,
    NotConvertedError,
    QuotaExceededError,
    TamperedCheckpointError,
    UnknownSessionError,
)
from ..integrity import verify_weights
from ..families import family, family_of

OUTPUTS = ("hidden", "logits")
INPUT_NAMES = ("input_ids", "inputs_embeds", "attention_mask", "position_ids", "token_type_ids")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


PLAIN_PROTOCOLS = ("fss", "he")  # protocols that run an unmodified transformers checkpoint


def read_section(config, source: str = "this checkpoint", protocol: str | None = None) -> dict:
    """The ``hf_secure`` section of a converted checkpoint's config.

    Raises NotConvertedError (naming the conversion command) when there is none: a plain
    transformers checkpoint. TamperedCheckpointError when the section is there but malformed.
    """
    section = getattr(config, "hf_secure", None)
    if section is None and protocol in PLAIN_PROTOCOLS:  # they run unmodified checkpoints
        from ..families import family_of

        return {"protocol": protocol, "family": family_of(config).name}
    if section is None:
        commands = {
            "permute": f"hf-secure convert permute {source} --out CONVERTED --key-out client.key.safetensors",
            "mpc": f"hf-secure convert approximate {source} --out CONVERTED",
        }
        wanted = [commands[protocol]] if protocol in commands else list(commands.values())
        raise NotConvertedError(
            f"{source} is a plain transformers checkpoint, not converted for hf_secure (its config.json has no "
            f"'hf_secure' section). Convert it first: {' or '.join(f'`{c}`' for c in wanted)}, then load CONVERTED; "
            "or run it as it is with protocol='fss' or protocol='he'."
        )
    if not isinstance(section, dict) or "protocol" not in section:
        raise TamperedCheckpointError(f"the 'hf_secure' section of {source}'s config.json is malformed")
    return section


ANONYMOUS = "anonymous"  # the one caller of a server without tokens


@dataclass
class Session:
    owner: str
    cache: DynamicCache
    length: int = 0
    batch: int = 0
    last_used: float = field(default_factory=time.monotonic)


class ModelServer:
    """Runs one converted checkpoint for many clients.

    Args:
        folder: a converted checkpoint; its weight files are checked against their digests.
        dtype: float dtype the model runs in.
        max_sessions: open KV-cache sessions each caller may hold.
        max_cache_bytes: bytes of keys and values each caller's sessions may hold together.
        session_ttl_s: seconds a session may stay idle before it is dropped.
    """

    def __init__(
        self,
        folder: str,
        dtype: torch.dtype = torch.float32,
        max_sessions: int = 64,
        max_cache_bytes: int = 1 << 30,
        session_ttl_s: float = 900.0,
    ):
        config = AutoConfig.from_pretrained(folder)
        self.section = read_section(config, folder)
        verify_weights(folder, self.section.get("weights", {}))
        architecture = (config.architectures or [""])[0]
        self.causal = family_of(config).causal
        self.has_lm_head = architecture.endswith(("ForCausalLM", "LMHeadModel"))
        loader = AutoModelForCausalLM if self.has_lm_head else AutoModel
        self.model = loader.from_pretrained(folder, dtype=dtype).eval()
        self.config = self.model.config
        self.max_sessions = max_sessions
        self.max_cache_bytes = max_cache_bytes
        self.session_ttl_s = session_ttl_s
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()
        self.kv_bytes_per_token = self._measure_kv_bytes() if self.causal else 0

    # -- sessions ---------------------------------------------------------------------------
    def info(self) -> dict:
        return {
            "protocol": self.section["protocol"],
            "version": self.section["version"],
            "key_fingerprint": self.section["key_fingerprint"],
            "embeddings": self.section["embeddings"],
            "family": self.section["family"],
            "weights": self.section["weights"],
            "outputs": ["hidden", "logits"] if self.has_lm_head else ["hidden"],
            "sessions": self.causal,
        }

    def open_session(self, owner: str = ANONYMOUS) -> str:
        """A new session of ``owner``; QuotaExceededError when it already holds ``max_sessions``."""
        if not self.causal:
            raise InvalidRequestError("this model is not causal: it has no sessions, call forward without one")
        with self._lock:
            self._expire()
            held = sum(s.owner == owner for s in self._sessions.values())
            if held >= self.max_sessions:
                raise QuotaExceededError(
                    f"{owner!r} holds {held} open sessions, its quota: close one (DELETE /v1/sessions/ID) or let "
                    f"idle ones expire ({self.session_ttl_s:g} s)")
            sid = secrets.token_hex(16)
            self._sessions[sid] = Session(owner, DynamicCache(config=self.config))
            return sid

    def close_session(self, sid: str, owner: str = ANONYMOUS) -> None:
        """Drop ``owner``'s session ``sid``; UnknownSessionError if it holds none of that id."""
        with self._lock:
            self._owned(sid, owner)
            del self._sessions[sid]

    def close_all(self) -> int:
        """Drop every session (server shutdown); returns how many there were."""
        with self._lock:
            count = len(self._sessions)
            self._sessions.clear()
            return count

    def session_stats(self) -> dict[str, dict[str, int]]:
        """Per caller: open sessions and the bytes their KV caches hold."""
        with self._lock:
            stats: dict[str, dict[str, int]] = {}
            for session in self._sessions.values():
                entry = stats.setdefault(session.owner, {"sessions": 0, "cache_bytes": 0})
                entry["sessions"] += 1
                entry["cache_bytes"] += self._cache_bytes(session.batch, session.length)
            return stats

    def _owned(self, sid: str, owner: str) -> Session:
        session = self._sessions.get(sid)
        if session is None or session.owner != owner:  # another caller's session reads as unknown
            raise UnknownSessionError(f"unknown or expired session {sid!r}")
        return session

    def _expire(self) -> None:
        now = time.monotonic()
        for sid in [s for s, sess in self._sessions.items() if now - sess.last_used > self.session_ttl_s]:
            del self._sessions[sid]

    def _cache_bytes(self, batch: int, length: int) -> int:
        return batch * length * self.kv_bytes_per_token

    def _measure_kv_bytes(self) -> int:
        """Bytes of keys and values the model caches per token of one sequence, measured by running
        it on one token (layer count, key/value heads, head size and dtype as transformers uses them)."""
        cache = DynamicCache(config=self.config)
        embeds = torch.zeros(1, 1, self.config.hidden_size, dtype=self.model.dtype)
        with torch.inference_mode():
            self.model.base_model(inputs_embeds=embeds, **{CACHE_NAME: cache}, use_cache=True)
        return sum(t.nbytes for layer in cache.layers for t in (layer.keys, layer.values))

    def _check_cache_quota(self, owner: str, session: Session, batch: int, length: int) -> None:
        others = sum(self._cache_bytes(s.batch, s.length) for s in self._sessions.values()
                     if s.owner == owner and s is not session)
        wanted = self._cache_bytes(batch, length)
        if others + wanted > self.max_cache_bytes:
            raise QuotaExceededError(
                f"{owner!r} would hold {(others + wanted) / 2**20:.1f} MiB of KV cache, over its quota of "
                f"{self.max_cache_bytes / 2**20:.1f} MiB: close sessions or send shorter sequences")

    # -- compute ----------------------------------------------------------------------------
    def forward(
        self,
        inputs: dict[str, torch.Tensor],
        session_id: str | None = None,
        past_length: int = 0,
        output: str = "hidden",
        logits_to_keep: int = 0,
        owner: str = ANONYMOUS,
    ) -> tuple[dict[str, torch.Tensor], int]:
        """Run the model on already-transformed inputs; return (outputs, cached length).

        Raises InvalidRequestError for malformed inputs, UnknownSessionError for a session that
        ``owner`` does not hold, QuotaExceededError when the session would grow past the
        owner's KV-cache quota.
        """
        if output not in OUTPUTS or (output == "logits" and not self.has_lm_head):
            raise InvalidRequestError(f"output {output!r} not available; this server offers {self.info()['outputs']}")
        if logits_to_keep < 0 or past_length < 0:
            raise InvalidRequestError("logits_to_keep and past_length must be >= 0")
        kwargs = self._validate(inputs, past_length)
        batch, seq = (kwargs["input_ids"] if "input_ids" in kwargs else kwargs["inputs_embeds"]).shape[:2]
        with self._lock, torch.inference_mode():
            cache = None
            if session_id is not None:
                self._expire()
                session = self._owned(session_id, owner)
                if past_length > session.length:
                    raise InvalidRequestError(
                        f"session holds {session.length} tokens but the request continues after {past_length}"
                    )
                if past_length and batch != session.batch:
                    raise InvalidRequestError(f"session holds a batch of {session.batch}, the request sends {batch}")
                self._check_cache_quota(owner, session, batch, past_length + seq)
                if past_length == 0:
                    session.cache = DynamicCache(config=self.config)
                elif past_length < session.length:
                    session.cache.crop(past_length)
                session.batch = batch
                cache = session.cache
                session.last_used = time.monotonic()
            elif past_length:
                raise InvalidRequestError("past_length without a session")
            if self.causal:
                kwargs.update({CACHE_NAME: cache, "use_cache": cache is not None})
            result = self._run(kwargs, output, logits_to_keep)
            if cache is not None:
                session.length = cache.get_seq_length()
                return result, session.length
            return result, 0

    def _run(self, kwargs: dict, output: str, logits_to_keep: int) -> dict[str, torch.Tensor]:
        if output == "logits":
            return {"logits": self.model(**kwargs, logits_to_keep=logits_to_keep).logits}
        out = self.model.base_model(**kwargs)
        hidden = out.last_hidden_state
        result = {"hidden": hidden[:, -logits_to_keep:] if logits_to_keep else hidden}
        if getattr(out, "pooler_output", None) is not None:
            result["pooled"] = out.pooler_output
        return result

    def _validate(self, inputs: dict[str, torch.Tensor], past_length: int) -> dict[str, torch.Tensor]:
        unknown = set(inputs) - set(INPUT_NAMES)
        if unknown:
            raise InvalidRequestError(f"unknown inputs {sorted(unknown)}; expected some of {INPUT_NAMES}")
        if ("input_ids" in inputs) == ("inputs_embeds" in inputs):
            raise InvalidRequestError("send exactly one of input_ids and inputs_embeds")
        if "input_ids" in inputs:
            if self.section["embeddings"] == "client":
                raise InvalidRequestError("this checkpoint keeps token embeddings on the client: send inputs_embeds")
            ids = inputs["input_ids"]
            if ids.dtype != torch.int64 or ids.dim() != 2 or ids.numel() == 0:
                raise InvalidRequestError("input_ids must be a non-empty int64 tensor [batch, seq]")
            if ids.min() < 0 or ids.max() >= self.config.vocab_size:
                raise InvalidRequestError(f"input_ids out of range [0, {self.config.vocab_size})")
            batch, seq = ids.shape
        else:
            embeds = inputs["inputs_embeds"]
            hidden = self.config.hidden_size
            if embeds.dtype not in FLOAT_DTYPES or embeds.dim() != 3 or embeds.shape[-1] != hidden:
                raise InvalidRequestError(f"inputs_embeds must be float [batch, seq, {hidden}]")
            if embeds.shape[0] == 0 or embeds.shape[1] == 0:
                raise InvalidRequestError("inputs_embeds is empty")
            if not torch.isfinite(embeds).all():
                raise InvalidRequestError("inputs_embeds contains NaN or infinity")
            inputs = {**inputs, "inputs_embeds": embeds.to(self.model.dtype)}
            batch, seq = embeds.shape[:2]
        expected = {"attention_mask": past_length + seq, "position_ids": seq, "token_type_ids": seq}
        for name, length in expected.items():
            t = inputs.get(name)
            if t is not None and (t.dtype != torch.int64 or tuple(t.shape) != (batch, length)):
                raise InvalidRequestError(f"{name} must be int64 [{batch}, {length}], got {t.dtype} {tuple(t.shape)}")
        positions = inputs.get("position_ids")
        limit = getattr(self.config, "max_position_embeddings", None) or getattr(self.config, "n_positions", None)
        if limit and (past_length + seq > limit or (positions is not None and (positions.min() < 0 or positions.max() >= limit))):
            raise InvalidRequestError(f"sequence longer than the model's {limit} positions")
        types = inputs.get("token_type_ids")
        if types is not None:
            # BERT has a token type table; GPT-2 embeds token types with its token table; Llama has none.
            spec = family(self.section["family"])
            high = self.config.vocab_size if spec.token_types_in_vocab else getattr(self.config, "type_vocab_size", None)
            if high is None:
                raise InvalidRequestError(f"token_type_ids do not apply to {self.section['family']} models")
            if types.min() < 0 or types.max() >= high:
                raise InvalidRequestError(f"token_type_ids out of range [0, {high})")
        return dict(inputs)
