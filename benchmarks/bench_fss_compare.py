"""fss vs mpc vs CrypTen 0.4.1 vs PUMA on the same BERT encoder, same weights, same input, one run;
and their projected times on a LAN and a WAN.

All four start from the embeddings' output, so exactly the encoder runs under MPC (as in Sigma's
and bench_mpc's numbers). Per system: online seconds on this machine, online bytes between the
servers (both directions), rounds, max |error| against plaintext transformers; then

    projected = online seconds here + rounds x RTT + (bytes / 2) x 8 / bandwidth

(each server sends half the bytes, at the same time, over a full-duplex link; this machine's
loopback transfer time, a few percent of the online time, is counted twice: a small
overestimate). LAN: 1 Gbit/s, 1 ms RTT; WAN: 100 Mbit/s, 50 ms RTT. ``tc netem`` is not
available here, so the network is projected, not emulated.

PUMA (SecretFlow SPU 0.9.5, ABY3, see ``puma_bert.py``) has three computing parties, not two, and
runs in its own venv (``--puma-python``). Its ``bytes`` are every byte any of the three sent (each
counted once, as the two-party systems' sent + received); its ``rounds`` the messages sent by its
busiest party (an estimate: SPU does not count rounds). The projection keeps bytes / 2 for all
systems; PUMA's three parties each send about a third, in parallel, so for PUMA it overstates the
transfer time (by up to 1.5x; ``max_party_sent_bytes`` is the busiest party's share).

    python benchmarks/bench_fss_compare.py --out benchmarks/fss/compare-bert-base.json
    python benchmarks/bench_fss_compare.py --layers 2 --hidden 128 --heads 2 --intermediate 512 --seq 16

fss runs with all parties in one process (two server threads sharing this machine's 2 cores);
mpc and CrypTen with one process per party and one torch thread each; PUMA with one process per
party (SPU's own thread pools) over loopback TCP.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))  # crypten's wheel ships a top-level "benchmarks"
from bench_fss import report  # noqa: E402
from bench_mpc import bert_size_arguments, run_ours  # noqa: E402
from crypten_bert import random_bert, run_crypten_bert  # noqa: E402

from hf_secure.protocols.fss.local import run_model_local  # noqa: E402
from hf_secure.protocols.fss.models import FSSBert  # noqa: E402

NETWORKS = {"LAN": (1e9, 1e-3), "WAN": (1e8, 50e-3)}  # bits/s, RTT in s
PUMA_PYTHON = Path("/work/venv-puma/bin/python")


def encoder_inputs(model, ids, mask):
    """The encoder's weights, its input (the embeddings' output) and the plaintext reference output."""
    with torch.no_grad():
        hidden = model.embeddings(input_ids=ids)
        reference = model(input_ids=ids, attention_mask=mask).last_hidden_state
    return {f"encoder.{k}": v for k, v in model.encoder.state_dict().items()}, hidden, reference


def run_fss(model, ids, mask) -> dict:
    weights, hidden, reference = encoder_inputs(model, ids, mask)
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


def run_puma(model, ids, mask, python: str) -> dict:
    """PUMA: ``puma_bert.py`` run by ``python`` (its venv) on this model's weights and embeddings."""
    weights, hidden, reference = encoder_inputs(model, ids, mask)
    with tempfile.TemporaryDirectory(prefix="puma-bert-") as folder:
        folder = Path(folder)
        save_file({k: v.contiguous() for k, v in weights.items()}, folder / "weights.safetensors")
        (folder / "config.json").write_text(model.config.to_json_string(use_diff=False))
        np.save(folder / "hidden.npy", hidden.numpy())
        np.save(folder / "mask.npy", mask.numpy())
        done = subprocess.run([python, str(Path(__file__).with_name("puma_bert.py")), str(folder)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"puma_bert.py failed ({done.returncode}):\n{done.stderr[-3000:]}")
        result = json.loads((folder / "result.json").read_text())
        output = torch.from_numpy(np.load(folder / "puma.npy"))
    return {k: result[k] for k in ("online_seconds", "bytes", "rounds")} | {
        "max_abs_error": (output - reference).abs().max().item(), "parties": 3,
        "max_party_sent_bytes": max(p["sent_bytes"] for p in result["parties"])}


def project(result: dict) -> dict:
    return {name: result["online_seconds"] + result["rounds"] * rtt + result["bytes"] / 2 * 8 / bandwidth
            for name, (bandwidth, rtt) in NETWORKS.items()}


def main() -> None:
    parser = bert_size_arguments(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    parser.add_argument("--skip-crypten", action="store_true")
    parser.add_argument("--skip-puma", action="store_true")
    parser.add_argument("--puma-python", default=None,
                        help=f"python of PUMA's venv (default {PUMA_PYTHON}, if it exists)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.puma_python and not Path(args.puma_python).exists():
        parser.error(f"--puma-python {args.puma_python} does not exist")
    puma_python = args.puma_python or (str(PUMA_PYTHON) if PUMA_PYTHON.exists() else None)
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
    if not args.skip_puma and puma_python is None:
        print(f"puma: skipped: no {PUMA_PYTHON} and no --puma-python (install: see benchmarks/puma_bert.py)")
    elif not args.skip_puma:
        results["puma"] = run_puma(model, ids, mask, puma_python)
        print("puma:", json.dumps(results["puma"]), flush=True)
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
