"""The one interface between the drop-in models and a protocol: :class:`SecureEngine`.

``SecureModel`` and ``SecureModelForCausalLM`` check the user's arguments (shapes, dtypes, ranges,
unknown options) the way transformers' models do, then call the engine of the checkpoint's
protocol, found by name in :data:`hf_secure.engines.PROTOCOLS`. They contain no protocol branch: a
new protocol is a package under ``protocols/`` with a ``SecureEngine`` subclass, plus one line in
that registry.

The worked example is :class:`hf_secure.protocols.mpc.client.MPCEngine` (parties as processes, one
session per bound model); :class:`hf_secure.protocols.permute.engine.PermuteEngine` is the other
(a key on the client, a server in this process or behind HTTP).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, ClassVar

import torch

from ..errors import InvalidInputError, UnknownOptionError

# What a non-client party sees, as the engine records it: (party, what, tensor), e.g.
# ("server", "inputs_embeds", tensor); the leakage audit (issue 12) is to feed it to its attacks.
Recorder = Callable[[str, str, torch.Tensor], None]


class SecureEngine(ABC):
    """The client side of one protocol, bound to one converted checkpoint.

    Contract (every method may raise the package's errors, never a bare ValueError):

    * :meth:`connect` -- bind: keys, servers or parties, from the checkpoint folder and the options
      the protocol declares in :attr:`options` (any other option: UnknownOptionError).
    * :meth:`hidden_states` -- ``(last_hidden_state [batch, seq, hidden], pooler_output or None)``.
    * :meth:`logits` -- ``[batch, kept, vocab]`` float logits of the last ``logits_to_keep``
      positions (0: all), continuing the KV cache ``cache`` (a
      :class:`~hf_secure.modeling.session_cache.RemoteSessionCache` whose ``length`` the engine
      advances; None: no cache).
    * :meth:`open_session` / :meth:`close_session` -- the KV cache handle's life on the other side.
    * :attr:`stats` (a :class:`~hf_secure.accounting.Traffic`) and :meth:`report` -- what the
      protocol cost: totals since binding, and the last query's per-party report (or None).
    * :meth:`observe` -- record what each non-client party receives from the client, for the
      audit (each engine's docstring says what it records and what not).
    * :meth:`close` -- release servers, parties and sessions; idempotent.

    Arguments arrive checked by the model (ids in the vocabulary, masks 0/1 of the right shape,
    positions within the model's); an argument a protocol cannot honour (e.g. ``inputs_embeds``
    under mpc) raises InvalidInputError or UnknownOptionError here.
    """

    name: ClassVar[str]
    options: ClassVar[tuple[str, ...]]  # the options connect() takes beyond folder/config/causal/dtype/timeout
    vocab_size: int
    reveal: str = "logits"  # what logits() hands back: "logits", or "token" (a point mass at the token)
    creates_keys: bool = False  # the client makes its own key on first use (he); else the owner issues it

    @classmethod
    def check_options(cls, options: dict) -> None:
        """UnknownOptionError for an option this protocol does not take (given, i.e. not None)."""
        unknown = sorted(name for name, value in options.items() if value is not None and name not in cls.options)
        if unknown:
            raise UnknownOptionError(f"{', '.join(unknown)}: not an option of the {cls.name} protocol "
                                     f"(it takes {', '.join(cls.options) or 'none'})")

    @classmethod
    @abstractmethod
    def connect(cls, folder: str, config, *, causal: bool, dtype: torch.dtype, timeout: float,
                **options) -> "SecureEngine":
        """Bind to the converted checkpoint in ``folder`` (its ``config``); ``causal``: for a
        ``SecureModelForCausalLM``. ``options`` are the protocol's own (:attr:`options`)."""

    @abstractmethod
    def hidden_states(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None,
                      attention_mask: torch.Tensor | None, token_type_ids: torch.Tensor | None,
                      position_ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Final hidden states (and BERT's pooled output) for one batch."""

    @abstractmethod
    def logits(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None,
               attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None, cache,
               logits_to_keep: int, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        """Logits of the kept positions of the new tokens, after the ``cache.length`` cached ones."""

    @abstractmethod
    def open_session(self) -> str:
        """A new KV cache on the other side; its id."""

    @abstractmethod
    def close_session(self, session_id: str) -> None:
        """Free a KV cache (unknown ids are ignored)."""

    _recorder: Recorder | None = None  # set by observe(); each engine calls it where its parties receive

    def observe(self, recorder: Recorder | None) -> None:
        """From now on, call ``recorder(party, what, tensor)`` for what each non-client party
        receives (None: stop)."""
        self._recorder = recorder

    def report(self) -> dict | None:
        """The last query's report per party (protocols that measure one), else None."""
        return None

    @abstractmethod
    def close(self) -> None:
        """Release everything the engine holds; safe to call twice."""


def causal_inputs(batch: int, past: int, new: int, attention_mask: torch.Tensor | None,
                  position_ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A causal query's attention mask (``[batch, past + new]``, default all ones) and position
    ids (``[batch, new]``, default ``past .. past + new - 1`` in every row, padded or not, as the
    plain transformers model numbers them). InvalidInputError for a mask of another shape."""
    if attention_mask is None:
        attention_mask = torch.ones(batch, past + new, dtype=torch.long)
    if attention_mask.shape != (batch, past + new):
        raise InvalidInputError(f"attention_mask must cover past and new tokens: shape {(batch, past + new)}, "
                                f"got {tuple(attention_mask.shape)}")
    if position_ids is None:
        position_ids = torch.arange(past, past + new)[None].expand(batch, -1)
    return attention_mask, position_ids


class EncoderEngine(SecureEngine):
    """An engine of encoders (BERT): no LM head, no KV cache; the causal-model calls are refused."""

    def logits(self, input_ids, inputs_embeds, attention_mask, position_ids, cache, logits_to_keep, token_type_ids):
        raise UnknownOptionError("a BERT encoder has no LM head: use SecureModel")

    def open_session(self) -> str:
        raise UnknownOptionError("a BERT encoder keeps no KV cache")

    def close_session(self, session_id: str) -> None:
        raise UnknownOptionError("a BERT encoder keeps no KV cache")
