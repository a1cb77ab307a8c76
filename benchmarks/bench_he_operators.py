"""The he protocol's operators at NEXUS's benchmark sizes, beside NEXUS's own CPU figures.

Each operator runs in a fresh process (its peak RSS is its own) on CKKS parameters that pass
SEAL's 128-bit check, single-threaded SEAL as NEXUS's CPU build. NEXUS's numbers are those its own
CPU build printed on this 2-core VM (../shared/ANCHORS.md: e15058c, modified SEAL 4.1 with HEXL;
its N = 2^16 and bootstrapping parameters are not 128-bit secure, its Argmax did not run here).

Sizes (NEXUS's): GELU on 32768 values in [-5, 5]; LayerNorm of 768 values (NEXUS: x / sqrt(mean
x^2) only; ours: mean, variance, inverse square root, gamma, beta, on every vector of a ciphertext);
SoftMax of a 128-vector in [-10, 0] (NEXUS: no maximum subtracted; ours subtracts it, 128 vectors
per ciphertext); MatMul 4096x768 plaintext times 768x64 encrypted with compression and expansion;
Argmax of 8 values in [-0.5, 0.5] (QuickMax, then the sign).

    python benchmarks/bench_he_operators.py [--only gelu,matmul] [--out benchmarks/he/operators.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import resource
import time
from pathlib import Path
from queue import Empty

import numpy as np
import torch

NEXUS = {  # its own timers, this VM (ANCHORS.md); seconds, mean absolute error, what it computes
    "gelu": {"seconds": 4.9, "values": 32768, "mae": 1.2e-3, "params": "N=2^16, 836-bit modulus (not 128-bit)"},
    "gelu_pieces": {"seconds": 4.9, "values": 32768, "mae": 1.2e-3, "params": "N=2^16, 836-bit modulus (not 128-bit)"},
    "layernorm": {"seconds": 5.55, "values": 768, "mae": 1.3e-5, "params": "N=2^16, 836 bits; x/sqrt(mean x^2) only"},
    "softmax": {"seconds": 2.15, "values": 128, "mae": 8.7e-5, "params": "N=2^16, 836 bits; no max subtracted"},
    "matmul": {"seconds": 98.0, "values": 4096 * 64, "mae": 5.2e-4, "params": "N=2^13 {60,40,60}; 1.35 MB up, 8.0 MB down"},
    "argmax": {"seconds": None, "values": 8, "mae": None, "params": "N=2^15, 1605 bits, h=192: did not run (~37 GiB keys)"},
}


def _setup(params, steps=(), elements=(), refresh_level=None):
    from hf_secure.protocols.he.backend import CKKS
    from hf_secure.protocols.he.refresh import Refresher, answer_refresh

    client = CKKS.keygen(params)
    start = time.perf_counter()
    server = CKKS(params, evaluation_keys=client.evaluation_keys(steps=steps, elements=elements))
    keys = time.perf_counter() - start
    refresher = None
    if refresh_level is not None:
        refresher = Refresher(server, lambda request: answer_refresh(client, request), level=refresh_level)
    return client, server, refresher, keys


def _encrypt(client, server, values, level=None):
    return server.deserialize(client.serialize(client.encrypt(values, level)))


def _decrypt(client, server, ct):
    return client.decrypt(client.deserialize(server.serialize(ct)))


def run_gelu(pieces: bool) -> dict:
    from hf_secure.protocols.he import operators as op
    from hf_secure.protocols.he.backend import Params

    params = Params(2**15, (60,) + (40,) * 19 + (60,)) if pieces else Params(2**15, (60,) + (40,) * 8 + (60,))
    client, server, _, keys = _setup(params)
    x = np.linspace(-5, 5, 32768)
    want = torch.nn.functional.gelu(torch.tensor(x)).numpy()
    level = params.levels
    cts = [_encrypt(client, server, part, level) for part in np.split(x, 2)]
    start = time.perf_counter()
    outs = [op.gelu_pieces(server, ct, 5.0) if pieces else op.activation(server, ct, "gelu", 5.0) for ct in cts]
    seconds = time.perf_counter() - start
    got = np.concatenate([_decrypt(client, server, o) for o in outs])
    return {"seconds": seconds, "values": x.size, "mae": float(np.abs(got - want).mean()),
            "max_error": float(np.abs(got - want).max()), "params": params.as_dict(), "key_seconds": keys,
            "method": "NEXUS's sign-selected pieces" if pieces else "even Chebyshev series in x^2 (degree "
            f"{len(op.activation_series('gelu', 5.0, 1e-4)) - 1})"}


def run_layernorm() -> dict:
    from hf_secure.protocols.he import operators as op
    from hf_secure.protocols.he.backend import Params

    params = Params(2**15, (60,) + (40,) * 19 + (60,))
    width, stride = 1024, params.slots // 1024  # 768 features padded to 1024, 16 vectors per ciphertext
    client, server, refresher, keys = _setup(params, steps=[stride << i for i in range(10)], refresh_level=2)
    x = np.zeros((stride, width))
    x[:, :768] = np.linspace(-10, 10, 768)  # NEXUS's input, in each of the 16 vectors
    gamma, beta = np.ones(width), np.zeros(width)
    ct = _encrypt(client, server, x.T.reshape(-1))
    start = time.perf_counter()
    # 768 real features: mean and variance over them (the padding is 0, gamma 0 there)
    gamma[768:] = 0.0
    out = op.layer_norm(server, ct, width, stride, np.repeat(gamma, stride), np.repeat(beta, stride), 0.0,
                        10.0, 500.0, refresher, size=768)
    seconds = time.perf_counter() - start
    got = _decrypt(client, server, out).reshape(width, stride).T[0, :768]
    row = x[0, :768]
    want = (row - row.mean()) / np.sqrt(row.var())
    return {"seconds": seconds, "values": 768 * stride, "vectors_per_ciphertext": stride, "mae": float(np.abs(got - want).mean()),
            "max_error": float(np.abs(got - want).max()), "params": params.as_dict(), "key_seconds": keys,
            "refreshes": refresher.traffic.rounds, "variance_range": [10.0, 500.0]}


def run_softmax() -> dict:
    from hf_secure.protocols.he import operators as op
    from hf_secure.protocols.he.backend import Params

    params = Params(2**15, (60,) + (40,) * 19 + (60,))
    rows = params.slots // 128
    client, server, refresher, keys = _setup(params, steps=[rows << i for i in range(7)], refresh_level=2)
    x = np.tile(np.linspace(-10, 0, 128), (rows, 1))  # NEXUS's vector, in each of the 128 rows
    ct = _encrypt(client, server, x.T.reshape(-1))
    start = time.perf_counter()
    out = op.softmax(server, ct, 128, rows, 10.0, refresher)
    seconds = time.perf_counter() - start
    got = _decrypt(client, server, out).reshape(128, rows).T
    want = torch.softmax(torch.tensor(x), -1).numpy()
    return {"seconds": seconds, "values": 128 * rows, "vectors_per_ciphertext": rows, "mae": float(np.abs(got - want).mean()),
            "max_error": float(np.abs(got - want).max()), "params": params.as_dict(), "key_seconds": keys,
            "refreshes": refresher.traffic.rounds}


def run_matmul(degree: int) -> dict:
    from hf_secure.protocols.he import linear
    from hf_secure.protocols.he.backend import CKKS, Params

    params = Params(degree, (60, 40, 60))
    rng = np.random.default_rng(42)
    a = rng.uniform(-1, 1, (4096, 768))
    b = rng.uniform(-1, 1, (768, 64))
    rows = degree // 128
    client = CKKS.keygen(params)
    server = CKKS(params, evaluation_keys=client.evaluation_keys(elements=linear.expansion_elements(client, rows)))
    start = time.perf_counter()
    upload = linear.pack_rows(client, b, level=1)
    client_seconds = time.perf_counter() - start
    start = time.perf_counter()
    expanded = [r for blob in upload for r in linear.expand(server, server.deserialize(blob), rows)]
    expand_seconds = time.perf_counter() - start
    outs = linear.matmul_expanded(server, expanded[:768], a, 64)
    seconds = time.perf_counter() - start
    download = [server.serialize(o) for o in outs]
    got = linear.unpack_rows([client.decrypt(client.deserialize(d)) for d in download], 4096, 64)
    err = np.abs(got - a @ b)
    return {"seconds": seconds, "expand_seconds": expand_seconds, "client_seconds": client_seconds,
            "values": 4096 * 64, "mae": float(err.mean()), "max_error": float(err.max()),
            "bytes_up": sum(map(len, upload)), "bytes_down": sum(map(len, download)), "params": params.as_dict()}


def run_argmax() -> dict:
    from hf_secure.protocols.he import operators as op
    from hf_secure.protocols.he.backend import Params

    params = Params(2**15, (60,) + (40,) * 19 + (60,))
    client, server, refresher, keys = _setup(params, steps=[1, 2, 4], refresh_level=2)
    v = np.array([-0.1, 0.2, -0.3, 0.4, 0.7, 0.4, -0.3, 0.2])  # NEXUS's input
    ct = _encrypt(client, server, np.tile(v, params.slots // 8))
    start = time.perf_counter()
    out = op.argmax(server, ct, 8, 1, 0.5, gap=0.3, refresh=refresher)
    seconds = time.perf_counter() - start
    got = _decrypt(client, server, out)[:8]
    want = (v == v.max()).astype(float)
    return {"seconds": seconds, "values": params.slots, "vectors_per_ciphertext": params.slots // 8,
            "mae": float(np.abs(got - want).mean()), "max_error": float(np.abs(got - want).max()),
            "params": params.as_dict(), "key_seconds": keys, "refreshes": refresher.traffic.rounds,
            "refresh_bytes": refresher.traffic.bytes_sent + refresher.traffic.bytes_received}


RUNS = {
    "gelu": lambda: run_gelu(False),
    "gelu_pieces": lambda: run_gelu(True),
    "layernorm": run_layernorm,
    "softmax": run_softmax,
    "matmul": lambda: run_matmul(2**13),
    "matmul_n15": lambda: run_matmul(2**15),
    "argmax": run_argmax,
}


def _child(name: str, queue) -> None:
    torch.set_num_threads(1)
    result = RUNS[name]()
    result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    queue.put(result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default=",".join(RUNS))
    parser.add_argument("--out", default="benchmarks/he/operators.json")
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    results = {}
    for name in args.only.split(","):
        queue = ctx.Queue()
        proc = ctx.Process(target=_child, args=(name, queue))
        proc.start()
        while proc.is_alive() and queue.empty():
            proc.join(timeout=1.0)
        try:
            results[name] = queue.get(timeout=10)
        except Empty:
            raise SystemExit(f"{name} failed (exit code {proc.exitcode})") from None
        proc.join()
        r, ref = results[name], NEXUS.get(name.split("_n")[0], {})
        ours = r["seconds"] / r["values"] * 1e6
        theirs = ref["seconds"] / ref["values"] * 1e6 if ref.get("seconds") else None
        print(f"{name:12s} {r['seconds']:8.2f} s  {ours:10.2f} us/value  MAE {r['mae']:.2e}  max {r['max_error']:.2e}  "
              f"RSS {r['peak_rss_gib']:.2f} GiB  | NEXUS {ref.get('seconds')} s, "
              f"{'%.2f' % theirs if theirs else '-'} us/value, MAE {ref.get('mae')}"
              + (f"  -> {theirs / ours:.1f}x per value" if theirs else ""), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": platform.platform(), "date": time.strftime("%Y-%m-%d"),
                                          "nexus": NEXUS, "results": results}, indent=2))


if __name__ == "__main__":
    main()
