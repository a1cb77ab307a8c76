"""The README.md model card written next to a converted checkpoint."""

from __future__ import annotations

from pathlib import Path

from ..families import family

_EMBEDDING_TEXT = {
    "client": (
        "The client keeps the token embedding table and the LM head. The server receives permuted "
        "input embeddings and returns permuted final hidden states; it never sees token ids or logits."
    ),
    "server": (
        "The server keeps the token embedding table and the LM head with the vocabulary permuted. "
        "The client sends permuted token ids and receives permuted logits. A vocabulary permutation is a "
        "substitution cipher: token frequencies and, for open-weight models, the embedding rows themselves "
        "reveal it."
    ),
}


def _task(section: dict) -> str:
    return "text-generation" if family(section["family"]).causal else "feature-extraction"


def mpc_model_card(section: dict, source: str) -> str:
    task = _task(section)
    approximations = section.get("approximations", {})
    return f"""---
library_name: transformers
tags:
- hf_secure
- private-inference
- mpc
---

# Public part of an MPC checkpoint (hf_secure, protocol `mpc`)

Converted from `{source}` by [hf_secure](https://pypi.org/project/hf-secure/) {section.get('hf_secure_version', '')}
with `hf-secure convert approximate` (activation `{approximations.get('activation')}`, softmax
`{approximations.get('softmax')}`). **This repository holds no weights**: the config (architecture,
approximations, normalisation bounds) and the tokenizer, which is all the two servers, the dealer
and a client need. The weights stay with the model owner, who secret-shares them to the servers
when a session starts.

## How to run it

    hf-secure party --role server0 --model <this repo> --rendezvous tcp://HOST:29500   # on HOST
    hf-secure party --role server1 --model <this repo> --rendezvous tcp://HOST:29500
    hf-secure party --role dealer  --model <this repo> --rendezvous tcp://HOST:29500
    hf-secure party --role owner   --model <the owner's folder, with weights> --rendezvous tcp://HOST:29500

Client:

    python -c "from transformers import pipeline; import hf_secure; \\
      print(pipeline('secure-{task}', model='<this repo>', protocol='mpc', rendezvous='tcp://HOST:29500')('Hello'))"

## Threat model

Two semi-honest servers that do not collude with each other or with the dealer see only random
shares and masked values; see hf_secure's docs/threat-model.md for what is public (shapes, masks,
positions) and what each party sees.
"""


def model_card(section: dict, source: str) -> str:
    if section.get("protocol") == "mpc":
        return mpc_model_card(section, source)
    embeddings = section["embeddings"]
    return f"""---
library_name: transformers
tags:
- hf_secure
- private-inference
- {section['protocol']}
---

# Permuted checkpoint for private inference (hf_secure, protocol `{section['protocol']}`)

Converted from `{source}` by [hf_secure](https://pypi.org/project/hf-secure/) {section.get('hf_secure_version', '')}.
The weights are rewritten so that the server computes on hidden states permuted by a secret
permutation of the hidden dimension (STIP, ePrint 2023/1763). Key fingerprint:
`{section['key_fingerprint']}`. **No key material is in this repository.**

## How to run it

Server (needs no hf_secure code; plain transformers loads this folder):

    hf-secure serve <this repo or folder> --port 8000

Client (needs the key file from the model owner):

    hf-secure keys import client.key.safetensors
    python -c "from transformers import pipeline; import hf_secure; \\
      print(pipeline('secure-{_task(section)}', model='<repo>', server_url='http://HOST:8000')('Hello'))"

## Threat model

Embeddings: {embeddings}. {_EMBEDDING_TEXT[embeddings]}

- The server sees every hidden state in a permuted basis, and the queries, keys, values, attention
  probabilities and FFN activations up to a fixed permutation per layer. Attention patterns,
  sequence length and timing are visible.
- A permutation is not encryption. For a model whose original weights are public, the permutation
  is recovered by matching rows of these weights against the public ones, and published attacks
  (arXiv 2505.18332, arXiv 2605.04901) recover prompts from permuted hidden states almost exactly.
- Do not use this protocol where the prompt must stay confidential against a capable server, nor for
  public-weight models; use it to keep casual observers and logs from plaintext, or combine it with
  a cryptographic protocol.
"""


def write_model_card(folder: str | Path, section: dict, source: str) -> Path:
    path = Path(folder) / "README.md"
    path.write_text(model_card(section, source))
    return path
