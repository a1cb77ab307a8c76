"""The client side of the mpc protocol for drop-in models: a session over a converted checkpoint.

``hf-secure convert approximate`` checkpoints carry their family, approximations and
normalisation bounds in ``config.hf_secure``. By default the user's machine plays every role
(client, model owner, both servers and dealer, as separate processes), so the weights come from
the local checkpoint; the token ids never leave the client process in the clear. With
``rendezvous="tcp://HOST:PORT"`` only the client runs here: the owner, both servers and the dealer
join from their machines with ``hf-secure party`` (the user's folder then needs only the config).

Each query's reports (per role: bytes, messages, rounds and seconds per scope -- one scope per
layer -- the dealer's offline material and time, and ``bounds``: :data:`QUERY_BOUNDS`) are kept as
``last_report``; ``stats`` sums
server 0's online traffic over the engine's life.
"""

from __future__ import annotations

import itertools
import weakref
from pathlib import Path

import torch
from safetensors.torch import load_file

from ...accounting import Traffic
from ...errors import InvalidInputError, PartyFailedError, UnknownOptionError
from ...families import family
from ...integrity import checkpoint_files
from ..engine import EncoderEngine, SecureEngine, causal_inputs
from .approximations import Approximations, activation_input_bound, calibrate_norms
from .run import MPCSession, online_traffic

def calibrate(model, family_name: str, margin: float = 1.5, **inputs) -> dict[str, float]:
    """The normalisation bounds of a plaintext model of the family ``family_name`` from one pass
    over ``inputs`` (:func:`.approximations.calibrate_norms`)."""
    sites = family(family_name).norm_sites(model.config.num_hidden_layers)
    return calibrate_norms(model, sites, margin, **inputs)


def activation_bound(model, family_name: str, activation: str) -> float:
    """The largest value the activation's segment tests can see in ``model`` (:func:`.approximations.activation_input_bound`)."""
    sites = family(family_name).activation_sites(model.config.num_hidden_layers)
    return activation_input_bound(model, sites, activation)


def load_program(config):
    """The (public) program of a converted checkpoint: architecture and approximations."""
    spec = family(config.hf_secure.get("family", "bert"))
    spec.refuse(config)
    return spec.program.from_config(config, Approximations.from_config(config))


def load_weights(folder: str) -> dict[str, torch.Tensor]:
    """The model owner's weights (float tensors by state-dict key) from a converted checkpoint."""
    weights = {}
    for name in checkpoint_files(folder):
        weights.update(load_file(str(Path(folder, name))))
    return {k: v.float() for k, v in weights.items() if v.is_floating_point() and not k.startswith("pooler.")}


# Per query, beyond what is public by design (docs/threat-model.md): the statistical distance from
# independence of what the sine protocol opens (0: uniform modulo its period, nonlinear.masked_phase),
# and the probability that a truncation fails (0: no failure event for values in their checked
# ranges, core.MPC.truncate_many). Reported with every query's report as "bounds".
QUERY_BOUNDS = {"sine_opening_leak": 0.0, "truncation_failure": 0.0}


