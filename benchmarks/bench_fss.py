"""fss costs on BERT-base / GPT-2 sized models with random weights: online bytes, rounds, dealer key
bytes per server, dealer and online seconds, peak memory.

Every party runs in this process (:func:`hf_secure.protocols.fss.local.run_model_local`): the
dealer first, writing both servers' keys to disk record by record, then both servers in two
threads that read their keys back in layer order and exchange bit-packed openings through a
counted in-memory link. Bytes, rounds and key sizes do not depend on the machine; seconds and
memory are this machine's (2 CPU cores shared by both servers).

    python benchmarks/bench_fss.py --model bert-base --seq 128 --out benchmarks/fss/bert-base.json
    python benchmarks/bench_fss.py --model gpt2 --seq 128 --out benchmarks/fss/gpt2.json
    python benchmarks/bench_fss.py --model bert-base --layers 1   # a quick check: one layer
    python benchmarks/bench_fss.py --model bert-base --processes  # one process per party: memory per party

The model's weights enter as inputs of the run (opened once, as at a session's setup); their
opening is not counted as online traffic. The one-hot token rows are counted separately
("embedding input"): Sigma's published numbers start from the embeddings.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import torch
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

from hf_secure.protocols.fss.core import Params
from hf_secure.protocols.fss.local import run_model_local
from hf_secure.protocols.fss.models import program_for

GIB = 1 << 30


def report(result: dict, out: str | None) -> None:
    """Print ``result`` and, with ``out``, write it there as JSON."""
    print(json.dumps(result, indent=2))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2) + "\n")


def build(name: str, layers: int | None):
    torch.manual_seed(0)
    if name == "bert-base":
        config = BertConfig(num_hidden_layers=layers or 12)
        model = BertModel(config, add_pooling_layer=False)
        family = "bert"
    elif name == "gpt2":
        config = GPT2Config(n_layer=layers or 12)
        model = GPT2LMHeadModel(config)
        family = "gpt2"
    else:
        raise SystemExit(f"unknown model {name}")
    return config, model.eval(), family


def public_fields(family: str, seq: int):
    ids = torch.randint(0, 1000, (1, seq))
    if family == "bert":
        return ids, {"attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids),
                     "position_ids": torch.arange(seq)[None]}
    return ids, {"attention_mask": torch.ones_like(ids), "position_ids": torch.arange(seq)[None],
                 "cache": torch.tensor([1]), "past_length": torch.tensor([0]), "logits_to_keep": torch.tensor([1]),
                 "drop": torch.tensor([], dtype=torch.long), "token_only": torch.tensor([0])}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bert-base", choices=["bert-base", "gpt2"])
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--layers", type=int, default=None, help="fewer layers for a quick check")
    parser.add_argument("--ring-bits", type=int, default=50)
    parser.add_argument("--key-dir", default=None, help="where the keys go (default: a temporary folder)")
    parser.add_argument("--processes", action="store_true",
                        help="one process per party (FSSSession, as the drop-in models run): peak memory per party")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.processes:
        return run_processes(args)
    config, model, family = build(args.model, args.layers)
    weights = {k: v.float() for k, v in model.state_dict().items()}
    ids, public = public_fields(family, args.seq)
    with torch.no_grad():
        reference = (model(input_ids=ids).last_hidden_state if family == "bert" else model(input_ids=ids).logits[:, -1:])
    del model  # memory: three parties' copies of the weights live in this process
    params = Params(ring_bits=args.ring_bits)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=args.key_dir) as key_dir:
        (out,), run_report = run_model_local(program_for(config, family), weights, ids, public, config.vocab_size,
                                         params, key_dir=key_dir)
    wall = time.perf_counter() - start
    vocab = config.vocab_size
    servers = []
    for role in (0, 1):
        total, inputs = run_report["traffic"][role], run_report["inputs_traffic"][role]
        embedding_bytes = (ids.numel() * vocab * params.ring_bits + 63) // 64 * 8
        servers.append({
            "sent_bytes_online": total["bytes_sent"] - inputs["bytes_sent"],
            "sent_bytes_embedding_input": embedding_bytes,
            "rounds_online": total["rounds"] - inputs["rounds"],
            "key_bytes": run_report["key_bytes"][role],
            "online_seconds": run_report["online_seconds"][role],
        })
    err = (out - reference.double()).abs()
    result = {
        "model": args.model, "layers": config.num_hidden_layers if family == "bert" else config.n_layer,
        "seq": args.seq, "params": params.as_dict(), "servers": servers,
        "online_gib_both_servers": sum(s["sent_bytes_online"] for s in servers) / GIB,
        "online_gib_per_server": servers[0]["sent_bytes_online"] / GIB,
        "rounds": servers[0]["rounds_online"],
        "key_gib_per_server": max(s["key_bytes"] for s in servers) / GIB,
        "dealer_seconds": run_report["dealer_seconds"], "wall_seconds": wall,
        "peak_rss_gib_all_parties": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20),
        "max_abs_error_vs_plaintext": err.max().item(),
        "machine": "2 CPU cores, 24 GiB (all three parties in one process)",
        "date": time.strftime("%Y-%m-%d"),
    }
    report(result, args.out)


def run_processes(args) -> None:
    """The same query through :class:`~hf_secure.protocols.fss.run.FSSSession`: client, owner, two
    servers and the dealer as processes; each reports its own peak memory."""
    from hf_secure.protocols.fss.run import FSSSession

    config, model, family = build(args.model, args.layers)
    weights = {k: v.float() for k, v in model.state_dict().items()}
    ids, public = public_fields(family, args.seq)
    program = program_for(config, family)
    del model
    start = time.perf_counter()
    with FSSSession(program, weights, Params(ring_bits=args.ring_bits), timeout_s=7200,
                    server_options={"key_dir": args.key_dir}) as session:
        setup = time.perf_counter() - start
        _, run_report = session.run([torch.nn.functional.one_hot(ids, config.vocab_size)], public)
    per_party = {role: {"peak_rss_gib": r["peak_rss_mb"] / 1024,
                        **{k: r[k] for k in ("online_seconds", "offline_seconds", "key_bytes") if k in r}}
                 for role, r in run_report.items() if isinstance(r, dict) and "peak_rss_mb" in r}
    online = run_report["SERVER0"]["stats"]["online"]
    result = {"model": args.model, "seq": args.seq, "processes": True, "setup_seconds": setup,
              "per_party": per_party, "online_bytes_both": online["bytes_sent"] + online["bytes_received"],
              "rounds": online["rounds"], "machine": "2 CPU cores, 24 GiB, one process per party",
              "date": time.strftime("%Y-%m-%d")}
    report(result, args.out)


if __name__ == "__main__":
    main()
