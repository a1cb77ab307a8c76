"""Which files form a checkpoint, and their digests, recorded at conversion and checked before use.

A checkpoint's weights are what transformers itself loads: ``model.safetensors``, or the shards
that ``model.safetensors.index.json`` names (names from ``transformers.utils``). Any other
``*.safetensors`` in the folder (a stray copy, a key put there by mistake) is never read.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from .errors import TamperedCheckpointError


def checkpoint_files(folder: str | os.PathLike) -> list[str]:
    """The weight files of the checkpoint in ``folder``, as transformers resolves them.

    Raises TamperedCheckpointError when there are none, or the index is unreadable or points
    outside the folder.
    """
    folder = Path(folder)
    if (folder / SAFE_WEIGHTS_NAME).is_file():
        return [SAFE_WEIGHTS_NAME]
    index = folder / SAFE_WEIGHTS_INDEX_NAME
    if not index.is_file():
        raise TamperedCheckpointError(f"{folder}: no {SAFE_WEIGHTS_NAME} and no {SAFE_WEIGHTS_INDEX_NAME}")
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise TamperedCheckpointError(f"{index}: unreadable shard index ({exc})") from None
    if not shards or any(Path(name).name != name for name in shards):
        raise TamperedCheckpointError(f"{index}: shards must be file names inside the folder, got {shards}")
    return shards


def weight_digests(folder: str | os.PathLike) -> dict[str, str]:
    """SHA-256 of every weight file of the checkpoint (:func:`checkpoint_files`), by file name."""
    digests = {}
    for name in checkpoint_files(folder):
        digest = hashlib.sha256()
        try:
            with open(Path(folder, name), "rb") as handle:
                for block in iter(lambda: handle.read(1 << 22), b""):
                    digest.update(block)
        except FileNotFoundError:
            raise TamperedCheckpointError(f"{folder}: shard {name} named by the index is missing") from None
        digests[name] = "sha256:" + digest.hexdigest()
    return digests


def verify_weights(folder: str | os.PathLike, expected: dict[str, str]) -> None:
    """Raise TamperedCheckpointError unless the folder's weight files are exactly ``expected``."""
    if not expected:
        raise TamperedCheckpointError(f"{folder}: no weight digests recorded; refusing an unverifiable checkpoint")
    actual = weight_digests(folder)
    if actual != expected:
        changed = sorted(set(actual) ^ set(expected) | {n for n in actual if expected.get(n) != actual[n]})
        raise TamperedCheckpointError(
            f"{folder}: weight files differ from those recorded at conversion ({', '.join(changed)}); "
            "the checkpoint was modified or is incomplete"
        )
