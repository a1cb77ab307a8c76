"""The Hub side: resolving a model name to a local folder, and uploading converted checkpoints.

``push_converted`` uploads an allow-list (the checkpoint's weight files, config, model card,
tokenizer), never whatever else lies in the folder, and refuses the upload when any file in the
folder holds key material, by content, whatever its name; or when the folder has no ``hf_secure``
section (an unconverted model would leak its plaintext weights under a "secure" name).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import safetensors.torch
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME

from .errors import KeyMaterialUploadError, ModelNotFoundError, UnknownOptionError, UnsupportedModelError
from .integrity import checkpoint_files, verify_weights
from .keys import KEY_FORMAT, fingerprint


def resolve_folder(name_or_path, revision=None, token=None, cache_dir=None, local_files_only=False) -> str:
    """A local folder for ``name_or_path``: itself if it is a folder, else a Hub snapshot.

    Raises :class:`ModelNotFoundError`, one line naming the fix, for a path that does not exist
    and for a Hub id that cannot be fetched (no such repo or revision, gated, Hub unreachable).
    """
    if os.path.isdir(name_or_path):
        return str(name_or_path)
    _check_hub_id(name_or_path)
    from huggingface_hub import snapshot_download

    with _hub_errors(name_or_path, revision):
        return snapshot_download(str(name_or_path), revision=revision, token=token, cache_dir=cache_dir,
                                 local_files_only=local_files_only)


def load_config(name_or_path, revision=None, **kwargs):
    """``AutoConfig.from_pretrained(name_or_path, ...)`` with :func:`resolve_folder`'s errors for a
    bad name, and :class:`ModelNotFoundError` for a folder without ``config.json``."""
    from transformers import AutoConfig

    if not os.path.isdir(name_or_path):
        _check_hub_id(name_or_path)
    elif not os.path.isfile(os.path.join(name_or_path, "config.json")):
        raise ModelNotFoundError(f"{name_or_path} has no config.json: give the folder of a transformers model "
                                 "(as written by save_pretrained)")
    with _hub_errors(name_or_path, revision):
        return AutoConfig.from_pretrained(name_or_path, revision=revision, **kwargs)


def load_source_config(name_or_path, revision=None):
    """:func:`load_config` for a converter's source: a checkpoint already converted is refused
    (converting it again would permute or approximate what is no longer the original)."""
    config = load_config(name_or_path, revision=revision)
    section = getattr(config, "hf_secure", None)
    if section is not None:
        protocol = section.get("protocol") if isinstance(section, dict) else None
        raise UnsupportedModelError(f"{name_or_path} is already converted (protocol {protocol!r}): convert the "
                                    "original transformers checkpoint instead")
    return config


def _check_hub_id(name) -> None:
    """Refuse a name that is not a folder and cannot be a Hub id either: a missing path, a file."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if os.path.exists(name):
        raise ModelNotFoundError(f"{name} is a file, not a model folder: give the folder that holds config.json")
    try:
        validate_repo_id(str(name))
    except HFValidationError:
        raise ModelNotFoundError(f"{name} does not exist: give the path of a model folder, "
                                 "or a Hub model id such as 'user/model'") from None


@contextlib.contextmanager
def _hub_errors(name, revision):
    """Turn huggingface_hub's errors (also when transformers wraps them in an ``OSError``) into a
    :class:`ModelNotFoundError`; anything else passes unchanged."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        yield
    except (OSError, ValueError) as error:
        cause = error
        while cause is not None:
            if isinstance(cause, GatedRepoError):
                message = (f"{name} is a gated model: accept its terms at {constants.ENDPOINT}/{name}, "
                           "then log in with `hf auth login`")
            elif isinstance(cause, RepositoryNotFoundError):
                message = (f"{name} is neither a local folder nor a model on the Hub: check the name "
                           "(a private model needs `hf auth login`)")
            elif isinstance(cause, RevisionNotFoundError):
                message = f"{name} has no revision {revision!r} on the Hub: check the branch, tag or commit"
            elif isinstance(cause, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
                offline = " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else ""
                message = (f"{name} is not a local folder, and the Hub cannot be reached{offline} to fetch it "
                           "(nor is it cached): check the name and the network, or give a local folder")
            else:
                cause = cause.__cause__ or cause.__context__
                continue
            raise ModelNotFoundError(message) from error
        raise


# Public files a converted checkpoint may carry besides its weights: config, model card, tokenizer.
COMPANION_FILES = ("config.json", "generation_config.json", "README.md", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json")


def _safetensors_header(path: Path) -> dict | None:
    """The JSON header of ``path`` if it is laid out as a safetensors file (any name), else None."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                return None
            size = int.from_bytes(head, "little")
            if not 2 <= size <= 1 << 24:
                return None
            header = json.loads(handle.read(size))
    except (OSError, ValueError):
        return None
    return header if isinstance(header, dict) else None


