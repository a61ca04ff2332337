"""A run's folder is named in reflectune/run_folder.py alone: no other module of the library,
the tasks or the flows spells one of its file or folder names."""

import re

from reflectune import run_folder
from reflectune.run_folder import RecyclingRoot, RunFolder

from .conftest import ROOT

# every name of a run folder, as a string literal would spell it
NAMES = (*run_folder.PUBLISHED, run_folder.LOCK, "training.json", "evaluation.json", "evaluation.parquet",
         "summary.json", "ledger.parquet", "evaluation-table.parquet")
FOLDERS = ("shards", "variants", "scores", "intake", "journal", "inputs", "runs", "baselines")
LITERAL = re.compile(r"""["'](?:[^"'\n]*/)?(%s)(?:/[^"'\n]*)?["']""" % "|".join(map(re.escape, NAMES)))
JOINED = re.compile(r"""io\.join\([^)]*["'](%s)["']""" % "|".join(FOLDERS))


def test_no_run_file_name_is_spelled_outside_the_run_folder():
    found = []
    for folder in ("reflectune", "tasks", "flows"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.name == "run_folder.py":
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if LITERAL.search(line) or JOINED.search(line):
                    found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not found, "\n".join(found)


def test_the_check_finds_a_spelled_name():
    assert LITERAL.search('uri = io.join(out, "decisions.parquet")')
    assert LITERAL.search("path = 'out/manifest.json'")
    assert JOINED.search('io.join(params.output, "variants", name)')
    assert not LITERAL.search('desc="shards"')


def test_a_folder_on_s3_and_on_disk():
    s3 = RunFolder("s3://bucket/runs/one")
    assert s3.decisions == "s3://bucket/runs/one/decisions.parquet"
    assert s3.shard(3) == "s3://bucket/runs/one/shards/part-00003.parquet"
    assert s3.variants("part-00003", "abc") == "s3://bucket/runs/one/variants/part-00003.abc.parquet"
    assert RunFolder("/tmp/out").file(run_folder.MANIFEST) == "/tmp/out/manifest.json"
    root = RecyclingRoot("s3://bucket/rerecycle")
    assert root.run("batch-1") == "s3://bucket/rerecycle/runs/batch-1"
    assert root.batch_input("batch-1") == "s3://bucket/rerecycle/inputs/batch-1.jsonl"
