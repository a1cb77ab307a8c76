"""CrypTen 0.4.1 baseline: a Hugging Face BERT encoder under 2-party MPC (benchmark only).

CrypTen cannot convert HF BERT (``crypten.nn.from_pytorch`` lacks ONNX ops), so the encoder is
written here by hand from CrypTensor operations, with CrypTen's own default approximations
(16 fractional bits in a 64-bit ring):

* Linear layers: Beaver-triple matmuls of secret activations with secret weights.
* Softmax: ``CrypTensor.softmax`` (max by a comparison tree, exp as (1 + x/2^8)^(2^8), reciprocal
  by 10 Newton steps). Padding keys get a public additive bias of ``MASK_BIAS`` before it.
* GeLU: CrypTen 0.4.1 has no GeLU, so the exact one, 0.5 x (1 + erf(x / sqrt 2)), with CrypTen's
  erf: its Taylor series to degree 17 (``cfg.functions.erf_iterations`` = 8 terms). CrypTen's own
  ``erf`` is unusable: it computes the odd powers with ``pow``, whose odd branch returns
  x^(3(p-1)/2) instead of x^p for p >= 5 (erf(1.5) comes out 0.28), so ``_erf`` evaluates the same
  series with the same square-and-multiply recursion, odd branch fixed (same multiplications and
  rounds). The series itself diverges past |x / sqrt 2| of about 2.5: GeLU is accurate to 1e-4
  for |x| <= 2, 8e-3 at 2.5, 0.28 at 3, 71 at 4. Fine for small random weights; trained BERT has
  larger pre-GeLU values.
* LayerNorm: mean and biased variance by ``mean`` (``CrypTensor.var`` is not used: its
  ``unbiased`` flag is inverted in 0.4.1), then ``inv_sqrt`` (3 Newton steps from an exp-based
  start: relative error 0.5% at variance 0.1, 0.1% at 1, 0.3% at 10, 1.6% at 300, 40% at 0.01,
  garbage at 1000).

Roles: party 0, the model owner, secret-shares the encoder weights; party 1, the client, shares
its input. The client's input is the embedding output (word + position + token-type embeddings and
the embeddings LayerNorm), computed in plaintext on the client, as with hf_secure's client-held
embeddings: token ids never leave the client and the encoder is what runs under MPC. The attention
mask (sequence lengths) and the architecture are public. The output is revealed to party 1 only.
Each party runs in its own spawned process; with provider "TTP" a third process is the dealer.

Tuples (Beaver triples and the like) come from CrypTen's provider: "TTP" (a dealer process that
sends party 0 its correction shares; party 1 draws its shares from a seed shared with the dealer)
or "TFP" (party 0 generates every tuple in clear and secret-shares it: benchmark-only, insecure).
CrypTen normally fetches tuples during the forward pass. With ``precompute=True`` (default) a
run has three phases, each measured:

* ``ondemand``: CrypTen's default, tuples fetched during the run; the tuple requests are recorded.
* ``offline``: the recorded requests are filled into CrypTen's tuple cache (``fill_cache``).
* ``online``: the same forward with every tuple from the cache: no dealer traffic.

Communication comes from CrypTen's communicator (``crypten.cfg.communicator.verbose = True``,
then ``crypten.comm.get().get_communication_stats()``; it counts each collective as one round and
logs, per party, the elements it sends and receives times 8 bytes). ``bytes`` and ``rounds`` are
party 1's counts: all traffic between the two computing parties, both directions. Party 0 also
logs its traffic with the dealer; ``dealer_bytes`` is the difference. ``seconds`` is the slower
party's wall time, from a barrier to the output revealed to the client (sharing the input, which
costs no communication, included; sharing the weights excluded).

    python benchmarks/crypten_bert.py --layers 2 --hidden 128 --heads 2 --intermediate 512 --seq 16

prints one JSON line. Requires CrypTen (see ``crypten_compat.INSTALL``).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import queue
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from safetensors.torch import load_file, save_file

try:
    from .crypten_compat import import_crypten
except ImportError:  # run as a script from benchmarks/
    from crypten_compat import import_crypten

if TYPE_CHECKING:
    from transformers import BertModel

PROVIDERS = ("TTP", "TFP")
DEALER_RANK = 2
# Public bias on padding keys before softmax. CrypTen's exp, (1 + x/256)^256, is only valid for
# x >= -256 (an even power of a negative base blows up) and underflows to 0 at 16 fractional bits
# below about -11, so a masked logit must land in (-256, -11): -128 leaves over 100 either way.
MASK_BIAS = -128.0


@dataclass(frozen=True)
class _Job:
    """What every spawned party needs; plain data, pickled by multiprocessing."""

    rendezvous: str
    provider: str
    precompute: bool
    threads: int
    weights_path: str  # encoder weights, 2-D ones transposed; read by party 0 only
    input_path: str  # the client's embedding output; read by party 1 only
    shapes: dict[str, tuple[int, ...]]  # public architecture: weight shapes
    input_shape: tuple[int, ...]
    mask_bias: torch.Tensor  # public, (batch, 1, 1, seq)
    layers: int
    heads: int
    eps: float
    erf_terms: int  # CrypTen's cfg.functions.erf_iterations


def _linear(x, params: dict, prefix: str):
    """x @ W^T + b, with W stored transposed."""
    return x.matmul(params[f"{prefix}.weight"]) + params[f"{prefix}.bias"]


def _layer_norm(x, params: dict, prefix: str, eps: float):
    """LayerNorm over the last dimension with CrypTen's ``inv_sqrt``."""
    centered = x - x.mean(-1, keepdim=True)
    variance = centered.square().mean(-1, keepdim=True)
    normalized = centered * (variance + eps).inv_sqrt()
    return normalized * params[f"{prefix}.weight"] + params[f"{prefix}.bias"]


