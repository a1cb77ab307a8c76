"""Wire format between client and server: one safetensors blob per message (never pickle).

A message is a dict of tensors plus a flat dict of string metadata, serialised with
``safetensors.torch.save``. Decoding checks the size and the header before touching the data.
"""

from __future__ import annotations

import json

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from ..errors import InvalidRequestError

MAX_MESSAGE_BYTES = 1 << 30
CONTENT_TYPE = "application/octet-stream"


def encode(tensors: dict[str, torch.Tensor], meta: dict[str, str] | None = None) -> bytes:
    # metadata=None, not {}: safetensors 0.8 writes invalid JSON for no tensors and empty metadata.
    return save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=meta or None)


def decode(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if len(data) > MAX_MESSAGE_BYTES:
        raise InvalidRequestError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
    if len(data) < 8:
        raise InvalidRequestError("message too short to be safetensors")
    header_len = int.from_bytes(data[:8], "little")
    if header_len > len(data) - 8:
        raise InvalidRequestError("safetensors header longer than the message")
    try:
        header = json.loads(data[8 : 8 + header_len])
        if not isinstance(header, dict):
            raise InvalidRequestError("malformed safetensors message: the header is not a JSON object")
        meta = header.get("__metadata__") or {}
        tensors = load(bytes(data))
    except (SafetensorError, ValueError, UnicodeDecodeError, RuntimeError) as exc:
        raise InvalidRequestError(f"malformed safetensors message: {exc}") from exc
    except KeyError as exc:  # a dtype safetensors parses but torch lacks (F4, F6_*)
        raise InvalidRequestError(f"malformed safetensors message: unsupported dtype {exc}") from exc
    return tensors, meta
