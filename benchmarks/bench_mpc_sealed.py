"""Sealed vs unsealed mpc links, measured: the same generation with the parties started by command.

The demo GPT-2 (``hf-secure convert approximate``), its public part for the servers, the dealer and
the client, one key file per role (``hf-secure party-keys``), and four ``hf-secure party``
processes plus the client on this machine. With the rendezvous on 127.0.0.1 the links are
authenticated but not sealed; on one of this machine's other addresses (default: the first
non-loopback one) every message is sealed with AES-256-GCM. Both runs generate the same tokens;
reported: online seconds of server 0, rounds and bytes, and the sealed/unsealed time ratio.

    python benchmarks/bench_mpc_sealed.py [--host ADDRESS] [--new-tokens 16]
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoTokenizer

from hf_secure.cli import main as cli
from hf_secure.convert import convert_approximate
from hf_secure.demo import DEMO_MODEL, DEMO_PROMPT
from hf_secure.modeling import SecureModelForCausalLM

ROLES = ("server0", "server1", "dealer", "owner")


def other_address() -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect(("192.0.2.254", 9))  # no packet is sent: this picks the outgoing interface's address
        return sock.getsockname()[0]


def free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def run(host: str, work: Path, ids: torch.Tensor, new_tokens: int) -> dict:
    rendezvous = f"tcp://{host}:{free_port(host)}"
    procs = [subprocess.Popen([sys.executable, "-m", "hf_secure.cli", "party", "--role", role, "--model",
                               str(work / ("approx" if role == "owner" else "public")), "--rendezvous", rendezvous,
                               "--party-key", str(work / "keys" / f"{role}.key"), "--timeout", "120"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT) for role in ROLES]
    try:
        model = SecureModelForCausalLM.from_pretrained(work / "public", protocol="mpc", rendezvous=rendezvous,
                                                       party_key=str(work / "keys" / "client.key"))
        model.engine.stats.reset()
        tokens = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        stats = model.engine.stats.snapshot()
        model.engine.close()
        for proc in procs:
            proc.wait(timeout=120)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return {"sealed": not host.startswith("127."), "online_seconds": round(stats["seconds"], 3),
            "rounds": stats["rounds"], "bytes": stats["bytes_sent"] + stats["bytes_received"],
            "tokens": tokens[0].tolist()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default=None, help="a non-loopback address of this machine")
    parser.add_argument("--new-tokens", type=int, default=16)
    args = parser.parse_args()
    host = args.host or other_address()
    with tempfile.TemporaryDirectory(prefix="hf_secure_sealed_") as work:
        work = Path(work)
        convert_approximate(str(DEMO_MODEL), work / "approx")
        assert cli(["public", str(work / "approx"), "--out", str(work / "public")]) == 0
        assert cli(["party-keys", "--out", str(work / "keys")]) == 0
        ids = AutoTokenizer.from_pretrained(work / "public")(DEMO_PROMPT, return_tensors="pt").input_ids
        plain = run("127.0.0.1", work, ids, args.new_tokens)
        sealed = run(host, work, ids, args.new_tokens)
    print(f"# bench_mpc_sealed: demo GPT-2, prompt {ids.shape[1]} tokens, {args.new_tokens} new tokens, "
          f"parties started by command; sealed rendezvous on {host}")
    for row in (plain, sealed):
        print(json.dumps({k: v for k, v in row.items() if k != "tokens"}))
    print(f"sealed / unsealed online time: {sealed['online_seconds'] / plain['online_seconds']:.2f}x; "
          f"same tokens: {plain['tokens'] == sealed['tokens']}")


if __name__ == "__main__":
    main()