class MPCEngine(SecureEngine):
    """A running session of a converted checkpoint, with its accounting: the worked example of
    :class:`~hf_secure.protocols.engine.SecureEngine`.

    :meth:`connect` starts the parties (every role on this machine, or only the client with
    ``rendezvous``) and picks :class:`MPCCausalEngine` or :class:`MPCBertEngine`; each query is one
    :meth:`.run.MPCSession.run`. Options: ``rendezvous`` ("tcp://HOST:PORT" of server 0),
    ``party_key`` (the client's key file, with a rendezvous), ``reveal`` (causal models: "logits"
    or "token"), ``record_views`` (``hf-secure audit``: every party runs here and each server hands
    over what it saw). :meth:`observe` records the public fields every non-client party receives,
    the input shapes the dealer receives and, with ``record_views``, each server's view: its input
    shares, every value it opened and its share of each layer's output, named
    ``"{scope}/{kind}"`` (e.g. ``"layer.3/opened"``), as int64 ring elements.
    """

    name = "mpc"
    options = ("rendezvous", "party_key", "reveal", "record_views")

    def __init__(self, folder: str, config, timeout: float = 300.0, rendezvous: str | None = None,
                 party_key: str | None = None, record_views: bool = False):
        self.vocab_size = config.vocab_size
        weights = load_weights(folder) if rendezvous is None else None
        self.program = load_program(config)
        self.session = MPCSession(self.program, weights, timeout_s=timeout, rendezvous=rendezvous,
                                  party_key=party_key, record_views=record_views)
        self.stats = Traffic()
        self.last_report: dict | None = None
        self._finalizer = weakref.finalize(self, self.session.close)  # stop the parties with the model

    @classmethod
    def connect(cls, folder: str, config, *, causal: bool, dtype: torch.dtype, timeout: float,
                rendezvous: str | None = None, party_key: str | None = None,
                reveal: str | None = None, record_views: bool | None = None) -> "MPCEngine":
        spec = family(config.hf_secure.get("family", "bert"))
        if causal != spec.causal:
            wanted = "SecureModelForCausalLM" if spec.causal else "SecureModel"
            raise UnknownOptionError(f"this {spec.name} checkpoint runs as {wanted} with protocol='mpc'")
        if rendezvous is None and party_key is not None:
            raise UnknownOptionError("party_key needs a rendezvous (parties on several machines)")
        if record_views is not None and not isinstance(record_views, bool):
            raise UnknownOptionError(f"record_views must be True or False, got {record_views!r}")
        record_views = record_views is True
        timeout = max(timeout, 300.0)
        if not causal:
            if reveal is not None:
                raise UnknownOptionError("reveal is an option of causal models with the mpc protocol")
            return MPCBertEngine(folder, config, timeout, rendezvous, party_key, record_views)
        return MPCCausalEngine(folder, config, timeout, rendezvous, party_key, record_views,
                               "logits" if reveal is None else reveal)

    def run(self, input_ids: torch.Tensor, public: dict, token_types: torch.Tensor | None = None) -> torch.Tensor:
        """One query on the private ``input_ids`` (shared as one-hot rows); ``token_types`` (GPT-2) add
        their own one-hot rows: GPT-2 embeds them with the token table, and the embedding is linear."""
        onehot = torch.nn.functional.one_hot(input_ids, self.vocab_size)
        if token_types is not None:
            onehot = onehot + torch.nn.functional.one_hot(token_types, self.vocab_size)
        if self._recorder is not None:
            for party in ("server0", "server1", "dealer"):
                for name, value in public.items():
                    self._recorder(party, name, value)
            self._recorder("dealer", "input_shape", torch.tensor(onehot.shape))
        (out,), self.last_report = self.session.run([onehot], public)
        for role in ("SERVER0", "SERVER1"):  # a server's view leaves the report whether or not it is observed
            view = self.last_report[role].pop("view", ())
            if self._recorder is not None:
                for where, kind, value in view:
                    self._recorder(role.lower(), f"{where}/{kind}", value)
        self.last_report["bounds"] = dict(QUERY_BOUNDS)
        for name, value in online_traffic(self.last_report["SERVER0"]).items():
            setattr(self.stats, name, getattr(self.stats, name) + value)
        self.stats.seconds += self.last_report["SERVER0"]["online_seconds"]
        return out

    @staticmethod
    def _ids_only(input_ids, inputs_embeds) -> torch.Tensor:
        if inputs_embeds is not None or input_ids is None:
            raise InvalidInputError("the mpc and fss protocols take input_ids (shared as one-hot rows)")
        return input_ids

    def report(self) -> dict | None:
        return self.last_report

    def close(self) -> None:
        self._finalizer()


class MPCBertEngine(MPCEngine, EncoderEngine):
    """BERT encoders: final hidden states."""

    def hidden_states(self, input_ids, inputs_embeds, attention_mask, token_type_ids, position_ids):
        input_ids = self._ids_only(input_ids, inputs_embeds)
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        public = {
            "attention_mask": attention_mask,
            "token_type_ids": torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids,
            "position_ids": torch.arange(input_ids.shape[1])[None].expand_as(input_ids)
            if position_ids is None else position_ids,
        }
        return self.run(input_ids, public), None


