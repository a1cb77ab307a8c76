"""Permute protocol vs plaintext transformers, in one run, on the same inputs.

GPT-2-small-size config (12 layers, hidden 768, 12 heads, vocabulary 50257; random weights and
random LayerNorm parameters), for both embedding placements:

* forward at 128 tokens: plaintext vs protocol in process vs protocol over HTTP (loopback);
* 32-token greedy generation, same three ways (tokens checked identical);
* client-side cost: the client's transforms (permutation gathers) and, with client-held
  embeddings, the client's share of the model (embedding lookup, LM head), each vs server time;
* per-token HTTP overhead: (HTTP generation - in-process generation) / 32.

Timings are medians over ``--repeats`` runs, interleaved so that drift hits all variants alike.

    python benchmarks/bench_permute.py [--repeats 9] [--layers 12]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import hf_secure
from hf_secure.convert import convert_permute
from hf_secure.modeling import SecureModelForCausalLM
from hf_secure.server.process import served


def median_time(fn, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def build_model(layers: int, folder: Path) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=layers, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    model.save_pretrained(folder)
    return model


def bench_mode(plain, src: Path, work: Path, embeddings: str, repeats: int, seq: int, new_tokens: int) -> dict:
    folder, key = work / f"conv-{embeddings}", work / f"{embeddings}.key.safetensors"
    convert_permute(src, folder, key, embeddings=embeddings, seed=1)
    local = SecureModelForCausalLM.from_pretrained(folder, key=key)
    ids = torch.randint(0, 50257, (1, seq), generator=torch.Generator().manual_seed(2))
    gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    engine, server = local.engine.client, local.engine.backend.server

    with served(str(folder)) as (_, url), torch.inference_mode():
        remote = SecureModelForCausalLM.from_pretrained(folder, key=key, server_url=url, timeout=120)
        # warm-up and correctness, the same inputs for every variant
        ref_logits = plain(ids).logits
        errors = {name: (m(ids, use_cache=False).logits - ref_logits).abs().max().item()
                  for name, m in (("in_process", local), ("http", remote))}
        ref_tokens = plain.generate(ids, **gen)
        same = {name: torch.equal(m.generate(ids, **gen), ref_tokens) for name, m in (("in_process", local), ("http", remote))}

        variants = {
            "plain": plain,
            "in_process": lambda x, **kw: local(x, use_cache=False, **kw),
            "http": lambda x, **kw: remote(x, use_cache=False, **kw),
        }
        forward = {name: [] for name in variants}
        generate = {name: [] for name in variants}
        for _ in range(repeats):  # interleaved
            for name, fn in variants.items():
                forward[name].append(median_time(lambda: fn(ids), 1))
            for name, m in (("plain", plain), ("in_process", local), ("http", remote)):
                generate[name].append(median_time(lambda: m.generate(ids, **gen), 1))
        forward = {k: statistics.median(v) for k, v in forward.items()}
        generate = {k: statistics.median(v) for k, v in generate.items()}

        # Client-side work on the same shapes: transforms vs the server's forward.
        encoded = engine.encode(ids, None)
        wanted = engine.server_output("logits")
        server_out = server.forward(encoded, output=wanted)[0][wanted]
        server_s = median_time(lambda: server.forward(encoded, output=wanted), repeats)
        encode_s = median_time(lambda: engine.encode(ids, None), repeats * 4)
        decode_s = median_time(lambda: engine.decode(server_out, "logits"), repeats * 4)
        if embeddings == "client":
            # E[:, pi] and W_head[:, pi] are precomputed from the key, so the client's work is the
            # embedding lookup and the LM head, exactly as in the plaintext model: no transform is left.
            transform_s = 0.0
            client_model_s = encode_s + decode_s
        else:
            transform_s = encode_s + decode_s
            client_model_s = 0.0
    return {
        "embeddings": embeddings,
        "max_abs_logit_error": errors,
        "greedy_tokens_identical": same,
        "forward_s": forward,
        "generate_s": generate,
        "forward_ratio_in_process": forward["in_process"] / forward["plain"],
        "generate_ratio_in_process": generate["in_process"] / generate["plain"],
        "forward_ratio_http": forward["http"] / forward["plain"],
        "generate_ratio_http": generate["http"] / generate["plain"],
        "server_forward_s": server_s,
        "client_transform_s": transform_s,
        "client_transform_share_of_server": transform_s / server_s,
        "client_model_compute_s": client_model_s,
        "http_overhead_per_token_ms": 1000 * (generate["http"] - generate["in_process"]) / new_tokens,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"# bench_permute: hf_secure {hf_secure.__version__}, torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print(f"# GPT-2 config: {args.layers} layers, hidden 768, vocab 50257; forward at {args.seq} tokens; "
          f"greedy generation of {args.new_tokens} tokens; median of {args.repeats}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        plain = build_model(args.layers, work / "plain")
        for embeddings in ("server", "client"):
            r = bench_mode(plain, work / "plain", work, embeddings, args.repeats, args.seq, args.new_tokens)
            print(f"\n## embeddings={embeddings}")
            print(f"max |logit error| in-process {r['max_abs_logit_error']['in_process']:.2e}, "
                  f"HTTP {r['max_abs_logit_error']['http']:.2e}; greedy tokens identical: {r['greedy_tokens_identical']}")
            print("| variant | forward 128 tok (s) | ratio | generate 32 tok (s) | ratio |")
            print("|---|---|---|---|---|")
            for name in ("plain", "in_process", "http"):
                print(f"| {name} | {r['forward_s'][name]:.4f} | {r['forward_s'][name] / r['forward_s']['plain']:.3f} "
                      f"| {r['generate_s'][name]:.4f} | {r['generate_s'][name] / r['generate_s']['plain']:.3f} |")
            print(f"client transforms {1000 * r['client_transform_s']:.3f} ms vs server forward "
                  f"{1000 * r['server_forward_s']:.1f} ms = {100 * r['client_transform_share_of_server']:.3f} %")
            if embeddings == "client":
                print(f"client's share of the model (embedding lookup + LM head): "
                      f"{1000 * r['client_model_compute_s']:.1f} ms")
            print(f"HTTP overhead per generated token: {r['http_overhead_per_token_ms']:.2f} ms")


if __name__ == "__main__":
    main()
