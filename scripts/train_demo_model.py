#!/usr/bin/env python3
"""Train the small default GPT-2 model that ships with hf_secure's demo.

What it builds
--------------
A tiny GPT-2 architecture causal LM (``GPT2LMHeadModel``, ~2.2M parameters:
4 layers, 192 hidden, 4 heads, 256 positions, 2048-token byte-level BPE
vocabulary) together with its own tokenizer, written to
``hf_secure/assets/demo-gpt2/`` as:

* ``model.safetensors`` (float16 weights, ~4.4 MB; safetensors only, no pickle),
  ``config.json``, ``generation_config.json``;
* ``tokenizer.json``, ``tokenizer_config.json`` (GPT-2 style fast tokenizer,
  loads with ``transformers.AutoTokenizer.from_pretrained(folder)``);
* ``README.md`` (model card with data source, licence, command and final loss).

The model only has to produce English-looking text for demos and tests; it is
not meant to be good.

Training data, source and licence
---------------------------------
The six completed novels of Jane Austen (Sense and Sensibility, Pride and
Prejudice, Mansfield Park, Emma, Northanger Abbey, Persuasion), ~3.9 MB of
English prose. Jane Austen died in 1817; the novels were published 1811-1818
and are in the public domain. The texts are Project Gutenberg transcriptions
(without the Project Gutenberg header/licence boilerplate) as packaged by the
R package ``janeaustenr`` (Julia Silge, MIT licence for the package itself).

They are obtained offline from Debian's package archive:

    package : r-cran-janeaustenr, version 1.0.0-1 (Debian bookworm, arch all)
    file    : /usr/lib/R/site-library/janeaustenr/data/Rdata.rdb (+ Rdata.rdx)
    licence : /usr/share/doc/r-cran-janeaustenr/copyright -> "License: MIT"
              (package code/packaging); the novel texts are public domain.

The data are R "lazy-load" databases (zlib-compressed R XDR serializations of
character vectors, one line of the book per element). This script contains a
small pure-Python reader for that format, so R itself is NOT needed: the .deb
is only downloaded and unpacked (``apt-get download`` + ``dpkg-deb -x``), which
avoids pulling in r-base-core. If the package is already installed
(``apt-get install -y r-cran-janeaustenr``) the installed files are used.

The short modern editorial "A NOTE ON THE TEXT" appended to Northanger Abbey
is dropped; ``_emphasis_`` underscores are removed; hard-wrapped lines are
joined into paragraphs.

Reproduce
---------
On a Debian/Ubuntu machine with Python 3.11, torch (CPU), transformers 5.x and
tokenizers installed (run as root, or have ``apt-get download`` work)::

    apt-get update
    python scripts/train_demo_model.py --minutes 20

(defaults: output ``hf_secure/assets/demo-gpt2``, seed 1234, 1 torch thread).
With only ``--minutes`` the number of optimizer steps is derived from the
measured speed of the first steps, so the result depends a little on the
machine; pass ``--max-steps N`` (the README of the committed model records the
N used) for a step-for-step reproducible run.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import hashlib
import json
import logging
import math
import random
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import warnings
import zlib
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "hf_secure" / "assets" / "demo-gpt2"

DEB_PACKAGE = "r-cran-janeaustenr"
DEB_DATA_DIR = "usr/lib/R/site-library/janeaustenr/data"
DEB_COPYRIGHT = "usr/share/doc/r-cran-janeaustenr/copyright"
# Fixed order so the corpus (and everything downstream) is deterministic.
BOOKS = [
    ("sensesensibility", "Sense and Sensibility (1811)"),
    ("prideprejudice", "Pride and Prejudice (1813)"),
    ("mansfieldpark", "Mansfield Park (1814)"),
    ("emma", "Emma (1815)"),
    ("northangerabbey", "Northanger Abbey (1817)"),
    ("persuasion", "Persuasion (1817)"),
]
EOT = "<|endoftext|>"


# --------------------------------------------------------------------------
# Data: fetch the Debian package and read R's lazy-load database
# --------------------------------------------------------------------------

class RUnserializer:
    """Minimal reader for R's XDR serialization format (versions 2 and 3).

    Supports just what janeaustenr's data and index use: NULL, symbols and
    references to them, pairlists (attributes), logical/integer/double
    vectors, character vectors and generic lists. A ``names`` attribute turns
    a vector into a dict.
    """

    def __init__(self, data: bytes):
        self.b, self.p, self.refs = data, 0, []
        if self._raw(2) != b"X\n":
            raise ValueError("not an R XDR serialization")
        version = self._int()
        self._int()  # writer R version
        self._int()  # minimal reader R version
        if version == 3:
            self._raw(self._int())  # native encoding name

    def _int(self) -> int:
        (v,) = struct.unpack_from(">i", self.b, self.p)
        self.p += 4
        return v

    def _raw(self, n: int) -> bytes:
        v = self.b[self.p:self.p + n]
        self.p += n
        return v

    def read(self):
        flags = self._int()
        kind = flags & 0xFF
        has_attr, has_tag = flags & (1 << 9), flags & (1 << 10)
        if kind == 254:  # NILVALUE_SXP
            return None
        if kind == 255:  # REFSXP
            return self.refs[(flags >> 8 or self._int()) - 1]
        if kind == 1:  # SYMSXP
            sym = self.read()
            self.refs.append(sym)
            return sym
        if kind == 9:  # CHARSXP
            n = self._int()
            if n == -1:
                return None  # NA_character_
            latin1 = (flags >> 12) & 4
            return self._raw(n).decode("latin-1" if latin1 else "utf-8")
        if kind == 2:  # LISTSXP (pairlist) -> list of (tag, value)
            items = []
            while True:
                if has_attr:
                    self.read()
                tag = self.read() if has_tag else None
                items.append((tag, self.read()))
                nxt = self._int()
                if nxt & 0xFF != 2:
                    self.p -= 4
                    self.read()  # terminator (NILVALUE)
                    return items
                has_attr, has_tag = nxt & (1 << 9), nxt & (1 << 10)
        n = self._int()
        if kind in (10, 13):  # LGLSXP, INTSXP
            val = list(struct.unpack_from(">%di" % n, self.b, self.p))
            self.p += 4 * n
        elif kind == 14:  # REALSXP
            val = list(struct.unpack_from(">%dd" % n, self.b, self.p))
            self.p += 8 * n
        elif kind in (16, 19, 20):  # STRSXP, VECSXP, EXPRSXP
            val = [self.read() for _ in range(n)]
        else:
            raise ValueError(f"unsupported R SEXP type {kind}")
        if has_attr:
            attrs = dict(self.read())
            if "names" in attrs:
                val = dict(zip(attrs["names"], val))
        return val


def read_lazyload_db(data_dir: Path) -> dict[str, list]:
    """Read every object of an R lazy-load database (Rdata.rdx/Rdata.rdb)."""
    index = RUnserializer(gzip.open(data_dir / "Rdata.rdx").read()).read()
    if index["compressed"] != [1]:
        raise ValueError("only zlib-compressed lazy-load databases are supported")
    blob = (data_dir / "Rdata.rdb").read_bytes()
    out = {}
    for name, (offset, length) in index["variables"].items():
        record = blob[offset:offset + length]  # 4-byte length + zlib stream
        out[name] = RUnserializer(zlib.decompress(record[4:])).read()
    return out


def locate_source(cache_dir: Path | None) -> tuple[Path, str, Path]:
    """Return (data dir, package version, copyright file) of r-cran-janeaustenr.

    Uses the installed package if present, otherwise downloads the .deb with
    ``apt-get download`` (needs a prior ``apt-get update``) and unpacks it.
    """
    installed = Path("/") / DEB_DATA_DIR
    if (installed / "Rdata.rdb").exists():
        version = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", DEB_PACKAGE],
            capture_output=True, text=True, check=False).stdout.strip() or "unknown"
        return installed, version, Path("/") / DEB_COPYRIGHT
    work = Path(cache_dir or tempfile.mkdtemp(prefix="janeaustenr-"))
    work.mkdir(parents=True, exist_ok=True)
    debs = sorted(glob.glob(str(work / f"{DEB_PACKAGE}_*.deb")))
    if not debs:
        print(f"downloading Debian package {DEB_PACKAGE} into {work}", flush=True)
        subprocess.run(["apt-get", "download", DEB_PACKAGE], cwd=work, check=True)
        debs = sorted(glob.glob(str(work / f"{DEB_PACKAGE}_*.deb")))
    deb = debs[-1]
    root = work / "root"
    subprocess.run(["dpkg-deb", "-x", deb, str(root)], check=True)
    version = subprocess.run(["dpkg-deb", "-f", deb, "Version"],
                             capture_output=True, text=True, check=True).stdout.strip()
    return root / DEB_DATA_DIR, version, root / DEB_COPYRIGHT


def clean_book(lines: list) -> str:
    """Hard-wrapped lines -> paragraphs separated by blank lines."""
    text = "\n".join(line or "" for line in lines)
    cut = text.find("A NOTE ON THE TEXT")  # modern editorial note (Northanger Abbey)
    if cut != -1:
        text = text[:cut]
    text = text.replace("_", "")  # _emphasis_ markers of the e-texts
    paragraphs = []
    for para in re.split(r"\n\s*\n", text):
        para = " ".join(para.split())
        if para:
            paragraphs.append(para)
    return "\n\n".join(paragraphs)


def load_corpus(cache_dir: Path | None) -> tuple[list[str], dict]:
    data_dir, version, copyright_file = locate_source(cache_dir)
    objects = read_lazyload_db(data_dir)
    books = [clean_book(objects[key]) for key, _ in BOOKS]
    licence_line = next((l.strip() for l in copyright_file.read_text().splitlines()
                         if l.startswith("License:")), "?")
    joined = f"\n{EOT}\n".join(books).encode("utf-8")
    info = {
        "package": DEB_PACKAGE,
        "version": version,
        "path": "/" + DEB_DATA_DIR + "/Rdata.rdb",
        "package_licence": licence_line,
        "chars": sum(len(b) for b in books),
        "sha256": hashlib.sha256(joined).hexdigest(),
    }
    return books, info


# --------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------

def train_tokenizer(books: list[str], vocab_size: int, out: Path):
    """Byte-level BPE (GPT-2 style) trained on the corpus; saved to `out`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, GPT2TokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    paragraphs = [p for book in books for p in book.split("\n\n")]
    tok.train_from_iterator(paragraphs, trainer=trainer)

    # Wrap as the GPT-2 tokenizer class so AutoTokenizer restores it as such.
    model_json = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
              for m in model_json["merges"]]
    hf_tok = GPT2TokenizerFast(vocab=model_json["vocab"], merges=merges,
                               unk_token=EOT, bos_token=EOT, eos_token=EOT,
                               pad_token=EOT, add_prefix_space=False)
    hf_tok.model_max_length = 1024 * 1024  # overwritten with n_positions below
    hf_tok.save_pretrained(out)
    loaded = AutoTokenizer.from_pretrained(out)
    sample = "It is a truth universally acknowledged -- 42 £ café!\n\nNew paragraph."
    ids = loaded(sample)["input_ids"]
    assert loaded.decode(ids) == sample, (sample, loaded.decode(ids))
    assert ids == tok.encode(sample).ids, "wrapped tokenizer disagrees with trained one"
    assert loaded.eos_token == loaded.pad_token == EOT
    assert loaded.convert_tokens_to_ids(EOT) == 0
    return hf_tok


