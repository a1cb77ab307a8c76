"""The Hub side: resolving a model name to a local folder, and uploading converted checkpoints.

``push_converted`` refuses to upload anything that is key material: a safetensors file whose
metadata says it is an hf_secure key, a file named like a key, or a folder with no ``hf_secure``
section (an unconverted model would leak its plaintext weights under a "secure" name).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import KeyMaterialUploadError
from .keys import KEY_FORMAT


def resolve_folder(name_or_path, revision=None, token=None, cache_dir=None, local_files_only=False) -> str:
    """A local folder for ``name_or_path``: itself if it is a folder, else a Hub snapshot."""
    if os.path.isdir(name_or_path):
        return str(name_or_path)
    from huggingface_hub import snapshot_download

    return snapshot_download(str(name_or_path), revision=revision, token=token, cache_dir=cache_dir,
                             local_files_only=local_files_only)


def _is_key_file(path: Path) -> bool:
    if ".key" in path.name:
        return True
    if path.suffix != ".safetensors":
        return False
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            return False
        header = handle.read(min(int.from_bytes(head, "little"), 1 << 24))
    try:
        meta = json.loads(header).get("__metadata__") or {}
    except ValueError:
        return False
    return meta.get("format") == KEY_FORMAT


def check_uploadable(folder: str | os.PathLike) -> list[Path]:
    """The files of a converted checkpoint that may be uploaded; raises on key material."""
    folder = Path(folder)
    config = folder / "config.json"
    if not config.is_file() or "hf_secure" not in json.loads(config.read_text()):
        raise KeyMaterialUploadError(f"{folder} is not a converted hf_secure checkpoint; refusing to upload it")
    files = [p for p in sorted(folder.rglob("*")) if p.is_file() and ".cache" not in p.parts]
    keys = [str(p.relative_to(folder)) for p in files if _is_key_file(p)]
    if keys:
        raise KeyMaterialUploadError(f"refusing to upload key material: {', '.join(keys)}")
    return files


def push_converted(folder, repo_id: str, *, token=None, private: bool | None = None,
                   commit_message: str = "Upload converted checkpoint (hf_secure)", **kwargs):
    """Create ``repo_id`` if needed and upload the converted checkpoint with its model card."""
    from huggingface_hub import HfApi

    from .convert.model_card import write_model_card

    folder = Path(folder)
    check_uploadable(folder)
    if not (folder / "README.md").is_file():
        section = json.loads((folder / "config.json").read_text())["hf_secure"]
        write_model_card(folder, section, source=str(folder))
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    return api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message,
                             ignore_patterns=[".cache/*"], **kwargs)