def _pow(x, p: int):
    """x^p for p >= 1 by CrypTen's square-and-multiply recursion, with its odd branch fixed."""
    if p == 1:
        return x
    if p % 2 == 0:
        return _pow(x.square(), p // 2)
    return _pow(x.square(), (p - 1) // 2).mul(x)


def _erf(u, terms: int):
    """CrypTen's erf: the Taylor series 2/sqrt(pi) sum_n (-1)^n u^(2n+1) / (n! (2n+1))."""
    out = u
    for n in range(1, terms + 1):
        out = out + _pow(u, 2 * n + 1).mul((-1) ** n / (math.factorial(n) * (2 * n + 1)))
    return out.mul(2 / math.sqrt(math.pi))


def _gelu(x, erf_terms: int):
    """Exact GeLU, 0.5 x (1 + erf(x / sqrt 2))."""
    return x.mul(0.5) * (_erf(x.mul(1 / math.sqrt(2)), erf_terms) + 1)


def _encoder(x, params: dict, job: _Job):
    """The BERT encoder (post-LayerNorm layers, as HF ``BertLayer``) on a CrypTensor."""
    batch, seq, hidden = x.size()
    head_dim = hidden // job.heads

    def split_heads(t):
        return t.view(batch, seq, job.heads, head_dim).permute(0, 2, 1, 3)

    for i in range(job.layers):
        layer = f"layer.{i}"
        q, k, v = (split_heads(_linear(x, params, f"{layer}.attention.self.{name}"))
                   for name in ("query", "key", "value"))
        scores = q.matmul(k.transpose(-1, -2)).mul(1 / math.sqrt(head_dim)) + job.mask_bias
        context = scores.softmax(-1).matmul(v).permute(0, 2, 1, 3).reshape(batch, seq, hidden)
        attended = _linear(context, params, f"{layer}.attention.output.dense") + x
        x = _layer_norm(attended, params, f"{layer}.attention.output.LayerNorm", job.eps)
        intermediate = _gelu(_linear(x, params, f"{layer}.intermediate.dense"), job.erf_terms)
        out = _linear(intermediate, params, f"{layer}.output.dense") + x
        x = _layer_norm(out, params, f"{layer}.output.LayerNorm", job.eps)
    return x


def _measure(comm, fn: Callable):
    """Run ``fn`` from a barrier; return its result, wall seconds and this party's comm stats."""
    comm.barrier()
    comm.reset_communication_stats()
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    stats = comm.get_communication_stats()
    return result, {"seconds": seconds, "bytes": int(stats["bytes"]), "rounds": stats["rounds"],
                    "comm_seconds": stats["time"]}


def _party(rank: int, job: _Job, results) -> None:
    """Entry point of one spawned process: party 0, party 1 or the TTP dealer."""
    torch.set_num_threads(job.threads)
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), RENDEZVOUS=job.rendezvous,
                      DISTRIBUTED_BACKEND="gloo")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # parties talk over loopback only
    crypten = import_crypten()
    crypten.cfg.mpc.provider = job.provider
    crypten.cfg.communicator.verbose = True  # without it CrypTen counts no communication
    if rank == DEALER_RANK:
        crypten.mpc.provider.TTPServer()  # initialises, then serves party 0 until it shuts down
        crypten.uninit()
        return

    crypten.init()
    comm = crypten.comm.get()
    # Shares are drawn from PRGs shared by the parties: both must create them in the same order
    # (job.shapes order; load_file returns the keys sorted).
    plain = load_file(job.weights_path) if rank == 0 else None
    params = {name: crypten.cryptensor(plain[name] if rank == 0 else torch.zeros(shape), src=0)
              for name, shape in job.shapes.items()}
    if rank == 1:
        hidden = load_file(job.input_path)["hidden_states"]
    else:
        hidden = torch.zeros(job.input_shape)

    def forward():
        return _encoder(crypten.cryptensor(hidden, src=1), params, job).get_plain_text(dst=1)

    phases = {}
    provider = crypten.mpc.get_default_provider()
    if job.precompute:
        crypten.trace()  # record the tuple requests of a run with on-demand tuples
        _, phases["ondemand"] = _measure(comm, forward)
        crypten.trace(False)
        _, phases["offline"] = _measure(comm, provider.fill_cache)
    output, phases["online"] = _measure(comm, forward)
    if any(provider.tuple_cache.values()):
        raise RuntimeError("the online phase left precomputed tuples unused: tuple cache mismatch")
    results.put((rank, {"phases": phases, "output": output}))
    crypten.uninit()