# --------------------------------------------------------------------------
# Model training
# --------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--minutes", type=float, default=20.0,
                    help="wall-clock budget for the optimisation loop")
    ap.add_argument("--max-steps", type=int, default=None,
                    help="fixed number of steps (overrides the time-based estimate)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--vocab-size", type=int, default=2048)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=192)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--n-positions", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--deb-cache", type=Path, default=None,
                    help="where to download/unpack the .deb (default: a temp dir)")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    from transformers import GPT2Config, GPT2LMHeadModel

    t_start = time.time()
    books, source = load_corpus(args.deb_cache)
    print(f"corpus: {source['chars']:,} chars from {source['package']} "
          f"{source['version']} ({source['package_licence']}; texts public domain) "
          f"sha256={source['sha256'][:16]}", flush=True)

    out: Path = args.out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    tokenizer = train_tokenizer(books, args.vocab_size, out)
    eot_id = tokenizer.eos_token_id
    ids = []
    for book in books:
        ids += tokenizer(book)["input_ids"] + [eot_id]
    data = torch.tensor(ids, dtype=torch.long)
    # Every 50th chunk of 4096 tokens is held out for validation.
    chunks = list(data.split(4096))
    val = torch.cat(chunks[::50])
    train = torch.cat([c for i, c in enumerate(chunks) if i % 50])
    print(f"tokens: {len(data):,} ({source['chars'] / len(data):.2f} chars/token), "
          f"train {len(train):,}, val {len(val):,}", flush=True)

    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=args.n_positions, n_embd=args.n_embd,
        n_layer=args.n_layer, n_head=args.n_head,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=eot_id, eos_token_id=eot_id, pad_token_id=eot_id,
        tie_word_embeddings=True)
    model = GPT2LMHeadModel(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters", flush=True)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))

    block = args.n_positions
    gen = torch.Generator().manual_seed(args.seed)

    def batch(source_ids, bs, generator):
        # GPT2LMHeadModel shifts labels internally, so labels == input_ids.
        starts = torch.randint(0, len(source_ids) - block, (bs,), generator=generator)
        return torch.stack([source_ids[s:s + block] for s in starts.tolist()])

    val_gen = torch.Generator().manual_seed(args.seed + 1)
    val_batches = [batch(val, args.batch_size, val_gen) for _ in range(8)]

    @torch.no_grad()
    def evaluate():
        model.eval()
        losses = [model(input_ids=x, labels=x).loss.item() for x in val_batches]
        model.train()
        return sum(losses) / len(losses)

    def lr_at(step, total):
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        frac = min(1.0, (step - args.warmup) / max(1, total - args.warmup))
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    budget = args.minutes * 60
    max_steps = args.max_steps or 10**9  # provisional until calibrated
    calibrate_at = 30
    model.train()
    t0 = time.time()
    step, ema, train_loss, val_loss = 0, None, float("nan"), float("nan")
    while step < max_steps:
        if args.max_steps is None and step == calibrate_at:
            per_step = (time.time() - t0) / calibrate_at
            per_step *= 1.0 + 8 * 0.5 / args.eval_every  # evaluation overhead
            max_steps = max(calibrate_at + 1, int(budget / per_step))
            print(f"calibrated: {per_step * 1000:.0f} ms/step -> {max_steps} steps "
                  f"in {args.minutes:g} min", flush=True)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, max_steps if max_steps < 10**9 else 10**4)
        x = batch(train, args.batch_size, gen)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        train_loss = loss.item()
        ema = train_loss if ema is None else 0.95 * ema + 0.05 * train_loss
        elapsed = time.time() - t0
        if step % args.log_every == 0 or step == max_steps:
            tok_s = step * args.batch_size * block / elapsed
            print(f"step {step:5d}/{max_steps if max_steps < 10**9 else '?'} "
                  f"loss {train_loss:.3f} (ema {ema:.3f}) lr {opt.param_groups[0]['lr']:.2e} "
                  f"{tok_s:,.0f} tok/s {elapsed / 60:.1f} min", flush=True)
        if step % args.eval_every == 0 or step == max_steps:
            val_loss = evaluate()
            print(f"  val loss {val_loss:.3f} (ppl {math.exp(val_loss):.1f})", flush=True)
        if args.max_steps is None and elapsed > budget * 1.1:
            print("time budget exceeded, stopping", flush=True)
            val_loss = evaluate()
            break
    train_minutes = (time.time() - t0) / 60

    # ---- save: float16 safetensors + config + generation config ----
    model = model.to(torch.float16)
    model.config.dtype = torch.float16
    model.generation_config.pad_token_id = eot_id
    model.generation_config.eos_token_id = eot_id
    model.generation_config.bos_token_id = eot_id
    model.save_pretrained(out)
    tokenizer.model_max_length = args.n_positions
    tokenizer.save_pretrained(out)
    assert not list(out.glob("*.bin")), "only safetensors expected"
    for f in out.iterdir():
        f.chmod(0o644)

    samples = check_and_sample(out)
    weights_bytes = (out / "model.safetensors").stat().st_size
    write_model_card(out, args, source, n_params, weights_bytes, step, train_minutes,
                     ema, val_loss, len(data), samples)
    print(f"saved to {out} ({weights_bytes:,} bytes of weights); "
          f"total {(time.time() - t_start) / 60:.1f} min", flush=True)
    return 0


