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
