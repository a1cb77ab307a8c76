"""PUMA baseline: a BERT encoder under SecretFlow SPU's 3-party ABY3 with PUMA's approximations.

Run by the PUMA venv's python (no torch, no hf_secure), usually from ``bench_fss_compare.py``:

    /work/venv-puma/bin/python benchmarks/puma_bert.py FOLDER

FOLDER holds ``weights.safetensors`` (the torch BERT encoder's state dict, keys such as
``encoder.layer.0.attention.self.query.weight``, float32), ``config.json`` (the BertConfig's
``to_dict``), ``hidden.npy`` (the embeddings' output, float32 [batch, seq, hidden]) and ``mask.npy``
(the attention mask, [batch, seq]). The script writes ``puma.npy`` (the last hidden state) and
``result.json`` there, and leaves the three parties' logs (``party{0,1,2}.log``, with SPU's
per-operation profile) beside them.

What runs: the encoder only, from the embeddings' output, as transformers' Flax BERT traced by JAX
and compiled by SPU; PUMA = SPU 0.9.5, protocol ABY3, ring FM64, 18 fractional bits, exp as
(1 + x/2^5)^(2^5) (PUMA's ``fxp_exp_iters`` 5), and PUMA's GeLU (piecewise polynomials on
[-4, -1.95, 3]) and softmax (max subtracted, exp of inputs below -14 zeroed) patched in during
tracing. Weights and input are secret; the attention mask and architecture are public (a trace
constant), as in the fss, mpc and CrypTen runs.

How: this process traces and compiles, secret-shares weights and input (SPU's ``Io``; not timed, no
link traffic), then starts three party processes (this script with ``--party``) that talk over
loopback TCP (SPU's brpc link). Each party loads its shares, waits on a link barrier, runs the
executable and returns its output share; this process reconstructs the output (the output shares
reach it through files: the reveal to the client is not in the timings).

``result.json``: ``online_seconds`` is the slowest party's wall time of the run (after the
barrier); per party, SPU's "Link details" log line of that run (yacl link statistics, enabled by
``enable_hal_profile``/``enable_pphlo_profile``): payload bytes sent and received (no TCP/brpc
framing) and send/recv actions (one per message a party hands to its link; a large message split
into brpc chunks still counts once). ``bytes`` = the three parties' sent bytes summed = every byte
on the wire, once. ``rounds`` = the most messages one party sent. SPU does not count rounds; in
ABY3 most rounds have every party send one message to its neighbour, so this tracks them, but a
step where a party sends to both peers counts twice and one where it only receives counts zero:
an estimate (it also varies by about 1% between runs; the bytes do not).

PUMA's own benchmark script passes ``enabled=False`` to its GeLU/softmax contexts (it runs SPU's
defaults); here they are on. The GeLU polynomial's own error (0.02 max on the curve) dominates
PUMA's error against exact plaintext.

Install (a separate venv; versions that work together, numpy below 2; pip's constraints file
takes no extras, hence ``jax`` there):

    python3.11 -m venv /work/venv-puma
    /work/venv-puma/bin/pip install spu==0.9.5 "jax[cpu]==0.4.34" jaxlib==0.4.34 "numpy<2"
    printf 'spu==0.9.5\\njax==0.4.34\\njaxlib==0.4.34\\nnumpy<2\\n' > /tmp/puma-constraints.txt
    /work/venv-puma/bin/pip install -c /tmp/puma-constraints.txt flax==0.10.0 transformers==4.44.2 safetensors
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import spu
import spu.api as spu_api
import spu.libspu as libspu

PARTIES = 3
FRACTION_BITS = 18
EXP_ITERS = 5  # PUMA's runtime config: fxp_exp_mode 0 (Taylor), fxp_exp_iters 5
GELU_ACTS = ("gelu", "gelu_new", "gelu_pytorch_tanh")  # replaced by PUMA's GeLU; "relu" is exact
LINK_DETAILS = re.compile(r"Link details: total send bytes (\d+), recv bytes (\d+), "
                          r"send actions (\d+), recv actions (\d+)")


def runtime_config() -> libspu.RuntimeConfig:
    config = libspu.RuntimeConfig(protocol=libspu.ProtocolKind.ABY3, field=libspu.FieldType.FM64)
    config.fxp_fraction_bits = FRACTION_BITS
    config.fxp_exp_mode = libspu.RuntimeConfig.EXP_TAYLOR
    config.fxp_exp_iters = EXP_ITERS
    config.enable_hal_profile = True  # makes SPU log the run's link statistics
    config.enable_pphlo_profile = True
    return config


# --- PUMA's approximations (PUMA paper, Dong et al. 2023; SPU's examples) ------------------------

def puma_gelu(x):
    """GeLU: 0 below -4, a cubic on [-4, -1.95), a degree-6 polynomial on [-1.95, 3], x above 3."""
    b0, b1, b2 = x < -4.0, x < -1.95, x > 3.0
    middle, left = b1 ^ b2 ^ True, b0 ^ b1
    x2 = jnp.square(x)
    x3 = x * x2
    x4, x6 = jnp.square(x2), jnp.square(x3)
    seg1 = -0.011034134030615728 * x3 - 0.11807612951181953 * x2 - 0.42226581151983866 * x - 0.5054031199708174
    seg2 = (0.0018067462606141187 * x6 - 0.037688200365904236 * x4 + 0.3603292692789629 * x2 + 0.5 * x
            + 0.008526321541038084)
    return b2 * x + left * seg1 + middle * seg2


def puma_softmax(x, axis=-1, where=None, initial=None):
    """Softmax with the row max subtracted and exp of inputs below -14 set to 0."""
    x = x - jnp.max(x, axis, where=where, initial=initial, keepdims=True)
    e = jnp.exp(x) * (x > -14)
    return e / jnp.sum(e, axis, where=where, keepdims=True)


@contextmanager
def puma_approximations(hidden_act: str):
    """Patch PUMA's softmax into ``jax.nn`` and its GeLU into transformers' ``ACT2FN``.

    Flax BERT reads its activation from ``ACT2FN`` when its modules are set up (patching
    ``jax.nn.gelu`` does nothing), and JAX reuses cached traces, so the caches are cleared.
    """
    from transformers.modeling_flax_utils import ACT2FN

    if hidden_act not in GELU_ACTS + ("relu",):
        raise ValueError(f"hidden_act {hidden_act!r}: only {GELU_ACTS} (PUMA's GeLU) and relu")
    saved_softmax, saved_act = jax.nn.softmax, ACT2FN[hidden_act]
    jax.nn.softmax = puma_softmax
    if hidden_act in GELU_ACTS:
        ACT2FN[hidden_act] = puma_gelu
    jax.clear_caches()
    try:
        yield
    finally:
        jax.nn.softmax, ACT2FN[hidden_act] = saved_softmax, saved_act
        jax.clear_caches()


# --- model -----------------------------------------------------------------------------------

def flax_params(weights: dict[str, np.ndarray]) -> dict:
    """Torch encoder state dict -> FlaxBertEncoder params (Linear weights transposed)."""
    params: dict = {}
    for key, value in weights.items():
        *path, leaf = key.removeprefix("encoder.").split(".")
        if leaf == "weight":
            leaf, value = ("kernel", value.T) if value.ndim == 2 else ("scale", value)
        node = params
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = np.ascontiguousarray(value, dtype=np.float32)
    return params


def compile_encoder(folder: Path):
    """Trace and compile the encoder with PUMA's approximations; return the executable and args."""
    from safetensors.numpy import load_file
    from transformers import BertConfig
    from transformers.models.bert.modeling_flax_bert import FlaxBertEncoder
    from spu.utils import frontend

    config = BertConfig.from_dict(json.loads((folder / "config.json").read_text()))
    hidden = np.load(folder / "hidden.npy").astype(np.float32)
    mask = np.load(folder / "mask.npy").astype(np.int32)  # public: baked into the trace
    params = flax_params(load_file(folder / "weights.safetensors"))
    encoder = FlaxBertEncoder(config)
    expected = jax.eval_shape(encoder.init, jax.random.PRNGKey(0), hidden, mask, None)["params"]
    got = jax.tree_util.tree_map(lambda a: a.shape, params)
    if jax.tree_util.tree_map(lambda a: a.shape, expected) != got:
        raise ValueError("the weights do not match FlaxBertEncoder's parameters")

    def encoder_forward(params, hidden):
        return encoder.apply({"params": params}, hidden, mask, None, deterministic=True).last_hidden_state

    copts = libspu.CompilerOptions()
    copts.enable_optimize_denominator_with_broadcast = True  # x / y -> x * (1 / y), as PUMA
    args = jax.tree_util.tree_leaves((params, hidden))
    names = [f"in{i}" for i in range(len(args))]
    with puma_approximations(config.hidden_act):
        executable, _ = frontend.compile(frontend.Kind.JAX, encoder_forward, (params, hidden), {}, names,
                                         [libspu.Visibility.VIS_SECRET] * len(args), lambda outs: ["out"],
                                         copts=copts)
    return executable, args


