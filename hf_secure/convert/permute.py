"""``hf-secure convert permute``: write a permuted checkpoint and its client key.

The output folder is an ordinary transformers checkpoint (safetensors, config.json, tokenizer,
generation config, model card) that ``AutoModel*.from_pretrained`` loads in a process that has
never imported hf_secure: the server needs no special code. ``config.json`` gains a section
``hf_secure`` naming the protocol, its version, the key's fingerprint, the embedding placement and
the SHA-256 of every weight file. The key goes to a separate safetensors file, never inside the
model folder.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from .. import __version__
from ..errors import UnknownOptionError
from ..hub import load_source_config
from ..integrity import weight_digests
from ..keys import dumps_meta, fingerprint, save_key
from ..protocols.permute.client import PermuteKey, check_embedding_mode
from ..families import family_of
from ..protocols.permute.rewrite import (
    AttentionShape,
    ffn_size_of,
    rewrite_state_dict,
    sample_layer_permutations,
)
from .model_card import write_model_card

logger = logging.getLogger(__name__)

PROTOCOL_VERSION = 1


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def convert_permute(
    src: str | os.PathLike,
    out: str | os.PathLike,
    key_out: str | os.PathLike,
    *,
    embeddings: str = "client",
    permute_internal: bool = True,
    seed: int | None = None,
    revision: str | None = None,
) -> dict:
    """Convert ``src`` (local folder or Hub id) for the permute protocol.

    Args:
        embeddings: "client" (the client keeps token embeddings and LM head) or "server" (the
            server keeps them with the vocabulary permuted).
        permute_internal: also permute FFN units, head order and within-head dimensions.
        seed: seed for the permutations (None: drawn from the OS).

    Returns the ``hf_secure`` config section that was written.
    """
    check_embedding_mode(embeddings)
    out, key_out = Path(out), Path(key_out)
    if _inside(key_out, out):
        raise UnknownOptionError(f"the key file {key_out} must be written outside the model folder {out}")

    config = load_source_config(src, revision=revision)
    family = family_of(config)
    loader = AutoModelForCausalLM if family.causal else AutoModel
    if not family.causal and any(a != "BertModel" for a in config.architectures or []):
        logger.warning("%s: only the BERT encoder (and pooler) is converted; task heads %s are dropped",
                       src, config.architectures)
    model = loader.from_pretrained(src, revision=revision, dtype="auto")
    model.eval()
    config = model.config

    gen = torch.Generator().manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
    hidden = torch.randperm(config.hidden_size, generator=gen)
    vocab = torch.randperm(config.vocab_size, generator=gen) if embeddings == "server" else None
    shape = AttentionShape.of(config)
    layer_perms = [
        sample_layer_permutations(shape, ffn_size_of(config), family.rope, permute_internal, gen)
        for _ in range(config.num_hidden_layers)
    ]

    key_id = torch.frombuffer(bytearray(os.urandom(16)), dtype=torch.uint8)
    state = model.state_dict()
    if embeddings == "client":
        key = _client_embedding_key(model, hidden, key_id)
        server = model.base_model
        # The server never receives the vocabulary: its embedding table shrinks to one zero row.
        placeholder = torch.nn.Embedding(1, config.hidden_size, dtype=model.dtype)
        torch.nn.init.zeros_(placeholder.weight)
        server.set_input_embeddings(placeholder)
        state = server.state_dict()
    else:
        key = PermuteKey(embeddings="server", hidden=hidden, key_id=key_id, vocab=vocab)
        server = model

    global_perms = {"hidden": hidden} if vocab is None else {"hidden": hidden, "vocab": vocab}
    server.load_state_dict(rewrite_state_dict(state, family, global_perms, layer_perms))

    key_tensors = key.to_tensors()
    section = {
        "protocol": "permute",
        "version": PROTOCOL_VERSION,
        "hf_secure_version": __version__,
        "key_fingerprint": fingerprint(key_tensors),
        "embeddings": embeddings,
        "internal_permutations": permute_internal,
        "family": family.name,
    }
    if embeddings == "client":
        # The client's model keeps the real vocabulary; the server's config only knows one row.
        section["client_config"] = {
            "vocab_size": config.vocab_size,
            **{k: getattr(config, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")},
        }
        server.config.vocab_size = 1
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            setattr(server.config, name, None)
    server.config.hf_secure = section

    out.mkdir(parents=True, exist_ok=True)
    server.save_pretrained(out)
    _copy_companions(src, out, revision, family.causal)

    section["weights"] = weight_digests(out)
    config_path = out / "config.json"
    config_json = json.loads(config_path.read_text())
    config_json["hf_secure"] = section
    config_path.write_text(json.dumps(config_json, indent=2, sort_keys=True) + "\n")

    save_key(
        key_out,
        key_tensors,
        {
            "protocol": "permute",
            "version": str(PROTOCOL_VERSION),
            "embeddings": embeddings,
            "model_name": str(getattr(config, "_name_or_path", "") or src),
            "weights": dumps_meta(section["weights"]),
        },
    )
    write_model_card(out, section, source=str(src))
    logger.info("wrote %s and key %s (%s)", out, key_out, section["key_fingerprint"])
    return section


def _client_embedding_key(model, hidden: torch.Tensor, key_id: torch.Tensor) -> PermuteKey:
    """The client-held embedding table and LM head, in the original basis."""
    embed = model.get_input_embeddings().weight.detach().clone()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    lm_head = lm_head_bias = None
    if head is not None and head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr():
        lm_head = head.weight.detach().clone()
    if head is not None and getattr(head, "bias", None) is not None:
        lm_head_bias = head.bias.detach().clone()
    return PermuteKey(embeddings="client", hidden=hidden, key_id=key_id, embed_tokens=embed, lm_head=lm_head,
                      lm_head_bias=lm_head_bias)


def _copy_companions(src, out: Path, revision: str | None, causal: bool) -> None:
    """Tokenizer and generation config travel with the model: the client needs them, they are public."""
    try:
        AutoTokenizer.from_pretrained(src, revision=revision).save_pretrained(out)
    except (OSError, ValueError, TypeError) as exc:
        logger.warning("no tokenizer copied from %s: %s", src, exc)
    if causal:
        try:
            GenerationConfig.from_pretrained(src, revision=revision).save_pretrained(out)
        except OSError:
            pass
