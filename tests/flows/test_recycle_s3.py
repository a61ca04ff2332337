"""The recycle flow with its input and every output on S3 (moto server on loopback), and
again through an S3 endpoint that fails requests."""

from __future__ import annotations

import json
import os

import polars as pl
import s3fs

from reflectune import io
from reflectune.config import RecycleParams

from ..conftest import SAMPLE
from ..fault_proxy import FaultProxy

TINY_TRAIN = {"epochs": 1, "batch_size": 2, "per_device_batch_size": 2, "learning_rate": 1e-4, "max_length": 128}


def upload_sample(bucket: str, n: int) -> str:
    rows = SAMPLE.read_text().splitlines()[:n]
    uri = f"s3://{bucket}/incoming/data.jsonl"
    io.write_bytes(uri, ("\n".join([*rows, '{"instruction": "no answer"}']) + "\n").encode())
    return uri


def objects(fs: s3fs.S3FileSystem, prefix: str) -> dict[str, bytes]:
    return {p: fs.cat_file(p) for p in fs.find(prefix)}


def flow_logs(flow_run_id) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as c:
        return "\n".join(log.message for log in c.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))))


def test_a_whole_run_on_s3(prefect_api, s3_endpoint, s3_bucket):
    from reflectune.flows.recycle import recycle

    params = RecycleParams(dataset=upload_sample(s3_bucket, 4), output=f"s3://{s3_bucket}/runs/one", shard_size=2,
                           teacher={"max_new_tokens": 8}, selection={"mode": "paper"}, training=TINY_TRAIN)
    state = recycle(params, return_state=True)
    assert state.is_completed()

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    stored = objects(fs, f"{s3_bucket}/runs/one")
    names = {p.split("/runs/one/", 1)[1] for p in stored}
    assert {"manifest.json", "selected.jsonl", "selected.parquet", "decisions.parquet", "rejected.parquet",
            "intake/summary.json", "shards/part-00000.parquet", "shards/part-00001.parquet",
            "training.json", "model/config.json", "model/model.safetensors"} <= names
    assert len([n for n in names if n.startswith("variants/") and n.endswith(".parquet")]) == 2
    assert len([n for n in names if n.startswith("scores/") and n.endswith(".parquet")]) == 2
    manifest = json.loads(stored[f"{s3_bucket}/runs/one/manifest.json"])
    c = manifest["counts"]
    assert (c["input_rows"], c["valid_rows"], c["rejected_rows"]) == (5, 4, 1)
    assert c["selected_rows"] + c["dropped_rows"] == c["valid_rows"] and manifest["training"]["trained"]
    # the credentials never reach an output or the run's logs
    secret = os.environ["AWS_SECRET_ACCESS_KEY"].encode()
    assert not [p for p, data in stored.items() if secret in data]
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in flow_logs(state.state_details.flow_run_id)


def test_a_failing_s3_endpoint_is_retried_and_loses_nothing(prefect_api, s3_endpoint, s3_bucket, monkeypatch):
    from reflectune.flows.recycle import recycle

    dataset = upload_sample(s3_bucket, 4)
    host, port = s3_endpoint.rsplit("//", 1)[1].split(":")
    # every fourth request fails, alternately with a 500 and a dropped connection
    faults = [("500" if (i // 4) % 2 else "close") if i % 4 == 3 else "pass" for i in range(400)]
    proxy = FaultProxy(host, int(port), faults)
    monkeypatch.setenv("REFLECTUNE_S3_ENDPOINT_URL", proxy.url)
    try:
        params = RecycleParams(dataset=dataset, output=f"s3://{s3_bucket}/runs/faulty", shard_size=2,
                               teacher={"max_new_tokens": 8}, selection={"mode": "paper"},
                               training={"enabled": False}, execution={"retries": 4, "retry_delay_seconds": 0})
        state = recycle(params, return_state=True)
    finally:
        proxy.close()
    assert state.is_completed()
    assert proxy.log.count("500") >= 3 and proxy.log.count("close") >= 3  # the faults did happen

    monkeypatch.setenv("REFLECTUNE_S3_ENDPOINT_URL", s3_endpoint)
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    base = f"{s3_bucket}/runs/faulty"
    manifest = json.loads(fs.cat_file(f"{base}/manifest.json"))
    c = manifest["counts"]
    assert (c["input_rows"], c["valid_rows"], c["rejected_rows"]) == (5, 4, 1)
    decisions = pl.read_parquet(fs.cat_file(f"{base}/decisions.parquet"))
    shards = pl.concat([pl.read_parquet(fs.cat_file(p)) for p in fs.glob(f"{base}/shards/*.parquet")])
    assert decisions.height == 4 and set(decisions["sample_id"]) == set(shards["sample_id"])
    selected = pl.read_parquet(fs.cat_file(f"{base}/selected.parquet"))
    assert selected.height == c["selected_rows"] and selected["sample_id"].n_unique() == selected.height
    rejected = pl.read_parquet(fs.cat_file(f"{base}/rejected.parquet"))
    assert rejected.height == 1 and "output" in rejected["reason"][0]