PROMPTS = ["It is a truth universally acknowledged", "Elizabeth", "The weather was"]


def check_and_sample(out: Path) -> list[tuple[str, str, str]]:
    """Reload as a user would, check there are no load warnings, and sample."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    captured = []

    class Catch(logging.Handler):
        def emit(self, record):
            if record.levelno >= logging.WARNING:
                captured.append(record.getMessage())

    handler = Catch()
    hf_logging.get_logger().addHandler(handler)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        tok = AutoTokenizer.from_pretrained(out)
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    hf_logging.get_logger().removeHandler(handler)
    problems = captured + [str(x.message) for x in w]
    if any("missing" in p.lower() or "unexpected" in p.lower() or "newly initialized" in p.lower()
           for p in problems):
        raise SystemExit(f"load warnings: {problems}")
    if problems:
        print("note: load messages:", problems, flush=True)
    ln = model.transformer.h[0].ln_1.weight
    assert not torch.allclose(ln, torch.ones_like(ln)), "LayerNorm weights look untrained"
    model.eval()
    results = []
    for prompt in PROMPTS:
        enc = tok(prompt, return_tensors="pt")
        with torch.no_grad():
            greedy = model.generate(**enc, max_new_tokens=40, do_sample=False)
            torch.manual_seed(0)
            sampled = model.generate(**enc, max_new_tokens=40, do_sample=True,
                                     top_k=40, temperature=0.8)
        results.append((prompt, tok.decode(greedy[0], skip_special_tokens=True),
                        tok.decode(sampled[0], skip_special_tokens=True)))
        print(f"\nprompt : {prompt!r}\ngreedy : {results[-1][1]!r}\n"
              f"top-k  : {results[-1][2]!r}", flush=True)
    return results


def write_model_card(out, args, source, n_params, weights_bytes, steps, minutes,
                     train_loss, val_loss, n_tokens, samples):
    cmd = "python scripts/train_demo_model.py --minutes %g" % args.minutes
    repro = "python scripts/train_demo_model.py --max-steps %d" % steps
    sample_md = "\n".join(
        f"* prompt `{p}`\n  * greedy: {g!r}\n  * top-k=40, T=0.8, seed 0: {s!r}"
        for p, g, s in samples)
    card = f"""# demo-gpt2