def _launch(job: _Job) -> dict[int, dict]:
    """Spawn the parties (and the dealer for TTP); return the computing parties' reports."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    ranks = [0, 1] + ([DEALER_RANK] if job.provider == "TTP" else [])
    processes = [context.Process(target=_party, args=(rank, job, results), daemon=True)
                 for rank in ranks]
    for process in processes:
        process.start()
    reports: dict[int, dict] = {}
    try:
        while len(reports) < 2:
            try:
                rank, report = results.get(timeout=1.0)
                reports[rank] = report
            except queue.Empty:
                if any(process.exitcode not in (None, 0) for process in processes):
                    raise RuntimeError("a CrypTen party failed; its traceback is printed above")
        for process in processes:
            process.join(timeout=60)
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
                process.join()
    return reports


def _phase(reports: dict[int, dict], name: str) -> dict:
    """Combine both parties' view of one phase (see the module docstring)."""
    p0, p1 = reports[0]["phases"][name], reports[1]["phases"][name]
    return {"seconds": max(p0["seconds"], p1["seconds"]), "bytes": p1["bytes"],
            "rounds": p1["rounds"], "dealer_bytes": p0["bytes"] - p1["bytes"],
            "comm_seconds": max(p0["comm_seconds"], p1["comm_seconds"])}


