"""fss on a GPU: the CUDA path against the CPU path bit for bit, then GPT-2 at 128 tokens online.

Prepared for a lent GPU (one short call; see the device tool's README): both servers run as two
threads of one process on the one GPU (the dealer's keys are made on the CPU first, as always).

1. Bit-identity: a tiny BERT, GPT-2 and Llama, the same keys and input shares served once on the
   CPU (OpenSSL AES, int64 matmul) and once on CUDA (table AES in torch ops, float64-limb
   matmuls): outputs must be equal bit for bit.
2. GPT-2 124M size, random weights, 128 tokens: online seconds with both servers on the GPU
   (target <= 1.0 s; Sigma: 1.6 s on two GPUs, reruns 0.93 s on an RTX 5090 pair), keys read
   from memory.

    python benchmarks/bench_fss_gpu.py [--layers 12] [--seq 128] [--out $OUT/fss-gpu.json]

On the device machine ``cryptography`` is not installed: carry its wheel (and cffi's) and
``pip install --no-index --find-links wheels cryptography`` first.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_fss import build, public_fields  # noqa: E402

from hf_secure.protocols.fss.local import run_model_local  # noqa: E402
from hf_secure.protocols.fss.models import program_for  # noqa: E402


def tiny(family: str):
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if family == "bert":
        cfg = BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=128)
        return cfg, BertModel(cfg, add_pooling_layer=False).eval()
    if family == "gpt2":
        cfg = GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4)
        return cfg, GPT2LMHeadModel(cfg).eval()
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    return cfg, LlamaForCausalLM(cfg).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device here")
    result = {"device": torch.cuda.get_device_name(0), "identical": {}}
    for family in ("bert", "gpt2", "llama"):
        cfg, model = tiny(family)
        weights = {k: v.float() for k, v in model.state_dict().items()}
        ids, public = public_fields(family, 8)
        ids = ids % cfg.vocab_size
        runs, _ = run_model_local(program_for(cfg, family), weights, ids, public, cfg.vocab_size,
                                  variants=[{}, {"device": "cuda"}])
        result["identical"][family] = bool(torch.equal(runs[0][0], runs[1][0]))
        print(family, "CPU and CUDA outputs identical:", result["identical"][family], flush=True)
    config, model, family = build("gpt2", args.layers)
    weights = {k: v.float() for k, v in model.state_dict().items()}
    ids, public = public_fields(family, args.seq)
    program = program_for(config, family)
    times = []
    for _ in range(3):  # the first run warms CUDA up
        torch.cuda.synchronize()
        (out,), report = run_model_local(program, weights, ids, public, config.vocab_size, device="cuda")
        times.append(max(report["online_seconds"]))
    result.update({"gpt2_seq": args.seq, "gpt2_layers": args.layers, "online_seconds_runs": times,
                   "online_seconds_median": sorted(times)[1], "date": time.strftime("%Y-%m-%d")})
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
