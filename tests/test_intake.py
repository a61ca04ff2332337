import json

import polars as pl
import pytest

from reflectune import intake
from reflectune.errors import InputFileError
from reflectune.records import RECORD, REJECTED, check_columns, sample_id

from .conftest import SAMPLE

GOOD = [
    {"instruction": "Name a primary colour.", "input": "", "output": "Red."},
    {"instruction": "Translate to German.", "input": "Good morning", "output": "Guten Morgen"},
    {"instruction": "Add the numbers.", "output": "5"},  # no input field at all
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_json_array_jsonl_and_parquet_read_the_same(tmp_path):
    as_json = tmp_path / "d.json"
    as_json.write_text(json.dumps(GOOD, indent=2))
    as_parquet = tmp_path / "d.parquet"
    pl.DataFrame([{**r, "input": r.get("input", "")} for r in GOOD]).write_parquet(as_parquet)
    loaded = [intake.load(str(p)) for p in (as_json, write_jsonl(tmp_path / "d.jsonl", GOOD), as_parquet)]
    for data in loaded:
        check_columns(data.valid, RECORD, "intake")
        assert data.counts == {"input_rows": 3, "valid_rows": 3, "rejected_rows": 0, "duplicate_rows": 0}
        assert data.valid["source_index"].to_list() == [0, 1, 2]
        assert data.valid["input"].to_list() == ["", "Good morning", ""]
    assert loaded[0].valid.equals(loaded[1].valid)
    assert loaded[0].valid.equals(loaded[2].valid)


def test_sample_id_is_a_stable_content_hash():
    a = sample_id("Name a colour.", "", "Red.")
    assert a == sample_id("Name a colour.", "", "Red.")
    assert a != sample_id("Name a colour.", "", "Blue.")
    assert a != sample_id("Name a colour.", "Red.", "")  # fields do not run together


def test_column_mapping(tmp_path):
    path = tmp_path / "chat.parquet"
    pl.DataFrame({"prompt": ["Say hi."], "completion": ["Hi!"], "extra": [1]}).write_parquet(path)
    data = intake.load(str(path), intake.parse_column_map(["instruction=prompt", "output=completion"]))
    assert data.valid.select("instruction", "output").row(0) == ("Say hi.", "Hi!")
    with pytest.raises(InputFileError, match="FIELD=COLUMN"):
        intake.parse_column_map(["instruction"])
    with pytest.raises(InputFileError, match="unknown field"):
        intake.parse_column_map(["question=prompt"])


def test_bad_rows_are_rejected_with_reasons_and_counts_reconcile(tmp_path):
    rows = [
        GOOD[0],
        {"instruction": "Missing output"},
        {"instruction": 42, "output": "a number is not an instruction"},
        {"instruction": "   ", "output": "blank instruction"},
        {"instruction": "Blank output", "output": " \n"},
        ["not", "an", "object"],
        {"instruction": "Null output", "output": None},
        {"instruction": "Bad input", "input": ["x"], "output": "y"},
        GOOD[0],  # duplicate of line 1
        GOOD[1],
    ]
    data = intake.load(write_jsonl(tmp_path / "bad.jsonl", rows))
    check_columns(data.rejected, REJECTED, "intake")
    assert data.input_rows == len(rows)
    assert data.valid.height + data.rejected.height == data.input_rows
    assert data.valid["source_index"].to_list() == [0, 9]
    reasons = dict(zip(data.rejected["source_index"].to_list(), data.rejected["reason"].to_list()))
    assert "line 2" in reasons[1] and "field 'output' is missing" in reasons[1]
    assert "field 'instruction' is an int, not a string" in reasons[2]
    assert "field 'instruction' is empty" in reasons[3]
    assert "field 'output' is empty" in reasons[4]
    assert "not an object" in reasons[5]
    assert "field 'output' is null" in reasons[6]
    assert "field 'input' is a list" in reasons[7]
    assert "duplicate of line 1" in reasons[8]
    assert data.duplicate_rows == 1
    # the raw row is kept, so nothing is lost
    assert json.loads(data.rejected.filter(pl.col("source_index") == 2)["raw"][0])["instruction"] == 42


def test_mapped_field_names_appear_in_reasons(tmp_path):
    data = intake.load(write_jsonl(tmp_path / "m.jsonl", [{"q": "Hi", "a": ""}]), {"instruction": "q", "output": "a"})
    assert "field 'a' (mapped to output) is empty" in data.rejected["reason"][0]


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("broken.json", '[\n {"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}\n]', r"broken\.json: line 3, column 22: invalid JSON"),
        ("broken.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n', r"broken\.jsonl: line 2, column \d+: invalid JSON"),
        ("object.json", '"just a string"', r"object\.json: line 1: expected a JSON array"),
        ("data.csv", "instruction,output\n", r"unknown file type"),
    ],
)
def test_malformed_files_stop_with_file_line_and_fix(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(InputFileError, match=expected):
        intake.load(str(path))


def test_undecodable_bytes_name_the_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"instruction": "a", "output": "b"}\n{"instruction": "caf\xe9", "output": "c"}\n')
    with pytest.raises(InputFileError, match=r"latin1\.jsonl: line 2: byte 0xe9 .* not valid UTF-8: re-encode"):
        intake.load(str(path))


