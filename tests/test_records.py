"""Every table between stages carries its schema version and is checked where it is read."""

import polars as pl
import pyarrow.parquet as pq
import pytest

from reflectune.errors import SchemaError
from reflectune.records import DECISION, SCHEMA_KEY, SCHEMA_VERSION, SCORED, SELECTED, read, write


def _selected(n=2):
    return pl.DataFrame({name: ([f"{name}{i}" for i in range(n)] if dtype == pl.String else
                                [float(i) for i in range(n)] if dtype == pl.Float64 else list(range(n)))
                         for name, dtype in SELECTED.items()}, schema=SELECTED)


def _write_with_version(df, path, version):
    table = df.to_arrow()
    table = table.replace_schema_metadata({SCHEMA_KEY: str(version)} if version is not None else None)
    pq.write_table(table, path)


def test_a_written_table_carries_its_version_and_reads_back(tmp_path):
    uri = str(tmp_path / "selected.parquet")
    write(_selected(), uri)
    assert pq.read_metadata(uri).metadata[SCHEMA_KEY.encode()] == str(SCHEMA_VERSION).encode()
    assert read(uri, SELECTED, "training").equals(_selected())


def test_a_missing_or_renamed_column_is_refused_naming_file_and_column(tmp_path):
    uri = str(tmp_path / "selected.parquet")
    write(_selected().drop("branch"), uri)
    with pytest.raises(SchemaError, match=r"training: .*selected\.parquet.*column 'branch' is missing"):
        read(uri, SELECTED, "training")
    write(_selected().rename({"ifd_ppl": "ifd"}), uri)
    with pytest.raises(SchemaError, match=r"column 'ifd_ppl' is missing"):
        read(uri, SELECTED, "training")


@pytest.mark.parametrize("version, says", [(SCHEMA_VERSION + 1, "upgrade Reflectune"),
                                           (SCHEMA_VERSION - 1, "rerun the stage"),
                                           (None, "carries no Reflectune schema version")])
def test_another_schema_version_is_refused(tmp_path, version, says):
    path = tmp_path / "scores.parquet"
    _write_with_version(_selected(), path, version)
    with pytest.raises(SchemaError, match=says) as err:
        read(str(path), SELECTED, "selection")
    assert str(path) in str(err.value)


def test_the_declared_tables_cover_what_selection_writes():
    # the wide table has every variant's pair and scores side by side
    for variant in ("orig", "ins", "res", "ins_res"):
        assert {f"{variant}_ifd_ppl", f"{variant}_output", f"{variant}_parse_status"} <= set(DECISION)
    assert {"variant", "parse_status", "ifd_ppl", "rifd_ppl"} <= set(SCORED)


def test_the_student_stage_refuses_variants_with_a_renamed_column(tmp_path):
    """At the stage boundary itself: the scorer never runs on a table it does not understand."""
    from reflectune import stages
    from reflectune.config import StudentConfig
    from reflectune.records import RECORD, VARIANT

    records = pl.DataFrame({"sample_id": ["a"], "source_index": [0], "instruction": ["Say hi."], "input": [""],
                            "output": ["Hi."]}, schema=RECORD)
    shard = tmp_path / "part-00000.parquet"
    write(records, str(shard))
    variants = pl.DataFrame(schema=VARIANT).rename({"parse_status": "status"})
    at = tmp_path / "variants.parquet"
    write(variants, str(at))
    with pytest.raises(SchemaError, match=r"student: .*variants\.parquet.*column 'parse_status' is missing"):
        stages.student_shard(stages.Shard(0, str(shard), 1, "x"), str(at), str(tmp_path / "scores.parquet"),
                             StudentConfig(), engine=None)
    assert not (tmp_path / "scores.parquet").exists()