def _is_key_material(path: Path, key_fingerprint: str | None) -> bool:
    """Whether ``path`` holds an hf_secure key, by content: any name, any suffix.

    A file that parses as safetensors is key material if its metadata says so, or if its tensors
    hash to the checkpoint's key fingerprint (a key re-saved without its metadata).
    """
    header = _safetensors_header(path)
    if header is None:
        return False
    meta = header.get("__metadata__") or {}
    if isinstance(meta, dict) and meta.get("format") == KEY_FORMAT:
        return True
    if key_fingerprint is None:
        return False
    try:
        tensors = safetensors.torch.load(path.read_bytes())
    except Exception:  # noqa: BLE001  (not a loadable safetensors file: not a key either)
        return False
    return fingerprint(tensors) == key_fingerprint


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")


def weight_files(folder: str | os.PathLike) -> list[str]:
    """Files under ``folder`` that may hold weights, relative names: any depth, through linked
    folders, any of a name's suffixes in any case (``model.SAFETENSORS``, ``model.safetensors.bak``)."""
    found = []
    for root, _, names in os.walk(folder, followlinks=True):
        for name in names:
            suffixes = [s.lower() for s in Path(name).suffixes]
            if any(s in WEIGHT_SUFFIXES for s in suffixes) or name == SAFE_WEIGHTS_INDEX_NAME:
                found.append(os.path.relpath(os.path.join(root, name), folder))
    return sorted(found)


def write_public_part(folder: str | os.PathLike, out: str | os.PathLike) -> list[Path]:
    """Copy what an mpc checkpoint's servers, dealer, clients and Hub repository may hold -- config,
    generation config, tokenizer files -- from ``folder`` to ``out``, and write its model card.

    The weights stay with the model owner (``hf-secure party --role owner``). Raises
    UnknownOptionError for a folder that is not an mpc checkpoint.
    """
    from .convert.model_card import write_model_card

    folder, out = Path(folder), Path(out)
    if not folder.is_dir():
        raise ModelNotFoundError(f"{folder} does not exist: give the folder written by `hf-secure convert approximate`")
    if out.exists() and (not out.is_dir() or out.resolve() == folder.resolve()):
        raise UnknownOptionError(f"--out {out} must be a new or empty folder, not the checkpoint or a file")
    config = folder / "config.json"
    try:
        section = json.loads(config.read_text()).get("hf_secure") if config.is_file() else None
    except (ValueError, AttributeError):
        raise UnknownOptionError(f"{config} is not a readable config (malformed JSON)") from None
    if not isinstance(section, dict) or section.get("protocol") != "mpc":
        raise UnknownOptionError(f"{folder} is not an mpc checkpoint (`hf-secure convert approximate`)")
    out.mkdir(parents=True, exist_ok=True)
    copied = [Path(shutil.copy2(folder / name, out / name)) for name in COMPANION_FILES
              if name != "README.md" and (folder / name).is_file()]
    return [*copied, write_model_card(out, section, source=str(folder))]


def config_only_folder(name_or_path, revision=None) -> str:
    """The folder a server or the dealer reads an mpc checkpoint's config from: a local folder as
    it is (see :func:`refuse_weights`), or for a Hub id a snapshot of ``config.json`` alone."""
    if os.path.isdir(name_or_path):
        return str(name_or_path)
    _check_hub_id(name_or_path)
    from huggingface_hub import hf_hub_download

    with _hub_errors(name_or_path, revision):
        return os.path.dirname(hf_hub_download(str(name_or_path), "config.json", revision=revision))


