"""Model identity for cache keys: computed from small files, never from weights."""

from __future__ import annotations

import os
import subprocess
import sys

from .conftest import ROOT
from .fake_hub import FakeHub

KEYS = """
from reflectune import stages
from reflectune.config import RecycleParams
params = RecycleParams(teacher={"model": "org/tiny-llama"}, student={"model": "org/tiny-llama"})
shard = stages.Shard(0, "shards/part-00000.parquet", 1, "content")
print(stages.model_identity(params.student))
print(stages.target(params, shard, "student"))
"""


def test_cache_keys_of_a_hub_model_read_no_weights(tmp_path):
    """An orchestrator computes a run's cache keys for a hub model: only the config and the
    tokenizer config are fetched, never the weights; later, with the hub offline and those
    files cached, the same keys come from the cache alone."""
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "config.json").write_text('{"model_type": "llama", "num_hidden_layers": 2}')
    (repo / "tokenizer_config.json").write_text('{"model_max_length": 2048}')
    (repo / "model.safetensors").write_bytes(b"\0" * 4_000_000)
    hub = FakeHub("org/tiny-llama", repo)
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "0",
           "HF_HUB_DISABLE_TELEMETRY": "1"}
    try:
        online = subprocess.run([sys.executable, "-c", KEYS], cwd=ROOT, env=env, capture_output=True, text=True,
                                timeout=120)
    finally:
        hub.close()
    assert online.returncode == 0, online.stderr
    fetched = {r.rsplit("/", 1)[1] for r in hub.requests if "/resolve/" in r}
    assert fetched == {"config.json", "tokenizer_config.json"}, hub.requests
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.name.endswith(".safetensors")]
    identity, target = online.stdout.split()
    assert identity.startswith("org/tiny-llama@") and target.startswith("out/recycle/scores/part-00000.")

    offline = subprocess.run([sys.executable, "-c", KEYS], cwd=ROOT, env={**env, "HF_HUB_OFFLINE": "1"},
                             capture_output=True, text=True, timeout=120)
    assert offline.returncode == 0, offline.stderr
    assert offline.stdout.split() == [identity, target]


def test_the_packaged_model_is_identified_without_converting_it(tmp_path):
    """A fresh REFLECTUNE_HOME holds no converted model: identifying the packaged one leaves it so."""
    code = "from reflectune.models import model_id; print(model_id('packaged:smollm2-135m-instruct'))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "REFLECTUNE_HOME": str(tmp_path)},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("packaged:smollm2-135m-instruct@") and not any(tmp_path.iterdir())


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


def test_parts_are_joined_and_checked_and_a_corrupted_part_is_refused(tmp_path, monkeypatch):
    import hashlib
    import importlib

    import pytest

    from reflectune import packaged
    from reflectune.errors import ModelSpecError

    real = packaged.part_paths("smollm2-135m-instruct")[0].read_bytes()
    parts = _fake_parts(tmp_path / "site", real, 3)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    model = packaged.Packaged(parts=tuple(parts), sha256=hashlib.sha256(real).hexdigest(), architecture="llama",
                              header_name="Smollm2 135M 8k Lc100K Mix1 Ep2", install="pip install 'reflectune[split]'",
                              about="SmolLM2 in three parts")
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