def run_crypten_bert(model: BertModel, input_ids: torch.Tensor,
                     attention_mask: torch.Tensor | None = None, provider: str = "TTP",
                     precompute: bool = True, threads: int = 1) -> dict:
    """Run ``model``'s encoder under CrypTen 2PC on ``input_ids`` and compare with plaintext.

    ``model`` is a plaintext HF ``BertModel`` (GeLU activation, absolute positions); its encoder
    weights reach the parties through a temporary safetensors file. ``threads`` is torch's thread
    count in each party. Returns ``output`` (the decrypted last_hidden_state), ``max_abs_error``
    against ``model(input_ids, attention_mask).last_hidden_state``, ``provider``, ``precompute``,
    ``online_seconds``, ``bytes`` and ``rounds`` of the online phase, and ``phases``: per phase
    (``online``, and with ``precompute`` also ``ondemand`` and ``offline``) its ``seconds``,
    ``bytes``, ``rounds``, ``dealer_bytes`` and ``comm_seconds``.
    """
    if provider not in PROVIDERS:
        raise ValueError(f"provider must be one of {PROVIDERS}, not {provider!r}")
    config = model.config
    position_type = getattr(config, "position_embedding_type", "absolute")
    if config.hidden_act != "gelu" or position_type != "absolute":
        raise ValueError("only BERT with hidden_act='gelu' and absolute positions is supported")
    crypten = import_crypten()  # fail here, with the install commands, not in the parties
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)

    model = model.eval()
    with torch.no_grad():
        hidden = model.embeddings(input_ids=input_ids)  # the client's plaintext part
        reference = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    weights = {name: (tensor.t() if tensor.dim() == 2 else tensor).contiguous()
               for name, tensor in model.encoder.state_dict().items()}
    mask_bias = (1.0 - attention_mask[:, None, None, :].float()) * MASK_BIAS

    with tempfile.TemporaryDirectory(prefix="crypten-bert-") as folder:
        folder = Path(folder)
        save_file(weights, folder / "encoder.safetensors")
        save_file({"hidden_states": hidden.contiguous()}, folder / "input.safetensors")
        job = _Job(rendezvous=f"file://{folder / 'rendezvous'}", provider=provider,
                   precompute=precompute, threads=threads,
                   weights_path=str(folder / "encoder.safetensors"),
                   input_path=str(folder / "input.safetensors"),
                   shapes={name: tuple(tensor.shape) for name, tensor in weights.items()},
                   input_shape=tuple(hidden.shape), mask_bias=mask_bias,
                   layers=config.num_hidden_layers, heads=config.num_attention_heads,
                   eps=config.layer_norm_eps,
                   erf_terms=crypten.cfg.functions.erf_iterations)
        reports = _launch(job)

    output = reports[1]["output"]
    phases = {name: _phase(reports, name) for name in reports[0]["phases"]}
    return {"output": output, "max_abs_error": (output - reference).abs().max().item(),
            "provider": provider, "precompute": precompute,
            "online_seconds": phases["online"]["seconds"], "bytes": phases["online"]["bytes"],
            "rounds": phases["online"]["rounds"], "phases": phases}


def random_bert(layers: int, hidden: int, heads: int, intermediate: int,
                seed: int = 0) -> BertModel:
    """A random BertModel (no pooler) with non-trivial LayerNorm weights and biases."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                        intermediate_size=intermediate, vocab_size=1000)
    model = BertModel(config, add_pooling_layer=False).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--intermediate", type=int, default=512)
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--pad", type=int, default=0, help="padding tokens at the end of row 0")
    parser.add_argument("--provider", choices=PROVIDERS, default="TTP")
    parser.add_argument("--no-precompute", dest="precompute", action="store_false",
                        help="only CrypTen's default run, tuples fetched during the forward")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per party")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    model = random_bert(args.layers, args.hidden, args.heads, args.intermediate)
    input_ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq),
                              generator=torch.Generator().manual_seed(1))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, args.seq - args.pad:] = 0
    result = run_crypten_bert(model, input_ids, attention_mask, provider=args.provider,
                              precompute=args.precompute, threads=args.threads)
    del result["output"]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
