"""The client side of the mpc protocol for drop-in models: a session over a converted BERT.

``hf-secure convert approximate`` checkpoints carry their approximations and LayerNorm bounds in
``config.hf_secure``. Here the user's machine plays every role by default (client, model owner,
both servers and dealer, as separate processes), so the weights come from the local checkpoint;
the token ids never leave the client process in the clear.
"""

from __future__ import annotations

import weakref
from pathlib import Path

import torch
from safetensors.torch import load_file

from ...accounting import Traffic
from .bert import Approximations, BertProgram
from .run import MPCSession, online_traffic


class MPCBertEngine:
    """Runs the BERT encoder of a converted checkpoint through an :class:`MPCSession`."""

    def __init__(self, folder: str, config, timeout: float = 300.0):
        self.vocab_size = config.vocab_size
        weights = {}
        for path in sorted(Path(folder).glob("*.safetensors")):
            weights.update(load_file(str(path)))
        weights = {k: v.float() for k, v in weights.items() if v.is_floating_point() and not k.startswith("pooler.")}
        program = BertProgram.from_config(config, Approximations.from_config(config))
        self.session = MPCSession(program, weights, timeout_s=timeout)
        self.stats = Traffic()
        self._finalizer = weakref.finalize(self, self.session.close)  # stop the parties with the model

    def hidden_states(self, input_ids: torch.Tensor, attention_mask=None, token_type_ids=None,
                      position_ids=None) -> torch.Tensor:
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        public = {
            "attention_mask": attention_mask,
            "token_type_ids": torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids,
            "position_ids": torch.arange(input_ids.shape[1])[None].expand_as(input_ids)
            if position_ids is None else position_ids,
        }
        onehot = torch.nn.functional.one_hot(input_ids, self.vocab_size)
        (hidden,), reports = self.session.run([onehot], public)
        traffic = online_traffic(reports["SERVER0"])
        for name, value in traffic.items():
            setattr(self.stats, name, getattr(self.stats, name) + value)
        self.stats.seconds += reports["SERVER0"]["online_seconds"]
        return hidden

    def close(self) -> None:
        self._finalizer()
