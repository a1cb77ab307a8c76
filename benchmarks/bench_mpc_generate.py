"""Private greedy generation through the mpc protocol: the embedded demo GPT-2.

Converts the model with ``convert_approximate`` (SecFormer GeLU, exact-style softmax), generates
``--new-tokens`` tokens greedily through ``SecureModelForCausalLM`` (every party on this machine, one
torch thread each, the KV cache kept as shares by the servers) and with the plaintext approximated
model, and prints per query (prompt, then one per new token): server 0's
online seconds, bytes between the servers, rounds, and the dealer's offline bytes; plus whether the
tokens equal plaintext.

    python benchmarks/bench_mpc_generate.py [--new-tokens 16] [--reveal token]

``--reveal token``: the servers compute each step's argmax on shares and the client learns the token
only (``from_pretrained(..., reveal="token")``).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_secure import SecureModelForCausalLM
from hf_secure.compat import CACHE_NAME
from hf_secure.convert import convert_approximate
from hf_secure.demo import DEMO_MODEL, DEMO_PROMPT
from hf_secure.protocols.mpc.run import online_traffic


def secure_greedy(model, ids: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, list[dict]]:
    """Greedy decoding by hand (what ``generate`` does), keeping every query's report."""
    out = model(ids, use_cache=True)
    cache, tokens, reports = getattr(out, CACHE_NAME), ids, [model.secure_report()]
    for _ in range(new_tokens - 1):
        tokens = torch.cat([tokens, out.logits[:, -1:].argmax(-1)], dim=1)
        out = model(tokens[:, -1:], **{CACHE_NAME: cache}, use_cache=True, logits_to_keep=1)
        reports.append(model.secure_report())
    return torch.cat([tokens, out.logits[:, -1:].argmax(-1)], dim=1), reports


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--reveal", choices=("logits", "token"), default="logits")
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="approx-demo-")
    convert_approximate(str(DEMO_MODEL), folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer(DEMO_PROMPT, return_tensors="pt").input_ids
    plain = AutoModelForCausalLM.from_pretrained(folder).eval()
    torch.set_num_threads(1)
    start = time.perf_counter()
    expected = plain.generate(ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
    plain_seconds = time.perf_counter() - start
    model = SecureModelForCausalLM.from_pretrained(folder, protocol="mpc", reveal=args.reveal)
    try:
        with torch.no_grad():
            got, reports = secure_greedy(model, ids, args.new_tokens)
    finally:
        model.engine.close()
    rows = []
    for report in reports:
        traffic = online_traffic(report["SERVER0"])
        rows.append({"online_seconds": round(report["SERVER0"]["online_seconds"], 3),
                     "bytes": traffic["bytes_sent"] + traffic["bytes_received"], "rounds": traffic["rounds"],
                     "offline_bytes": report["DEALER"]["offline_bytes"]})
    config = plain.config
    print(f"# bench_mpc_generate: demo GPT-2 ({config.n_layer} layers, hidden {config.n_embd}, vocab "
          f"{config.vocab_size}), prompt {ids.shape[1]} tokens, {args.new_tokens} new tokens, reveal={args.reveal}, "
          "1 thread per party")
    print("prompt:", json.dumps(rows[0]))
    steps = rows[1:]
    mean = {k: sum(r[k] for r in steps) / len(steps) for k in steps[0]}
    print("per new token (mean):", json.dumps({k: round(v, 3) for k, v in mean.items()}))
    total = sum(r["online_seconds"] for r in rows)
    print(f"online total {total:.2f} s vs plaintext generate {plain_seconds:.3f} s ({total / plain_seconds:.0f}x); "
          f"tokens equal plaintext: {torch.equal(got, expected)}")
    print("text:", tokenizer.decode(got[0]))


if __name__ == "__main__":
    main()
