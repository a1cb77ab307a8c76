"""fss vs mpc vs CrypTen 0.4.1 on the same BERT encoder, same weights, same input, one run; and
their projected times on a LAN and a WAN.

All three start from the embeddings' output, so exactly the encoder runs under 2PC (as in Sigma's
and bench_mpc's numbers). Per system: online seconds on this machine, online bytes between the
servers (both directions), rounds, max |error| against plaintext transformers; then

    projected = online seconds here + rounds x RTT + (bytes / 2) x 8 / bandwidth

(each server sends half the bytes, at the same time, over a full-duplex link; this machine's
loopback transfer time, a few percent of the online time, is counted twice: a small
overestimate). LAN: 1 Gbit/s, 1 ms RTT; WAN: 100 Mbit/s, 50 ms RTT. ``tc netem`` is not
available here, so the network is projected, not emulated.

    python benchmarks/bench_fss_compare.py --out benchmarks/fss/compare-bert-base.json
    python benchmarks/bench_fss_compare.py --layers 2 --hidden 128 --heads 2 --intermediate 512 --seq 16

fss runs with all parties in one process (two server threads sharing this machine's 2 cores);
mpc and CrypTen with one process per party and one torch thread each.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))  # crypten's wheel ships a top-level "benchmarks"
from bench_fss import report  # noqa: E402
from bench_mpc import bert_size_arguments, run_ours  # noqa: E402
from crypten_bert import random_bert, run_crypten_bert  # noqa: E402

from hf_secure.protocols.fss.local import run_model_local  # noqa: E402
from hf_secure.protocols.fss.models import FSSBert  # noqa: E402

NETWORKS = {"LAN": (1e9, 1e-3), "WAN": (1e8, 50e-3)}  # bits/s, RTT in s


def run_fss(model, ids, mask) -> dict:
    with torch.no_grad():
        hidden = model.embeddings(input_ids=ids)
        reference = model(input_ids=ids, attention_mask=mask).last_hidden_state
    weights = {f"encoder.{k}": v for k, v in model.encoder.state_dict().items()}
    program = FSSBert.from_config(model.config, from_embeddings=True)
    public = {"attention_mask": mask}
    with tempfile.TemporaryDirectory() as key_dir:
        (out,), report = run_model_local(program, weights, hidden, public, model.config.vocab_size, key_dir=key_dir)
    total, inputs = report["traffic"][0], report["inputs_traffic"][0]
    sent = total["bytes_sent"] - inputs["bytes_sent"]
    received = total["bytes_received"] - inputs["bytes_received"]
    return {"online_seconds": max(report["online_seconds"]), "bytes": sent + received,
            "rounds": total["rounds"] - inputs["rounds"], "max_abs_error": (out - reference).abs().max().item(),
            "offline_bytes": sum(report["key_bytes"]), "offline_seconds": report["dealer_seconds"]}


def project(result: dict) -> dict:
    return {name: result["online_seconds"] + result["rounds"] * rtt + result["bytes"] / 2 * 8 / bandwidth
            for name, (bandwidth, rtt) in NETWORKS.items()}


def main() -> None:
    parser = bert_size_arguments(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    parser.add_argument("--skip-crypten", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    model = random_bert(args.layers, args.hidden, args.heads, args.intermediate)
    ids = torch.randint(0, model.config.vocab_size, (1, args.seq), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    results = {}
    start = time.perf_counter()
    results["fss"] = run_fss(model, ids, mask)
    print("fss:", json.dumps(results["fss"]), flush=True)
    results["mpc"] = run_ours(model, ids, mask, "exact")
    print("mpc:", json.dumps(results["mpc"]), flush=True)
    if not args.skip_crypten:
        theirs = run_crypten_bert(model, ids, mask, provider="TTP", threads=1)
        results["crypten"] = {k: theirs[k] for k in ("online_seconds", "bytes", "rounds", "max_abs_error")}
        print("crypten:", json.dumps(results["crypten"]), flush=True)
    for name, r in results.items():
        r["projected_seconds"] = project(r)
    base = results["fss"]
    ratios = {name: {k: r[k] / base[k] for k in ("online_seconds", "bytes", "rounds")}
              | {f"{net}_seconds": r["projected_seconds"][net] / base["projected_seconds"][net] for net in NETWORKS}
              for name, r in results.items()}
    summary = {"model": f"random BERT, {args.layers} layers, hidden {args.hidden}, {args.heads} heads, "
                        f"FFN {args.intermediate}, {args.seq} tokens, from the embeddings",
               "networks": {k: {"bits_per_s": b, "rtt_s": r} for k, (b, r) in NETWORKS.items()},
               "results": results, "ratios_to_fss": ratios, "wall_seconds": time.perf_counter() - start,
               "machine": "2 CPU cores, 24 GiB", "date": time.strftime("%Y-%m-%d")}
    report(summary, args.out)


if __name__ == "__main__":
    main()
