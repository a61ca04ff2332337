"""Packaged models in parts: joined in order, checked by sha256 and GGUF header, and a
corrupted part refused with the fix."""

from __future__ import annotations

import hashlib
import importlib

import pytest

from reflectune import packaged
from reflectune.errors import ModelSpecError


def _fake_parts(root, data: bytes, n: int) -> list[tuple[str, str]]:
    """The bytes split into `n` importable packages, as part wheels install them."""
    parts, size = [], -(-len(data) // n)
    for i in range(n):
        package = root / f"reflectune_test_part{i + 1}"
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text("")
        (package / "data" / f"part{i + 1:02d}.bin").write_bytes(data[i * size:(i + 1) * size])
        parts.append((package.name, f"data/part{i + 1:02d}.bin"))
    return parts


def _gguf(path, architecture: str, name: str) -> bytes:
    """A small GGUF file (its header and one 1 MB tensor), written with the gguf package."""
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), architecture)
    writer.add_name(name)
    writer.add_tensor("token_embd.weight", np.random.default_rng(0).standard_normal((256, 1024), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


def test_parts_are_joined_and_checked_and_a_corrupted_part_is_refused(tmp_path, monkeypatch):
    real = _gguf(tmp_path / "whole.gguf", "llama", "Smollm2 135M 8k Lc100K Mix1 Ep2")
    parts = _fake_parts(tmp_path / "site", real, 3)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    model = packaged.Packaged(parts=tuple(parts), sha256=hashlib.sha256(real).hexdigest(), architecture="llama",
                              header_name="Smollm2 135M 8k Lc100K Mix1 Ep2", install="pip install 'reflectune[split]'",
                              about="a small GGUF in three parts")
    monkeypatch.setitem(packaged.PACKAGED, "split-smollm2", model)

    joined = packaged.join("split-smollm2", tmp_path / "joined.gguf")
    assert joined.read_bytes() == real
    assert packaged.gguf_header(joined) == {"general.architecture": "llama",
                                            "general.name": "Smollm2 135M 8k Lc100K Mix1 Ep2"}

    second = tmp_path / "site" / parts[1][0] / parts[1][1]
    intact = second.read_bytes()
    corrupted = bytearray(intact)
    corrupted[1000] ^= 0xFF
    second.write_bytes(bytes(corrupted))
    with pytest.raises(ModelSpecError, match=r"packaged:split-smollm2: the joined GGUF from 3 part\(s\) has sha256 "
                       r"[0-9a-f]{64}, expected [0-9a-f]{64}: a part is corrupted.*pip install --force-reinstall"):
        packaged.join("split-smollm2", tmp_path / "again.gguf")
    assert not (tmp_path / "again.gguf").exists() and not list(tmp_path.glob("again.gguf.tmp-*"))

    second.write_bytes(intact)  # the sha256 holds again; now the header is not the one expected
    monkeypatch.setitem(packaged.PACKAGED, "split-smollm2", packaged.Packaged(
        **{**model.__dict__, "header_name": "Some Other Model"}))
    with pytest.raises(ModelSpecError, match=r"the GGUF header says \{'general.name': 'Smollm2 135M"):
        packaged.join("split-smollm2", tmp_path / "third.gguf")
