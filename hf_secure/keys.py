"""Key files and the local key store.

A key file is a safetensors file (never pickle) holding the client's secret tensors, with
metadata naming the format, the protocol and the key's *fingerprint*: the SHA-256 of the key's
tensors (names, dtypes, shapes and bytes, in sorted order). A converted checkpoint records the same
fingerprint in ``config.json`` (section ``hf_secure``), which binds key and model together.

Loading a key checks, in order: the file parses as safetensors, it says it is an hf_secure key,
its tensors hash to the fingerprint it claims (so flipped data bytes are caught), and that
fingerprint is the one the model expects.

The key store is a folder (``$HF_SECURE_HOME/keys``, default ``~/.cache/hf_secure/keys``) of key
files named by fingerprint, written with mode 0600, so that a key imported once is found again
from the model's config alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import CorruptKeyError, KeyMismatchError, MissingKeyError, UnknownOptionError

KEY_FORMAT = "hf_secure.key"


def fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the tensors' names, dtypes, shapes and raw bytes, in sorted name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().contiguous().cpu()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return "sha256:" + digest.hexdigest()


def read_private_text(path: str | os.PathLike, what: str, hint: str = "") -> str:
    """The UTF-8 text of a secret file (a token list, a party key): it must be a file that only its
    owner may read (mode 0600, as ssh demands of keys). A byte-order mark is skipped. Raises
    UnknownOptionError, naming ``what`` and the fix, for anything else (``hint``: where such a
    file comes from, said when there is none)."""
    path = Path(path)
    if not path.is_file():
        raise UnknownOptionError(f"{what} {path} is not a file{f' ({hint})' if hint else ''}")
    if path.stat().st_mode & 0o077:
        raise UnknownOptionError(f"{what} {path} is readable by other users: `chmod 600 {path}`")
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UnknownOptionError(f"{what} {path} is not UTF-8 text") from None


def save_key(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """Write a key file readable only by its owner; return its fingerprint."""
    fp = fingerprint(tensors)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {**metadata, "format": KEY_FORMAT, "fingerprint": fp}
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return fp


def read_key_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of a key file, or None if the file is not an hf_secure key."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CorruptKeyError(f"{path} is not a readable key file: {exc}") from exc
    return meta


def load_key(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read and verify a key file; return (tensors, metadata)."""
    path = Path(path)
    if not path.is_file():
        raise MissingKeyError(f"key file {path} does not exist")
    meta = read_key_metadata(path)
    if meta.get("format") != KEY_FORMAT:
        raise CorruptKeyError(f"{path} is a safetensors file but not an hf_secure key")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError, KeyError) as exc:  # KeyError: dtype torch lacks
        raise CorruptKeyError(f"{path}: cannot read key tensors: {exc}") from exc
    if fingerprint(tensors) != meta.get("fingerprint"):
        raise CorruptKeyError(f"{path}: key content does not match its fingerprint (corrupted file)")
    try:  # the fingerprint covers the tensors, not the metadata: check what callers parse
        weights = json.loads(meta.get("weights", "{}"))
    except (ValueError, RecursionError):
        weights = None
    if not isinstance(weights, dict):
        raise CorruptKeyError(f"{path}: metadata 'weights' is not a JSON object (corrupted file)")
    return tensors, meta


def key_store_dir() -> Path:
    home = os.environ.get("HF_SECURE_HOME") or os.path.join(Path.home(), ".cache", "hf_secure")
    return Path(home) / "keys"


class KeyStore:
    """Key files kept locally, found by fingerprint."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root) if root is not None else key_store_dir()

    def _path(self, fp: str) -> Path:
        return self.root / (fp.replace(":", "-") + ".safetensors")

    def import_key(self, path: str | os.PathLike) -> str:
        """Verify a key file and copy it into the store; return its fingerprint."""
        _, meta = load_key(path)
        fp = meta["fingerprint"]
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        dest = self._path(fp)
        shutil.copyfile(path, dest)
        os.chmod(dest, 0o600)
        return fp

    def find(self, fp: str) -> Path | None:
        path = self._path(fp)
        return path if path.is_file() else None

    def remove(self, fp: str) -> bool:
        path = self._path(fp)
        if path.is_file():
            path.unlink()
            return True
        return False

    def list(self) -> list[dict[str, str]]:
        if not self.root.is_dir():
            return []
        rows = []
        for path in sorted(self.root.glob("*.safetensors")):
            meta = read_key_metadata(path)
            rows.append({"fingerprint": meta.get("fingerprint", "?"), "protocol": meta.get("protocol", "?"),
                         "model": meta.get("model_name", "?"), "path": str(path)})
        return rows


def resolve_key(key: str | os.PathLike | None, expected_fp: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load the key for a model whose config names ``expected_fp``.

    ``key`` is a key file path; when it is None the local key store is searched by fingerprint.
    """
    if key is None:
        found = KeyStore().find(expected_fp)
        if found is None:
            raise MissingKeyError(
                f"this model needs its client key (fingerprint {expected_fp}). Ask the model owner for the key "
                "file, then pass key=PATH, or import it once with `hf-secure keys import PATH` "
                f"(key store: {key_store_dir()})."
            )
        key = found
    tensors, meta = load_key(key)
    if meta["fingerprint"] != expected_fp:
        raise KeyMismatchError(
            f"key {key} has fingerprint {meta['fingerprint']}, but the model expects {expected_fp}: "
            "this key belongs to another model"
        )
    return tensors, meta


def dumps_meta(value) -> str:
    """Metadata values in safetensors must be strings: JSON-encode structured ones."""
    return json.dumps(value, sort_keys=True)
