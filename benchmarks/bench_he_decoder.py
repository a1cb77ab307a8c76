"""Generation through he: GPT-2-size (or Llama-like) layers, one query per generated token.

A prompt of real text (GPT-2's tokenizer of the demo model, truncated to ``--prompt`` tokens) and
``--new`` greedy tokens through ``SecureModelForCausalLM.from_pretrained(DIR, protocol="he")``
(server in this process, the KV cache encrypted on it), against transformers on the same input.
Prints and records per query (the prompt's, then each new token's): seconds, client compute
seconds, bytes each way (evaluation keys apart, sent once), refreshes, the largest logit error
against transformers on the whole sequence so far; and whether every greedy token agrees.

* ``--model gpt2``: GPT-2 small's shape (hidden 768, 12 heads, FFN 3072, GELU-tanh), random
  weights and LayerNorms (nothing can be downloaded here), ``--layers`` of them (default 1).
* ``--model llama``: a Llama-like shape of the same width (hidden 768, 12 heads of 64, 4 KV
  heads, SwiGLU 2048, RoPE), random weights and RMSNorms.

    python benchmarks/bench_he_decoder.py --model gpt2 [--layers 1] [--prompt 16] [--new 2] [--out benchmarks/he/gpt2-layer.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, LlamaConfig

sys.path.insert(0, str(Path(__file__).parent))
from bench_he_model import randomize_norms, record  # noqa: E402
from bench_mpc_accuracy import SENTENCES  # noqa: E402

from hf_secure import SecureModelForCausalLM  # noqa: E402
from hf_secure.demo import DEMO_MODEL  # noqa: E402


def build(folder: Path, model: str, layers: int, vocab: int):
    torch.manual_seed(0)
    if model == "gpt2":
        config = GPT2Config(n_layer=layers, vocab_size=vocab, n_positions=128, bos_token_id=0, eos_token_id=0)
    else:
        config = LlamaConfig(num_hidden_layers=layers, hidden_size=768, num_attention_heads=12, num_key_value_heads=4,
                             intermediate_size=2048, vocab_size=vocab, max_position_embeddings=128)
    plain = AutoModelForCausalLM.from_config(config).eval()
    randomize_norms(plain)
    plain.save_pretrained(folder)
    return plain


def measured(engine, step):
    """Run ``step()`` (one forward: one query) and return its output and the query's figures."""
    before = (engine.stats.bytes_sent, engine.stats.bytes_received, engine.refreshes, engine.client_seconds,
              engine.key_bytes)
    start = time.perf_counter()
    out = step()
    seconds = time.perf_counter() - start
    keys = engine.key_bytes - before[4]
    return out, {"seconds": seconds, "client_seconds": engine.client_seconds - before[3],
                 "client_to_server_bytes": engine.stats.bytes_sent - before[0] - keys,
                 "server_to_client_bytes": engine.stats.bytes_received - before[1],
                 "refreshes": engine.refreshes - before[2], "evaluation_key_bytes": keys}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=("gpt2", "llama"), default="gpt2")
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--new", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(str(DEMO_MODEL))
    ids = tokenizer(" ".join(SENTENCES), return_tensors="pt")["input_ids"][:, :args.prompt]
    with tempfile.TemporaryDirectory() as tmp:
        plain = build(Path(tmp), args.model, args.layers, len(tokenizer))
        secure = SecureModelForCausalLM.from_pretrained(tmp, protocol="he")
    # greedy decoding by hand: the prompt, then one query per token on the encrypted cache
    queries, errors, agree = [], [], True
    sequence, new_ids, cache = ids, ids, None
    for _ in range(args.new + 1):
        out, figures = measured(secure.engine, lambda: secure(new_ids, past_key_values=cache, use_cache=True))
        cache = out.past_key_values
        with torch.no_grad():
            want = plain(sequence).logits[:, -new_ids.shape[1]:]
        errors.append(float((out.logits - want).abs().max()))
        agree &= bool(torch.equal(out.logits[:, -1].argmax(-1), want[:, -1].argmax(-1)))
        queries.append({"new_tokens": int(new_ids.shape[1]), **figures, "max_logit_error": errors[-1]})
        print(json.dumps(queries[-1]), flush=True)
        new_ids = want[:, -1:].argmax(-1)
        sequence = torch.cat([sequence, new_ids], 1)
    report = secure.engine.report()
    result = {
        "model": args.model, "layers": args.layers, "prompt_tokens": int(ids.shape[1]), "new_tokens": args.new,
        "queries": queries, "tokens_agree": agree, "max_logit_error": max(errors),
        "logit_scale": float(want.abs().max()),
        "server_operations": dict(vars(secure.engine.server.ctx.costs)),
        "params": report["params"], "bounds": report["bounds"],
    }
    record(result, args.out)


if __name__ == "__main__":
    main()