# --- parties ---------------------------------------------------------------------------------

def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def link_desc(ports: list[int]) -> libspu.link.Desc:
    desc = libspu.link.Desc()
    desc.recv_timeout_ms = 3600 * 1000  # a party may wait minutes for a slower one
    desc.connect_retry_times, desc.connect_retry_interval_ms = 120, 1000
    for rank, port in enumerate(ports):
        desc.add_party(f"P{rank}", f"127.0.0.1:{port}")
    return desc


def put_blob(f, data: bytes) -> None:
    """Length-prefixed bytes: the party files hold SPU's serialized executable and shares (no pickle)."""
    f.write(len(data).to_bytes(8, "little"))
    f.write(data)


def get_blob(f) -> bytes:
    return f.read(int.from_bytes(f.read(8), "little"))


def put_share(f, value: libspu.Share) -> None:
    put_blob(f, value.meta)
    put_blob(f, len(value.share_chunks).to_bytes(8, "little"))
    for chunk in value.share_chunks:
        put_blob(f, chunk)


def get_share(f) -> tuple[bytes, list[bytes]]:
    meta = get_blob(f)
    return meta, [get_blob(f) for _ in range(int.from_bytes(get_blob(f), "little"))]


def share(meta_and_chunks) -> libspu.Share:
    value = libspu.Share()
    value.meta, value.share_chunks = meta_and_chunks
    return value