def refuse_weights(folder: str | os.PathLike) -> None:
    """UnknownOptionError when ``folder`` holds weight files: a server or the dealer must not."""
    found = weight_files(folder)
    if found:
        raise UnknownOptionError(
            f"{folder} holds the model's weights ({', '.join(found[:3])}): a server or the dealer must not. "
            f"Give it the public part (`hf-secure public {folder} --out PUBLIC`) or a Hub id; pass "
            "--allow-weights only on a machine of the model owner")


def check_uploadable(folder: str | os.PathLike) -> list[Path]:
    """The files of a converted checkpoint to upload: an allow-list, never the rest of the folder.

    Uploaded: the checkpoint's weight files (as transformers resolves them, plus the shard
    index), its config, generation config, model card and tokenizer files. Every file under
    ``folder`` (any name, nested or hidden folders included) is first checked for key material by
    content; one such file refuses the whole upload (KeyMaterialUploadError).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelNotFoundError(f"{folder} does not exist: give the folder written by `hf-secure convert`")
    config = folder / "config.json"
    section = json.loads(config.read_text()).get("hf_secure") if config.is_file() else None
    if not isinstance(section, dict):
        raise KeyMaterialUploadError(f"{folder} is not a converted hf_secure checkpoint; refusing to upload it")
    disguised = [name for name in COMPANION_FILES
                 if (folder / name).is_file() and _safetensors_header(folder / name) is not None]
    if section.get("protocol") == "mpc":  # the weights are the owner's secret: only the public part goes up
        found = weight_files(folder)
        if found or disguised:
            raise KeyMaterialUploadError(
                f"refusing to upload {folder}: an mpc checkpoint's weights are the model owner's secret "
                f"({', '.join(found + disguised)}); upload its public part: `hf-secure public {folder} --out PUBLIC`")
        return [folder / name for name in COMPANION_FILES if (folder / name).is_file()]
    weights = set(checkpoint_files(folder))
    recorded = section.get("weights")
    if recorded:  # the weight files are the converter's, byte for byte: no key can hide under their names
        verify_weights(folder, recorded)
    every = [p for p in sorted(folder.rglob("*")) if p.is_file()]  # links are read where they point (Hub snapshots)
    keys = [str(p.relative_to(folder)) for p in every
            if not (recorded and p.parent == folder and p.name in weights)
            and _is_key_material(p, section.get("key_fingerprint"))]
    # config, model card and tokenizer files are never tensor containers: one that parses as
    # safetensors is something else under a public name (e.g. a key with an extra tensor)
    if keys or disguised:
        raise KeyMaterialUploadError(f"refusing to upload {folder}: it holds key material or tensors under a public "
                                     f"file name ({', '.join(keys + disguised)}); move the key out of the model folder")
    allowed = weights | set(COMPANION_FILES) | {SAFE_WEIGHTS_INDEX_NAME}
    return [folder / name for name in sorted(allowed) if (folder / name).is_file()]


def push_converted(folder, repo_id: str, *, token=None, private: bool | None = None,
                   commit_message: str = "Upload converted checkpoint (hf_secure)", **kwargs):
    """Create ``repo_id`` if needed and upload the converted checkpoint with its model card."""
    from huggingface_hub import HfApi

    from .convert.model_card import write_model_card

    unknown = set(kwargs) - {"revision", "create_pr", "parent_commit"}
    if unknown:
        raise UnknownOptionError(f"push of a converted checkpoint does not take {sorted(unknown)} (the files it "
                                 "uploads are fixed: weights, config, model card, tokenizer)")
    folder = Path(folder)
    files = check_uploadable(folder)
    if not (folder / "README.md").is_file():  # our own card: nothing to check in it
        section = json.loads((folder / "config.json").read_text())["hf_secure"]
        write_model_card(folder, section, source=str(folder))
        files.append(folder / "README.md")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    return api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message,
                             allow_patterns=[p.name for p in files], **kwargs)
