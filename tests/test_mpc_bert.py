"""A BERT encoder through the mpc protocol against plaintext transformers."""

from __future__ import annotations

import torch

from hf_secure.protocols.mpc.bert import Approximations, BertProgram, calibrate_layer_norms
from hf_secure.protocols.mpc.run import run_program

from .conftest import make_tiny


def _inputs(model, ids, mask):
    onehot = torch.nn.functional.one_hot(ids, model.config.vocab_size)
    public = {
        "position_ids": torch.arange(ids.shape[1])[None].expand_as(ids),
        "token_type_ids": torch.zeros_like(ids),
        "attention_mask": mask,
    }
    weights = {k: v for k, v in model.state_dict().items()
               if v.is_floating_point() and not k.startswith("pooler.")}
    return onehot, public, weights


def test_tiny_bert_matches_plaintext(tmp_path):
    """Exact-style path (SecFormer GeLU, comparison-based softmax, Goldschmidt LayerNorm)."""
    model = make_tiny("bert", tmp_path / "bert")
    ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0  # padding at the end
    bounds = calibrate_layer_norms(model, ids, mask)
    approx = Approximations(gelu="secformer", softmax="exact", ln_bounds=bounds)
    onehot, public, weights = _inputs(model, ids, mask)
    (hidden,), report = run_program(BertProgram.from_config(model.config, approx), [onehot], weights, public)
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).last_hidden_state
    valid = mask[0].bool()
    err = (hidden[0, valid] - expected[0, valid]).abs().max().item()
    assert err < 0.05, err
    assert report["DEALER"]["offline_bytes"] > 0