def party(rank: int, folder: Path, ports: list[int]) -> None:
    """One SPU party: load its shares, barrier, run, write its output share and seconds."""
    with open(folder / f"party{rank}.bin", "rb") as f:
        executable = libspu.Executable()
        executable.ParseFromString(get_blob(f))
        count = int.from_bytes(get_blob(f), "little")
        inputs = [get_share(f) for _ in range(count)]
    link = libspu.link.create_brpc(link_desc(ports), rank)
    runtime = spu_api.Runtime(link, runtime_config())
    for name, value in zip(executable.input_names, inputs):
        runtime.set_var(name, share(value))
    del inputs
    link.barrier()
    start = time.perf_counter()
    runtime.run(executable)
    seconds = time.perf_counter() - start
    out = runtime.get_var(executable.output_names[0])
    with open(folder / f"out{rank}.bin", "wb") as f:
        put_blob(f, json.dumps({"seconds": seconds}).encode())
        put_share(f, out)
    link.barrier()
    link.stop_link()


def launch(folder: Path, executable: libspu.Executable, args: list[np.ndarray]) -> list[dict]:
    """Share the inputs into per-party files, run three party processes, return their reports."""
    io = spu_api.Io(PARTIES, runtime_config())
    files = [open(folder / f"party{rank}.bin", "wb") for rank in range(PARTIES)]
    for f in files:
        put_blob(f, executable.SerializeToString())
        put_blob(f, len(args).to_bytes(8, "little"))
    for arg in args:  # one argument's shares in memory at a time
        for f, value in zip(files, io.make_shares(np.asarray(arg), libspu.Visibility.VIS_SECRET)):
            put_share(f, value)
    for f in files:
        f.close()

    ports = [str(p) for p in free_ports(PARTIES)]
    logs = [open(folder / f"party{rank}.log", "wb") for rank in range(PARTIES)]
    processes = [subprocess.Popen([sys.executable, __file__, str(folder), "--party", str(rank), "--ports", *ports],
                                  stdout=log, stderr=subprocess.STDOUT) for rank, log in enumerate(logs)]
    try:
        while any(p.poll() is None for p in processes):
            if any(p.returncode not in (None, 0) for p in processes):
                break
            time.sleep(0.5)
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
            p.wait()
        for log in logs:
            log.close()
        for rank in range(PARTIES):
            (folder / f"party{rank}.bin").unlink(missing_ok=True)
    reports = []
    for rank, p in enumerate(processes):
        text = (folder / f"party{rank}.log").read_text(errors="replace")
        if p.returncode != 0:
            raise RuntimeError(f"PUMA party {rank} exited with {p.returncode}:\n{text[-3000:]}")
        sent, received, send_actions, recv_actions = map(int, LINK_DETAILS.findall(text)[-1])
        with open(folder / f"out{rank}.bin", "rb") as f:
            seconds = json.loads(get_blob(f))["seconds"]
            out = get_share(f)
        (folder / f"out{rank}.bin").unlink()
        reports.append({"seconds": seconds, "sent_bytes": sent, "received_bytes": received,
                        "send_actions": send_actions, "recv_actions": recv_actions, "share": out})
    return reports


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--party", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--ports", nargs=PARTIES, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.party is not None:
        party(args.party, args.folder, args.ports)
        return

    start = time.perf_counter()
    executable, inputs = compile_encoder(args.folder)
    compile_seconds = time.perf_counter() - start
    reports = launch(args.folder, executable, inputs)
    output = spu_api.Io(PARTIES, runtime_config()).reconstruct([share(r.pop("share")) for r in reports])
    np.save(args.folder / "puma.npy", output)
    result = {"online_seconds": max(r["seconds"] for r in reports),
              "bytes": sum(r["sent_bytes"] for r in reports),
              "rounds": max(r["send_actions"] for r in reports),
              "parties": reports,
              "system": f"PUMA: SPU {spu.__version__}, ABY3, FM64, {FRACTION_BITS} fractional bits, "
                        f"Taylor exp {EXP_ITERS} iterations, PUMA GeLU and softmax; 3 processes, loopback TCP",
              "compile_seconds": compile_seconds, "wall_seconds": time.perf_counter() - start}
    (args.folder / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "parties"}))


if __name__ == "__main__":
    main()