# What the client of a causal model reconstructs per kept position: the logits, or only the most
# likely token (computed on shares; the logits stay secret).
REVEAL = ("logits", "token")


class MPCCausalEngine(MPCEngine):
    """GPT-2 and Llama: logits, with KV caches kept as shares by the servers.

    With ``reveal="token"`` the servers compute each kept position's argmax on shares and the
    client learns the token id only; :meth:`logits` then returns it as a point mass (0 at the
    token, -inf elsewhere), so greedy decoding picks it and nothing can be read from the rest.

    It is also the "backend" of :class:`~hf_secure.modeling.session_cache.RemoteSessionCache`:
    ``open_session`` names a cache, ``close_session`` frees it on the servers with the next query.
    """

    def __init__(self, folder: str, config, timeout: float = 300.0, rendezvous: str | None = None,
                 party_key: str | None = None, record_views: bool = False, reveal: str = "logits"):
        if reveal not in REVEAL:
            raise UnknownOptionError(f"reveal must be one of {REVEAL}, got {reveal!r}")
        super().__init__(folder, config, timeout, rendezvous, party_key, record_views)
        self.reveal = reveal
        self._ids = itertools.count(1)
        self._lengths: dict[int, int] = {}
        self._drop: list[int] = []

    def open_session(self) -> str:
        cache_id = next(self._ids)
        self._lengths[cache_id] = 0
        return str(cache_id)

    def close_session(self, session_id: str) -> None:
        if self._lengths.pop(int(session_id), None) is not None:
            self._drop.append(int(session_id))

    def logits(self, input_ids, inputs_embeds, attention_mask, position_ids, session, logits_to_keep,
               token_type_ids) -> torch.Tensor:
        """Logits ``(batch, kept, vocab)`` of the new tokens ``input_ids`` after the ``session.length``
        tokens cached (None: no cache); with ``reveal="token"`` a point mass at each kept position's
        most likely token instead (float32: 0 there, -inf elsewhere).

        Without ``position_ids`` positions run ``past .. past + new - 1`` in every row, padded or
        not, as the plain transformers model numbers them. Raises InvalidInputError (masks, cache),
        OutOfRangeError (a value left its approximation's range), PartyFailedError.
        """
        input_ids, token_types = self._ids_only(input_ids, inputs_embeds), token_type_ids
        cache_id = int(session.session_id) if session is not None else 0
        past = session.length if session is not None else 0
        if session is not None and past > self._lengths.get(cache_id, -1):
            raise InvalidInputError(f"cache {session.session_id} holds {self._lengths.get(cache_id, 0)} tokens, "
                                     f"cannot continue from {past}")
        batch, new = input_ids.shape
        self.program.check_length(past + new)  # refused here, before anything is sent
        attention_mask, position_ids = causal_inputs(batch, past, new, attention_mask, position_ids)
        public = {"attention_mask": attention_mask.long(), "position_ids": position_ids.long(),
                  "cache": torch.tensor([cache_id]), "past_length": torch.tensor([past]),
                  "logits_to_keep": torch.tensor([logits_to_keep]), "drop": torch.tensor(self._drop, dtype=torch.long),
                  "token_only": torch.tensor([int(self.reveal == "token")])}
        logits = self.run(input_ids, public, token_types)
        if self.reveal == "token":
            logits = self._point_mass(logits)
        self._drop = [] if session is not None else [0]
        if session is not None:
            session.length = self._lengths[cache_id] = past + new
        return logits

    def hidden_states(self, input_ids, inputs_embeds, attention_mask, token_type_ids, position_ids):
        raise UnknownOptionError("the mpc program of a causal model ends in its LM head: use SecureModelForCausalLM")

    def _point_mass(self, index: torch.Tensor) -> torch.Tensor:
        """The argmax the servers computed (fixed-point integers ``(batch, kept)``) as point-mass logits."""
        tokens = index.round().long()
        if (index - tokens).abs().max() > 0.01 or tokens.min() < 0 or tokens.max() >= self.vocab_size:
            raise PartyFailedError("the servers' token output is not a token id: their shares are inconsistent")
        logits = torch.full((*tokens.shape, self.vocab_size), float("-inf"))
        return logits.scatter_(-1, tokens[..., None], 0.0)