def test_parquet_without_the_columns_names_them_and_the_fix(tmp_path):
    path = tmp_path / "cols.parquet"
    pl.DataFrame({"question": ["a"], "answer": ["b"]}).write_parquet(path)
    with pytest.raises(InputFileError, match=r"cols\.parquet: column 'instruction' \(for instruction\), 'output' \(for output\) not found.*\['question', 'answer'\].*--map"):
        intake.load(str(path))
    junk = tmp_path / "junk.parquet"
    junk.write_text("not parquet")
    with pytest.raises(InputFileError, match=r"junk\.parquet: not a readable Parquet file"):
        intake.load(str(junk))
    with pytest.raises(InputFileError, match="no such file"):
        intake.load(str(tmp_path / "missing.jsonl"))


def test_limit_keeps_the_first_rows():
    data = intake.load(str(SAMPLE), limit=5)
    assert data.input_rows == 5 and data.valid.height == 5


@pytest.mark.parametrize("name,content", [("empty.jsonl", ""), ("blank.jsonl", "  \n\n \t\n"), ("empty.json", ""),
                                          ("empty-array.json", "[]")])
def test_an_empty_dataset_is_refused_the_same_way_in_every_form(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(InputFileError, match=r"holds no rows: give a file with at least one"):
        intake.load(str(path))
    empty = tmp_path / "empty.parquet"
    pl.DataFrame(schema={"instruction": pl.String, "output": pl.String}).write_parquet(empty)
    with pytest.raises(InputFileError, match=r"holds no rows"):
        intake.load(str(empty))


def test_unicode_line_separators_inside_strings_are_characters_not_line_ends(tmp_path):
    rows = [{"instruction": "Join\u2028these\u2029lines\u0085now", "output": "Done\u2028."}, GOOD[0]]
    path = tmp_path / "sep.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in rows), encoding="utf-8")
    data = intake.load(str(path))
    assert data.valid["instruction"].to_list() == [rows[0]["instruction"], GOOD[0]["instruction"]]


def test_a_folder_a_single_object_and_invisible_text_are_named(tmp_path):
    folder = tmp_path / "x.jsonl"
    folder.mkdir()
    with pytest.raises(InputFileError, match=r"x.jsonl: is a folder, not a file"):
        intake.load(str(folder))
    single = tmp_path / "one.json"
    single.write_text(json.dumps(GOOD[0], indent=2))
    with pytest.raises(InputFileError, match=r"holds one JSON object; expected an array .* wrap the object in \[ \]"):
        intake.load(str(single))
    path = write_jsonl(tmp_path / "odd.jsonl", [{"instruction": "\u200b", "output": "x"}, {"instruction": 3, "output": "y"},
                                               {"instruction": "\ufeff \u00ad", "output": "z"}, GOOD[0]])
    data = intake.load(path)
    reasons = data.rejected["reason"].to_list()
    assert data.valid.height == 1 and len(reasons) == 3
    assert "line 1: field 'instruction' is empty" in reasons[0] and "line 3: field 'instruction' is empty" in reasons[2]
    assert "is an int, not a string" in reasons[1]