A tiny GPT-2 architecture causal language model (`GPT2LMHeadModel`) used as
hf_secure's embedded default demo model. It writes English-looking,
Austen-flavoured text and is meant for demos and tests only: it is far too
small to be useful as a language model.

| | |
|---|---|
| architecture | GPT-2, {args.n_layer} layers, {args.n_embd} hidden, {args.n_head} heads, {args.n_positions} positions |
| parameters | {n_params:,} (tied input/output embeddings) |
| weights | `model.safetensors`, float16, {weights_bytes:,} bytes |
| tokenizer | byte-level BPE, {args.vocab_size} tokens, `<|endoftext|>` = id 0 (bos/eos/pad/unk) |
| training | {steps} AdamW steps x {args.batch_size} x {args.n_positions} tokens, {minutes:.1f} min on 1 CPU thread, seed {args.seed} |
| final loss | train {train_loss:.3f} (EMA), validation {val_loss:.3f} (perplexity {math.exp(val_loss):.1f}) |

## Data and licence

Jane Austen's six completed novels (Sense and Sensibility, Pride and
Prejudice, Mansfield Park, Emma, Northanger Abbey, Persuasion; {source['chars']:,}
characters, {n_tokens:,} tokens). The novels (1811-1818) are in the **public
domain**. The text is the Project Gutenberg transcription as packaged by the R
package janeaustenr (Julia Silge; package licence MIT), taken from Debian
package `{source['package']}` version `{source['version']}`, file
`{source['path']}` (its copyright file: `{source['package_licence']}`).
Corpus sha256 (after cleaning): `{source['sha256']}`.

## Reproduce

```
apt-get update
{cmd}
# step-for-step identical schedule to this checkpoint:
{repro}
```

The script downloads the .deb with `apt-get download` and reads R's data file
with its own small parser (R is not needed).

## Usage

```python
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
ids = tok("It is a truth universally acknowledged", return_tensors="pt")
print(tok.decode(model.generate(**ids, max_new_tokens=40)[0]))
```

## Sample generations (40 new tokens)

{sample_md}
"""
    (out / "README.md").write_text(card)


if __name__ == "__main__":
    sys.exit(main())
