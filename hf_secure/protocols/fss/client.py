"""The client side of the fss protocol for drop-in models: a session over an unmodified checkpoint.

Sigma runs models as they are: ``SecureModel.from_pretrained(DIR, protocol="fss")`` takes a
plain transformers checkpoint of a supported family (BERT, GPT-2, Llama, Mistral, Qwen2) with no
conversion step. By default this machine plays every role (client, model owner, both servers,
dealer: one process each), so the weights come from the local checkpoint and the token ids never
leave the client process in the clear; with ``rendezvous`` only the client runs here and the
other roles join with ``hf-secure party --protocol fss``.

Options: ``rendezvous``, ``party_key`` (as for mpc), ``device`` ("cpu" or "cuda": where the
servers compute; "cuda" falls back to the CPU, with a warning, on a machine without a GPU) and
``key_dir`` (where the servers keep the dealer's keys until used, in private subfolders per
server; default a private temporary folder per server). With a rendezvous each server sets
these itself (``hf-secure party --device --key-dir``). Queries wait at least 300 s, as mpc's.
"""

from __future__ import annotations

import itertools
import warnings
import weakref
from pathlib import Path

import torch

from ...accounting import Traffic
from ...errors import UnknownOptionError
from ...families import family_of
from ..mpc.client import MPCBertEngine, MPCCausalEngine, MPCEngine, load_weights
from .core import Params
from .models import program_for
from .run import FSSSession

# Per query, beyond what is public by design: a truncation never fails (exact, with the mask's
# top bit and a comparison on the low bits, core.FSS.truncate), and no opening leaks (every mask
# is fresh and uniform).
QUERY_BOUNDS = {"truncation_failure": 0.0, "opening_leak": 0.0}
DEVICES = ("cpu", "cuda")


def plain_weights(folder: str, family: str) -> dict[str, torch.Tensor]:
    """The float weights of an unmodified checkpoint, keyed as the family's base model expects
    (``BertModel``, ``GPT2LMHeadModel``, ``*ForCausalLM``): a task model's ``bert.`` prefix is
    dropped, a bare ``GPT2Model``'s keys get ``transformer.``."""
    weights = load_weights(folder)
    if family == "bert":
        return {k[len("bert."):] if k.startswith("bert.") else k: v for k, v in weights.items()
                if not k.startswith(("cls.", "classifier.", "bert.pooler."))}
    if family == "gpt2" and not any(k.startswith("transformer.") for k in weights):
        return {f"transformer.{k}": v for k, v in weights.items()}
    return weights


def server_device(device: str | None) -> str:
    if device is None:
        return "cpu"
    if device not in DEVICES:
        raise UnknownOptionError(f"device must be one of {DEVICES}, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        warnings.warn("device='cuda': no GPU here, the fss servers compute on the CPU", stacklevel=3)
        return "cpu"
    return device


class FSSEngine(MPCEngine):
    """A running fss session (:class:`.run.FSSSession`) and its accounting; queries, reports,
    KV-cache handles and ``record_views`` (``hf-secure audit``: each server's input shares and
    every masked value it opened, named ``"{scope}/{kind}"``) work as for
    :class:`~..mpc.client.MPCEngine`. ``params``: the ring and fixed point of every query."""

    name = "fss"
    options = ("rendezvous", "party_key", "device", "key_dir", "record_views")

    def __init__(self, folder: str, config, timeout: float = 300.0, rendezvous: str | None = None,
                 party_key: str | None = None, device: str | None = None, key_dir: str | None = None,
                 record_views: bool = False):
        self.vocab_size = config.vocab_size
        spec = family_of(config)
        self.program = program_for(config, spec.name)
        self.params = Params()
        weights = plain_weights(folder, spec.name) if rendezvous is None else None
        options = {"device": server_device(device), "key_dir": key_dir}
        self.session = FSSSession(self.program, weights, self.params, timeout_s=timeout, rendezvous=rendezvous,
                                  party_key=party_key, server_options=options, record_views=record_views)
        self.stats = Traffic()
        self.last_report: dict | None = None
        self._finalizer = weakref.finalize(self, self.session.close)

    @classmethod
    def connect(cls, folder: str, config, *, causal: bool, dtype: torch.dtype, timeout: float,
                rendezvous: str | None = None, party_key: str | None = None, device: str | None = None,
                key_dir: str | None = None, record_views: bool | None = None) -> "FSSEngine":
        spec = family_of(config)
        if causal != spec.causal:
            wanted = "SecureModelForCausalLM" if spec.causal else "SecureModel"
            raise UnknownOptionError(f"this {spec.name} checkpoint runs as {wanted} with protocol='fss'")
        if rendezvous is None and party_key is not None:
            raise UnknownOptionError("party_key needs a rendezvous (parties on several machines)")
        if rendezvous is not None and (device is not None or key_dir is not None):
            raise UnknownOptionError("with a rendezvous each server sets its own device and key folder "
                                     "(`hf-secure party --protocol fss --device ... --key-dir ...`)")
        if key_dir is not None and Path(key_dir).exists() and not Path(key_dir).is_dir():
            raise UnknownOptionError(f"key_dir {key_dir} exists and is not a folder")
        if record_views is not None and not isinstance(record_views, bool):
            raise UnknownOptionError(f"record_views must be True or False, got {record_views!r}")
        engine = FSSCausalEngine if causal else FSSBertEngine
        return engine(folder, config, max(timeout, 300.0), rendezvous, party_key, device, key_dir, record_views is True)

    def run(self, input_ids, public, token_types=None):
        out = super().run(input_ids, public, token_types)
        self.last_report["bounds"] = dict(QUERY_BOUNDS)
        return out


class FSSBertEngine(FSSEngine, MPCBertEngine):
    """BERT encoders: final hidden states."""


class FSSCausalEngine(FSSEngine, MPCCausalEngine):
    """GPT-2 and Llama-like decoders: logits, KV caches kept masked by the servers."""

    def __init__(self, *args):
        FSSEngine.__init__(self, *args)
        self.reveal = "logits"
        self._ids, self._lengths, self._drop = itertools.count(1), {}, []
