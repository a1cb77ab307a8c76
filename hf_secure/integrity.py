"""Digests of a checkpoint's weight files, recorded at conversion and checked before use."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from .errors import TamperedCheckpointError


def weight_digests(folder: str | os.PathLike) -> dict[str, str]:
    """SHA-256 of every ``*.safetensors`` file directly inside ``folder``, by file name."""
    digests = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
        digests[path.name] = "sha256:" + digest.hexdigest()
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
