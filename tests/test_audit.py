"""``hf-secure audit``: the attacks work where they should, stay at chance where they should, and bad
requests are refused.

* sanity: a view in the clear basis (internal permutations off) gives the prompt back, and so does
  a residual view once the key is recovered from the weights;
* a permuted view of the demo GPT-2 (real trained weights, shipped with the package) gives most
  of the prompt back by sorted-L1 vocabulary matching, and the weights give the key back;
* each mpc server's view (input shares, opened values, output shares) stays at chance, and so does
  each fss server's (input shares, masked values it opened);
* unknown protocols, a checkpoint of another protocol, a permute audit without its key or without
  the original weights: clear errors.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer, pipeline

from hf_secure import SecureModelForCausalLM
from hf_secure.audit import audit
from hf_secure.audit.probe import Probe, Site, sites_of
from hf_secure.cli import main
from hf_secure.convert import convert_approximate, convert_permute
from hf_secure.demo import DEMO_MODEL
from hf_secure.errors import MissingKeyError, NotConvertedError, UnknownOptionError
from hf_secure.protocols.mpc.run import FunctionProgram, MPCSession

from .conftest import make_tiny, minilm_folder

TEXT = ["The cat sat on the mat and looked at the bird."]


@pytest.fixture(scope="module")
def demo_permuted(tmp_path_factory):
    """The demo GPT-2 converted twice: client embeddings with internal permutations, and server
    embeddings without them."""
    root = tmp_path_factory.mktemp("audit")
    convert_permute(DEMO_MODEL, root / "internal", root / "internal.key", embeddings="client", seed=3)
    convert_permute(DEMO_MODEL, root / "clear", root / "clear.key", embeddings="server", permute_internal=False, seed=4)
    return root


def _rows(report, **match):
    rows = [r for r in report.rows if all(r[k] == v for k, v in match.items())]
    assert rows, f"no row with {match}"
    return rows


@pytest.mark.parametrize("family", ["gpt2", "bert", "llama"])
def test_probe_reads_the_residual_stream_transformers_reports(tmp_path, family):
    model = make_tiny(family, tmp_path / "m")
    ids = torch.randint(0, 200, (2, 7), generator=torch.Generator().manual_seed(0))
    layers = model.config.num_hidden_layers
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    sites = sites_of(family, layers, list(range(layers + 1)))
    values = Probe(model, family, sites).run(input_ids=ids)
    for layer in range(layers):  # the final entry of hidden_states is family-specific (final norm or not)
        torch.testing.assert_close(values[Site("residual", layer)], hidden[layer])
    torch.testing.assert_close(values[Site("residual", layers)], model.base_model(input_ids=ids).last_hidden_state)
    for site in sites:  # every block site is [batch, seq, width]
        assert values[site].shape[:2] == (2, 7)


def test_clear_views_and_the_recovered_key_give_the_prompt_back(demo_permuted):
    report = audit(demo_permuted / "clear", original=DEMO_MODEL, key=str(demo_permuted / "clear.key"),
                   texts=TEXT, layers=["1"])
    for view in ("q", "k", "v", "ffn"):  # internal permutations off: the server computes these in the clear
        (row,) = _rows(report, view=view, layer=1)
        assert row["attack"] == "vocabulary matching, L1" and row["tokens_pct"] == 100.0
    (row,) = _rows(report, view="residual", layer=1, attack="key recovered from weights, then vocabulary matching (L1)")
    assert row["tokens_pct"] == 100.0
    (row,) = _rows(report, view="input ids")  # server-held embeddings: the vocabulary permutation, from the weights
    assert row["tokens_pct"] == 100.0
    keys = {k["permutation"]: k for k in report.keys}
    assert keys["hidden"]["recovered_pct"] == 100.0 and keys["hidden"]["measure"] == "equal to the key"
    assert keys["vocab"]["recovered_pct"] > 99.0
    assert report.quality["top1_agreement"] == 1.0


def test_permuted_views_of_a_trained_model_give_most_of_the_prompt_back(demo_permuted, tmp_path, capsys):
    out = tmp_path / "audit.json"
    chart = tmp_path / "audit.png"
    text = tmp_path / "text.txt"
    text.write_text(TEXT[0] + "\n")
    assert main(["audit", str(demo_permuted / "internal"), "--original", str(DEMO_MODEL), "--key",
                 str(demo_permuted / "internal.key"), "--text", str(text), "--layers", "0,last",
                 "--json", str(out), "--chart", str(chart)]) == 0
    printed = capsys.readouterr().out
    assert "tokens %" in printed and "key recovery from weights: hidden: 100.0%" in printed
    report = json.loads(out.read_text())
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sorted_rows = [r for r in report["rows"] if "sorted" in r["attack"]]
    assert {r["view"] for r in sorted_rows} == {"residual", "attention input", "q", "k", "v", "ffn"}
    for row in sorted_rows:
        assert row["tokens_pct"] >= 80.0, row  # the paper: 97.6-100 %; chance is 0.05 %


def test_bidirectional_models_sequential_at_the_embeddings_joint_deeper(tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(str(DEMO_MODEL))
    make_tiny("bert", tmp_path / "plain", vocab_size=len(tokenizer))
    tokenizer.save_pretrained(tmp_path / "plain")
    convert_permute(tmp_path / "plain", tmp_path / "bert", tmp_path / "bert.key", permute_internal=False, seed=2)
    report = audit(tmp_path / "bert", original=str(tmp_path / "plain"), key=str(tmp_path / "bert.key"),
                   texts=TEXT, layers=["0", "2"], shortlist=16)
    (row,) = _rows(report, view="residual", layer=0, attack="vocabulary matching, sorted L1")
    assert row["search"] == "sequential, full vocabulary" and row["tokens_pct"] == 100.0
    for view in ("q", "k", "v"):  # block 0's projections see one position each: exact, in the clear
        (row,) = _rows(report, view=view, layer=0)
        assert row["search"] == "sequential, full vocabulary" and row["tokens_pct"] == 100.0
    (row,) = _rows(report, view="residual", layer=2, attack="key recovered from weights, then vocabulary matching (L1)")
    assert row["search"].startswith("joint, 16 candidates from the embedding-output proxy")
    assert row["tokens_pct"] >= 80.0
    (row,) = _rows(report, view="ffn", layer=1)
    assert "from the residual 2 views" in row["search"]


def test_mpc_servers_views_stay_at_chance(tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(str(DEMO_MODEL))
    make_tiny("gpt2", tmp_path / "plain", vocab_size=len(tokenizer))
    tokenizer.save_pretrained(tmp_path / "plain")
    convert_approximate(tmp_path / "plain", tmp_path / "mpc")
    with pytest.raises(UnknownOptionError, match="embedding_noise: not an option of the mpc protocol"):
        audit(tmp_path / "mpc", embedding_noise=0.1)
    with pytest.raises(UnknownOptionError, match="views"):
        audit(tmp_path / "mpc", views=["ffn"])
    report = audit(tmp_path / "mpc", texts=["a private note about my health"], layers=["0", "1"])
    views = {(r["party"], r["view"]) for r in report.rows}
    for party in ("server0", "server1"):
        assert {(party, "input share (one-hot rows)"), (party, "opened value (hidden width)"),
                (party, "share of the layer output")} <= views
    hits = sum(r["tokens_pct"] * r["tokens"] / 100 for r in report.rows)
    tokens = sum(r["tokens"] for r in report.rows)
    # chance is 1/2048 per token: over ~100 guesses, more than 2 hits has probability < 1e-4
    assert hits <= 2, f"{hits} of {tokens} tokens recovered from uniformly masked views"
    assert report.quality["top1_agreement"] == 1.0


def test_audit_refuses_what_it_cannot_audit(demo_permuted, tmp_path, capsys):
    with pytest.raises(UnknownOptionError, match="unknown protocol .telepathy.; available"):
        audit(demo_permuted / "internal", original=DEMO_MODEL, protocol="telepathy")
    with pytest.raises(UnknownOptionError, match="converted for protocol 'permute', not 'mpc'"):
        audit(demo_permuted / "internal", protocol="mpc")
    with pytest.raises(UnknownOptionError, match="original"):
        audit(demo_permuted / "internal", key=str(demo_permuted / "internal.key"))
    with pytest.raises(MissingKeyError):  # the key store is empty and no key file is given
        audit(demo_permuted / "internal", original=DEMO_MODEL)
    with pytest.raises(UnknownOptionError, match="layer"):
        audit(demo_permuted / "internal", original=DEMO_MODEL, key=str(demo_permuted / "internal.key"),
              layers=["deep"])
    with pytest.raises(UnknownOptionError, match="views"):
        audit(demo_permuted / "internal", original=DEMO_MODEL, key=str(demo_permuted / "internal.key"),
              views=["colour"])
    with pytest.raises(UnknownOptionError, match="must be a list"):
        audit(demo_permuted / "internal", original=DEMO_MODEL, key=str(demo_permuted / "internal.key"),
              layers="0,1")
    with pytest.raises(UnknownOptionError, match="not an option of the permute protocol"):
        SecureModelForCausalLM.from_pretrained(demo_permuted / "internal", key=str(demo_permuted / "internal.key"),
                                               record_views=True)
    args = (demo_permuted / "internal",)
    options = {"original": DEMO_MODEL, "key": str(demo_permuted / "internal.key")}
    for bad in ({"layers": []}, {"texts": []}, {"texts": [" "]}, {"shortlist": True}, {"max_length": 0}):
        with pytest.raises(UnknownOptionError):
            audit(*args, **{**options, **bad})
    with pytest.raises(UnknownOptionError, match="no token that is not a special token"):
        audit(*args, **options, texts=["<|endoftext|>"])
    with pytest.raises(UnknownOptionError, match="is not the model"):
        audit(*args, original=minilm_folder(), key=options["key"])
    assert main(["audit", str(tmp_path / "missing")]) == 1
    cli = ["audit", str(args[0]), "--original", str(DEMO_MODEL), "--key", options["key"]]
    assert main(cli + ["--chart", str(tmp_path / "chart.txt")]) == 1  # refused before the audit runs
    assert main(cli + ["--json", str(tmp_path / "no" / "such" / "dir.json")]) == 1
    assert main(cli + ["--text", str(tmp_path / "missing.txt")]) == 1
    assert "hf-secure: error: UnknownOptionError" in capsys.readouterr().err


def test_embedding_noise_is_the_client_s_and_bounded(demo_permuted):
    key = str(demo_permuted / "internal.key")
    for bad in (-1.0, float("nan"), True, "0.1"):
        with pytest.raises(UnknownOptionError, match="embedding_noise"):
            SecureModelForCausalLM.from_pretrained(demo_permuted / "internal", key=key, embedding_noise=bad)
    with pytest.raises(UnknownOptionError, match="client-held embeddings"):
        SecureModelForCausalLM.from_pretrained(demo_permuted / "clear", key=str(demo_permuted / "clear.key"),
                                               embedding_noise=0.1)
    ids = torch.tensor([[5, 6, 7, 8]])
    quiet = SecureModelForCausalLM.from_pretrained(demo_permuted / "internal", key=key)(input_ids=ids).logits
    noisy = SecureModelForCausalLM.from_pretrained(demo_permuted / "internal", key=key,
                                                   embedding_noise=0.5)(input_ids=ids).logits
    assert not torch.allclose(quiet, noisy)
    generator = pipeline("secure-text-generation", model=str(demo_permuted / "internal"), key=key, embedding_noise=0.5)
    assert generator.model.engine.client.embedding_noise == 0.5  # the pipeline binds it, never drops it


def test_fss_servers_views_stay_at_chance(tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(str(DEMO_MODEL))
    make_tiny("gpt2", tmp_path / "plain", vocab_size=len(tokenizer))
    tokenizer.save_pretrained(tmp_path / "plain")
    with pytest.raises(NotConvertedError, match="protocol='fss'"):
        audit(tmp_path / "plain")  # a plain checkpoint: which protocol is not guessed
    with pytest.raises(UnknownOptionError, match="embedding_noise"):
        audit(tmp_path / "plain", protocol="fss", embedding_noise=0.1)
    report = audit(tmp_path / "plain", protocol="fss", texts=["a private note about my health"], layers=["0", "1"])
    assert report.settings["protocol"] == "fss"
    views = {(r["party"], r["view"]) for r in report.rows}
    for party in ("server0", "server1"):
        assert {(party, "input share (one-hot rows)"), (party, "opened value (hidden width)")} <= views
    hits = sum(r["tokens_pct"] * r["tokens"] / 100 for r in report.rows)
    tokens = sum(r["tokens"] for r in report.rows)
    assert tokens >= 40
    assert hits <= 2, f"{hits} of {tokens} tokens recovered from masked views"  # chance 1/2048 per token
    # fixed point against float: logits close (a greedy near tie of a random tiny model may flip)
    assert report.quality["max_abs_error"] < 0.25


def test_record_views_needs_every_party_here():
    with pytest.raises(UnknownOptionError, match="record_views"):
        MPCSession(FunctionProgram(abs), {}, rendezvous="tcp://127.0.0.1:1", record_views=True)
