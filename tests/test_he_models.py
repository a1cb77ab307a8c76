"""The he protocol through the drop-in model and the pipeline, on a tiny BERT, and its faults."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertModel, pipeline

from hf_secure import SecureModel
from hf_secure.errors import CorruptKeyError, KeyMismatchError, MissingKeyError, UnknownOptionError, UnsupportedModelError
from hf_secure.keys import key_store_dir
from hf_secure.protocols.he.backend import CKKS, Params
from hf_secure.protocols.he.client import MODEL_PARAMS

from .conftest import make_he_bert


@pytest.fixture(scope="module")
def one_layer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("he-bert")
    model, tokenizer = make_he_bert(folder)
    return model, folder, tokenizer


def test_pipeline_and_key_store(one_layer):
    model, folder, tokenizer = one_layer
    extractor = pipeline("secure-feature-extraction", model=str(folder), protocol="he")
    text = "private inference with ciphertexts"
    got = torch.tensor(extractor(text))
    with torch.no_grad():
        want = model(**tokenizer(text, return_tensors="pt")).last_hidden_state
    assert got.shape == want.shape and (got - want).abs().max() < 1e-3
    # a batch with a row masked entirely: no error, finite values (transformers' output there is
    # padding too: its additive mask makes the attention uniform)
    ids = torch.tensor([[5, 9, 11, 3, 7], [8, 2, 6, 4, 1]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0]])
    got = extractor.model(input_ids=ids, attention_mask=mask).last_hidden_state
    with torch.no_grad():
        want = model(ids, attention_mask=mask).last_hidden_state
    assert (got[0, :3] - want[0, :3]).abs().max() < 1e-3 and torch.isfinite(got[1]).all()
    stats = extractor.secure_stats
    assert stats["rounds"] > 1 and stats["bytes_sent"] > 0  # a query and its refreshes, each one round
    keys = list(key_store_dir().glob("he-*.key"))
    assert len(keys) == 1 and oct(keys[0].stat().st_mode & 0o777) == "0o600"  # made once, private
    assert oct(key_store_dir().stat().st_mode & 0o777) == "0o700"


def test_wrong_missing_and_corrupt_keys(one_layer, tmp_path):
    _, folder, _ = one_layer
    with pytest.raises(MissingKeyError, match="no he key file"):
        SecureModel.from_pretrained(folder, protocol="he", key=str(tmp_path / "absent.key"))
    bad = tmp_path / "bad.key"
    bad.write_bytes(b"\0" * 200)
    with pytest.raises(CorruptKeyError):
        SecureModel.from_pretrained(folder, protocol="he", key=str(bad))
    other = tmp_path / "other.key"  # a key of other CKKS parameters
    other.write_bytes(CKKS.keygen(Params(2**14, (60,) + (40,) * 8 + (58,))).secret_key_bytes())
    with pytest.raises(KeyMismatchError, match="other CKKS parameters"):
        SecureModel.from_pretrained(folder, protocol="he", key=str(other))
    good = tmp_path / "good.key"
    blob = bytearray(CKKS.keygen(MODEL_PARAMS).secret_key_bytes())
    blob[-50] ^= 1  # tampered
    good.write_bytes(bytes(blob))
    with pytest.raises(CorruptKeyError, match="altered"):
        SecureModel.from_pretrained(folder, protocol="he", key=str(good))


def test_unsupported_and_unknown_options(one_layer, tmp_path):
    _, folder, _ = one_layer
    for name, config in {"relu": dict(hidden_act="relu"), "head": dict(hidden_size=48, num_attention_heads=4)}.items():
        BertModel(BertConfig(num_hidden_layers=1, intermediate_size=32, vocab_size=20,
                             **{"hidden_size": 32, "num_attention_heads": 2, **config})).save_pretrained(tmp_path / name)
        with pytest.raises(UnsupportedModelError, match="he"):  # at loading, before any key is made
            SecureModel.from_pretrained(tmp_path / name, protocol="he")
    with pytest.raises(UnknownOptionError, match="need a server_url"):
        SecureModel.from_pretrained(folder, protocol="he", server_token="t0k3n")
    with pytest.raises(UnknownOptionError):
        SecureModel.from_pretrained(folder, protocol="he", colour="blue")
