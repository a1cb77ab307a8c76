"""The demo: convert a model, serve it over HTTP, generate privately, compare with plaintext.

Default model: the small GPT-2 trained by ``scripts/train_demo_model.py`` and shipped in
``hf_secure/assets/demo-gpt2``; any local folder or Hub id can be named instead.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

from .convert import convert_permute
from .server.process import served

DEMO_MODEL = Path(__file__).parent / "assets" / "demo-gpt2"
DEMO_PROMPT = "It is a truth universally acknowledged"
# Greedy decoding with a repetition penalty: deterministic, so the private run must reproduce the
# plaintext tokens exactly, and readable from a 2M-parameter model.
GENERATION = {"do_sample": False, "repetition_penalty": 1.3}


def run_demo(model: str | None = None, prompt: str | None = None, max_new_tokens: int = 32,
             embeddings: str = "client") -> dict:
    source = str(model or DEMO_MODEL)
    prompt = prompt or DEMO_PROMPT
    with tempfile.TemporaryDirectory(prefix="hf_secure_demo_") as work:
        folder, key = Path(work) / "model", Path(work) / "client.key.safetensors"
        start = time.perf_counter()
        section = convert_permute(source, folder, key, embeddings=embeddings)
        print(f"[1/4] converted {source} for protocol 'permute' ({embeddings}-held embeddings) "
              f"in {time.perf_counter() - start:.1f} s; key {section['key_fingerprint'][:23]}... kept outside the model")

        tokenizer = AutoTokenizer.from_pretrained(source)
        plain = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
        ids = tokenizer(prompt, return_tensors="pt")
        start = time.perf_counter()
        reference = plain.generate(**ids, max_new_tokens=max_new_tokens, **GENERATION)
        plain_s = time.perf_counter() - start

        with served(str(folder)) as (_, url):
            print(f"[2/4] server started at {url} (it holds no key)")
            generator = pipeline("secure-text-generation", model=str(folder), key=str(key), server_url=url)
            start = time.perf_counter()
            result = generator(prompt, max_new_tokens=max_new_tokens, return_tensors=True, **GENERATION)
            secure_s = time.perf_counter() - start
            stats = generator.secure_stats
            with torch.no_grad():
                full = torch.tensor([result[0]["generated_token_ids"]])
                secure_logits = generator.model(full, use_cache=False).logits
                plain_logits = plain(full).logits
        tokens_equal = result[0]["generated_token_ids"] == reference[0].tolist()
        text = tokenizer.decode(result[0]["generated_token_ids"], skip_special_tokens=True)
        error = (secure_logits - plain_logits).abs().max().item()
        print(f"[3/4] private generation over HTTP:\n\n    {text}\n")
        print("[4/4] figures")
        figures = {
            "new_tokens": max_new_tokens,
            "tokens_identical_to_plaintext": tokens_equal,
            "max_abs_logit_error": error,
            "secure_seconds": round(secure_s, 3),
            "plaintext_seconds": round(plain_s, 3),
            "rounds": stats["rounds"],
            "bytes_sent": stats["bytes_sent"],
            "bytes_received": stats["bytes_received"],
            "server_seconds": round(stats["seconds"], 3),
        }
        for name, value in figures.items():
            print(f"    {name:32s} {value}")
        return figures
