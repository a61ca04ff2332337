"""The family of methods as modes of the recycle flow, on a real Prefect API with the packaged
model: cherry and superfilter run no teacher; reflection keeps every recycled pair."""

import math

import polars as pl
import pytest

from reflectune import stages
from reflectune.config import RecycleParams
from reflectune.engines import pool

from ..conftest import MODEL, SAMPLE

NO_TRAIN = {"enabled": False}


def _scores(out):
    return pl.concat([pl.read_parquet(p) for p in sorted((out / "scores").glob("*.parquet"))])


@pytest.fixture(scope="module")
def small_scorer(tmp_path_factory):
    """A smaller model than the student, as Superfiltering scores with: the packaged student's
    first 10 of its 30 layers, with its embeddings, head and tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from reflectune.models import resolve

    path = tmp_path_factory.mktemp("small-scorer")
    model = AutoModelForCausalLM.from_pretrained(resolve(MODEL), dtype=torch.float32)
    model.model.layers = model.model.layers[:10]
    model.config.num_hidden_layers = 10
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(resolve(MODEL)).save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("method", ["cherry", "superfilter"])
def test_a_method_without_a_teacher_loads_none_and_keeps_the_top_ifd(prefect_api, tmp_path, method, small_scorer):
    from reflectune.flows.recycle import recycle

    out = tmp_path / "out"
    # cherry scores with the student; superfilter with a smaller model
    scorer = MODEL if method == "cherry" else small_scorer
    params = RecycleParams(dataset=str(SAMPLE), output=str(out), limit=24, shard_size=12, training=NO_TRAIN,
                           student={"max_length": 256}, selection={"method": method, "budget": 0.2, "scorer": scorer},
                           license="apache-2.0" if method == "cherry" else None)
    loads = len(pool.load_seconds)
    manifest = recycle(params)
    # no teacher: one engine (the scorer) loaded, no teacher tokens, no variants written
    assert manifest["engine_loads"] == len(pool.load_seconds) - loads == 1
    assert manifest["teacher"] is None and manifest["method"] == method
    assert manifest["token_usage"] == {"generations": 0, "prompt_tokens": 0, "completion_tokens": 0}
    assert {r["stage"] for r in manifest["shard_results"]} == {"student"} and not (out / "variants").exists()
    assert manifest["scorer"] == stages.model_identity(params.scorer)
    assert (manifest["scorer"] == manifest["student"]) == (method == "cherry")

    # an independent computation of the rule on the same scores: IFD < 1, top 20% of all by IFD
    scores = _scores(out)
    assert set(scores["variant"]) == {"orig"}
    valid = scores.filter(pl.col("ifd_ppl").is_not_nan())
    ranked = sorted((r["ifd_ppl"], r["sample_id"]) for r in valid.iter_rows(named=True) if r["ifd_ppl"] < 1)
    keep = math.floor(0.2 * scores.height)
    want = {sid for _, sid in ranked[::-1][:keep]}
    selected = pl.read_parquet(out / "selected.parquet")
    assert keep == 4 and set(selected["sample_id"]) == want
    assert set(selected["variant"]) == {"orig"} and selected["teacher"].null_count() == selected.height
    counts = manifest["counts"]
    assert counts["selected_rows"] == keep and counts["per_branch"]["orig_kept"] == keep
    assert counts["selected_rows"] + counts["dropped_rows"] == counts["valid_rows"]
    decisions = pl.read_parquet(out / "decisions.parquet")
    above = decisions.filter(pl.col("orig_ifd_ppl") >= 1)
    assert all("is not < 1" in reason for reason in above["reason"])
    assert "Method <code>" + method in (out / "report.html").read_text()
    check_dataset(out, manifest)


def check_dataset(out, manifest):
    """The folder loads with the datasets library as it stands, and its card says what the
    manifest says."""
    import re

    import yaml
    from datasets import load_dataset

    selected = pl.read_parquet(out / "selected.parquet")
    for data in (load_dataset(str(out), cache_dir=str(out.parent / "hf-cache"))["train"],
                 load_dataset("parquet", data_files=str(out / "selected.parquet"),
                              cache_dir=str(out.parent / "hf-cache"))["train"]):
        assert data.num_rows == selected.height and data.column_names == selected.columns
        assert data["sample_id"] == selected["sample_id"].to_list()
    decisions = load_dataset(str(out), "decisions", cache_dir=str(out.parent / "hf-cache"))["train"]
    assert decisions.num_rows == manifest["counts"]["valid_rows"]

    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["configs"][0] == {"config_name": "default", "data_files": [{"split": "train", "path": "selected.parquet"}]}
    c = manifest["counts"]
    row = re.search(r"\| (\d+) \| (\d+) \| (\d+) \((\d+)\) \| (\d+) \| (\d+) \|", card).groups()
    assert [int(x) for x in row] == [c["input_rows"], c["valid_rows"], c["rejected_rows"], c["duplicate_rows"],
                                     c["selected_rows"], c["dropped_rows"]]
    for branch, n in c["per_branch"].items():
        assert f"{branch} {n}" in card
    assert manifest["student"] in card and "@inproceedings{li2024quantity" in card
    assert front.get("license") == manifest["parameters"]["license"]


def test_reflection_keeps_every_recycled_pair(prefect_api, tmp_path):
    from reflectune.flows.recycle import recycle

    out = tmp_path / "out"
    params = RecycleParams(dataset=str(SAMPLE), output=str(out), limit=4, shard_size=2, training=NO_TRAIN,
                           teacher={"max_new_tokens": 16}, selection={"method": "reflection"})
    manifest = recycle(params)
    assert manifest["counts"]["selected_rows"] == manifest["counts"]["valid_rows"] == 4
    assert manifest["token_usage"]["completion_tokens"] > 0
    selected = pl.read_parquet(out / "selected.parquet").sort("source_index")
    variants = pl.concat([pl.read_parquet(p) for p in sorted((out / "variants").glob("*.parquet"))])
    recycled = variants.filter(pl.col("variant") == "ins_res").sort("source_index")
    assert set(selected["variant"]) == {"ins_res"}
    assert selected["output"].to_list() == recycled["output"].to_list()
    assert selected["instruction"].to_list() == recycled["instruction"].to_list()
    assert manifest["counts"]["per_branch"] == {"ins_res_kept": 4}
    assert "the same as the source dataset" in (out / "README.md").read_text()
    assert "@article{li2023reflection" in (out / "README.md").read_text()
