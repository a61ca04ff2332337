import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from reflectune.errors import ModelSpecError, ReflectuneError
from reflectune.models import home, resolve
from reflectune.records import SCORE_COLUMNS

from .conftest import MODEL, ROOT, SAMPLE


def run_cli(*args, cwd=ROOT):
    return subprocess.run(
        [sys.executable, "-m", "reflectune.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=900
    )


def test_score_command_writes_every_valid_row_in_order(tmp_path):
    """Every valid row scored in input order, in the format the output's name asks for (JSON
    Lines here; Parquet in the test below), the rejected row beside it with its reason."""
    src = tmp_path / "in.jsonl"
    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines()][:5]
    rows.insert(2, {"instruction": "No answer here"})
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "scores.jsonl"
    result = run_cli("score", str(src), "--out", str(out), "--student", MODEL, "--template", "vicuna")
    assert result.returncode == 0, result.stderr
    df = pl.read_ndjson(out)
    assert df.columns[:5] == ["sample_id", "source_index", "instruction", "input", "output"]
    assert set(SCORE_COLUMNS) <= set(df.columns)
    assert df["source_index"].to_list() == [0, 1, 3, 4, 5]
    assert df["ifd_ppl"].is_nan().sum() == 0 and (df["rifd_ppl"] > 0).all()
    assert "scoring" in result.stderr  # the progress bar
    assert "6 input rows: 5 scored, 1 rejected" in result.stderr
    rejected = pl.read_ndjson(tmp_path / "scores.rejected.jsonl")
    assert rejected["source_index"].to_list() == [2] and "output" in rejected["reason"][0]


@pytest.mark.parametrize("suffix", ["parquet", "jsonl"])
def test_a_commands_output_and_its_rejected_rows_are_written_by_the_outputs_extension(tmp_path, suffix):
    """What `score` and `reflect` write: the table in the format its name asks for, the
    rejected rows beside it as NAME.rejected.EXT; a Parquet output carries the schema version."""
    from reflectune import intake, records
    from reflectune.cli import _write

    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n" + json.dumps({"instruction": "c"}) + "\n")
    data = intake.load(str(src))
    out = tmp_path / f"out.{suffix}"
    assert _write(data.valid, data, str(out)) == str(tmp_path / f"out.rejected.{suffix}")
    read = pl.read_parquet if suffix == "parquet" else pl.read_ndjson
    assert read(out)["instruction"].to_list() == ["a"]
    assert read(tmp_path / f"out.rejected.{suffix}")["source_index"].to_list() == [1]
    if suffix == "parquet":
        import pyarrow.parquet as pq

        assert pq.read_metadata(out).metadata[records.SCHEMA_KEY.encode()] == str(records.SCHEMA_VERSION).encode()


def test_malformed_input_exits_nonzero_and_writes_nothing(tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"instruction": "a", "output": "b"}\n{oops}\n')
    out = tmp_path / "scores.parquet"
    result = run_cli("score", str(src), "--out", str(out))
    assert result.returncode == 2
    assert "bad.jsonl: line 2" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == [src]


def test_reflect_refuses_a_secret_block_it_would_not_read(tmp_path, capsys):
    from reflectune.cli import main

    out = tmp_path / "variants.parquet"
    assert main(["reflect", str(SAMPLE), "--out", str(out), "--engine", "openai", "--base-url",
                 "http://127.0.0.1:9/v1", "--api-key-block", "teacher-key"]) == 2
    err = capsys.readouterr().err
    assert "--api-key-block 'teacher-key'" in err and "--api-key-env" in err and not out.exists()


def test_reflect_refuses_a_password_in_a_url_as_recycle_does(tmp_path, capsys):
    """A user name or password in --base-url (or the input, or --out) is refused before anything
    is sent, without echoing it."""
    from reflectune.cli import main

    out = tmp_path / "variants.parquet"
    assert main(["reflect", str(SAMPLE), "--out", str(out), "--engine", "openai", "--teacher", "m", "--base-url",
                 "http://me:hunter2@127.0.0.1:9/v1", "--request-retries", "0"]) == 2
    err = capsys.readouterr().err
    assert "--base-url carries a user name or password in its URL: give the URL without them" in err
    assert "hunter2" not in err and "Traceback" not in err and not out.exists()


def test_models_prepare_and_specs(tmp_path):
    result = run_cli("models", "prepare")
    assert result.returncode == 0, result.stderr
    path = result.stdout.strip()
    assert path == str(home() / "models" / "smollm2-135m-instruct")
    assert os.path.exists(os.path.join(path, "model.safetensors"))
    assert resolve(path) == path  # a local directory works as a spec
    with pytest.raises(ModelSpecError, match="no config.json"):
        resolve(str(tmp_path))
    with pytest.raises(ModelSpecError, match="could not be fetched from the Hugging Face hub"):
        resolve("some-org/not-a-local-model")
    with pytest.raises(ModelSpecError, match="unknown packaged model"):
        resolve("packaged:nope")


def test_plan_counts_the_real_tokens_and_estimates_time(tokenizer, sample_rows):
    from reflectune import plan, prompts
    from reflectune.journal import dollars
    from reflectune.scoring import build_sequences

    result = plan.plan(str(SAMPLE), tokenizer, shard_size=8, max_new_tokens=64)
    stages = {s.name: s for s in result["stages"]}
    assert (result["valid_rows"], result["shards"]) == (41, 6)
    # what the student reads is what the scorer builds, four variants of it
    exact = sum(len(s.ids) for parts in build_sequences(sample_rows, tokenizer) for s in parts.values()
                if not isinstance(s, str))
    assert stages["student"].reads == 4 * exact
    # what the teacher reads is its real prompts: ins once, res twice (res and ins_res)
    def tokens(chat):
        return len(tokenizer("\n".join(m["content"] for m in chat), add_special_tokens=False)["input_ids"])
    ins = sum(tokens(prompts.instruction_reflection(r["instruction"], r.get("input", ""), r["output"], 64))
              for r in sample_rows)
    res = sum(tokens(prompts.response_reflection(r["instruction"], r.get("input", ""), r["output"], 64))
              for r in sample_rows)
    assert stages["teacher"].reads == ins + 2 * res
    assert 3 * 41 <= stages["teacher"].writes <= 3 * 41 * 64  # at most max_new_tokens per answer

    # time follows the basis it names: a given rate is used as given ...
    given = plan.plan(str(SAMPLE), tokenizer, throughput={"student": 5000.0})
    assert given["stages"][1].basis == "given" and given["stages"][1].seconds == stages["student"].reads / 5000
    # ... the CPU figure scales with model size: a 52x larger student takes 52x longer
    big = plan.plan(str(SAMPLE), tokenizer, student_params=52 * plan.PACKAGED_PARAMS)
    assert big["stages"][1].seconds == pytest.approx(52 * stages["student"].seconds)
    # ... and an H100 runs a 7B student faster than these 2 cores run the 135M one
    gpu = plan.plan(str(SAMPLE), tokenizer, device="h100", student_params=plan.parse_size("7B"))
    assert gpu["stages"][1].seconds < stages["student"].seconds and gpu["stages"][1].basis.startswith("H100")

    done = run_cli("plan", str(SAMPLE), "--teacher-size", "70B", "--device", "h100", "--student-tps", "5000")
    assert done.returncode == 0, done.stderr
    assert "41 rows, 41 valid" in done.stdout and re.search(r"student .* 5,000 .* given", done.stdout)
    bad = run_cli("plan", str(SAMPLE), "--teacher-size", "huge")
    assert bad.returncode == 2 and "write it like 135M, 7B or 70B" in bad.stderr

    # the teacher's cost at the user's prices, beside the budget
    cost = result["teacher_cost"]
    assert cost["tokens"] == stages["teacher"].reads + stages["teacher"].writes and not cost["priced"]
    half = cost["tokens"] // 2
    priced = plan.plan(str(SAMPLE), tokenizer, shard_size=8, max_new_tokens=64, price_input_per_m=2.5,
                       price_output_per_m=10.0, budget_tokens=half)["teacher_cost"]
    assert priced["usd"] == pytest.approx((stages["teacher"].reads * 2.5 + stages["teacher"].writes * 10) / 1e6)
    line = plan.cost_line(priced)
    assert f"about {cost['tokens']:,} tokens, ${dollars(priced['usd'])}" in line
    assert f"budget {half:,} tokens. The estimate is 2.0x the token budget" in line
    assert "estimate is" not in plan.cost_line(priced | {"budget_tokens": 2 * cost["tokens"]})

    # teacher.verify: one more request per rewrite, the verification prompt read and one word written
    verified = plan.plan(str(SAMPLE), tokenizer, shard_size=8, max_new_tokens=64, verify=True)["teacher_cost"]
    asks = sum(tokens(prompts.verification(r["instruction"], r.get("input", ""), r["output"])) for r in sample_rows)
    assert verified["verify_tokens"] == 3 * asks + 3 * 41
    assert verified["tokens"] == cost["tokens"] + verified["verify_tokens"]
    assert f"({verified['verify_tokens']:,} of them verifying the rewrites)" in plan.cost_line(verified)
    assert "verifying" not in plan.cost_line(cost)


def test_plan_refuses_the_budgets_recycle_refuses_naming_its_own_option(capsys):
    """A budget of 0 or less, or in dollars without prices: exit 2, one message naming plan's
    option and the fix (not a ZeroDivisionError, not "-6514.0x", not silence). A small dollar
    budget is printed with its digits."""
    from reflectune.cli import main

    at_least_one = "--budget-tokens: Input should be greater than or equal to 1"
    for given, expected in ((["--budget-tokens", "0"], at_least_one), (["--budget-tokens", "-5"], at_least_one),
                            (["--budget-usd", "0", "--price-output-per-m", "10"],
                             "--budget-usd: Input should be greater than 0"),
                            (["--budget-usd", "0.5"], "--budget-usd is 0.5 but no price is set: give --price-input-per-m "
                                                      "and --price-output-per-m"),
                            (["--shard-size", "0"], "--shard-size: 0: give 1 or more records per shard")):
        assert main(["plan", str(SAMPLE), *given]) == 2, given
        captured = capsys.readouterr()
        assert expected in captured.err and "Traceback" not in captured.err and not captured.out, given
        assert "teacher." not in captured.err, given  # plan's options, not recycle's names

    assert main(["plan", str(SAMPLE), "--budget-usd", "0.004", "--price-input-per-m", "2.5",
                 "--price-output-per-m", "10"]) == 0
    out = capsys.readouterr().out
    assert "; budget $0.004. The estimate is " in out and "x the dollar budget" in out


def flow_form() -> dict[str, str]:
    """The recycle flow's form as the Prefect UI renders it: each field's description, by its
    dotted name."""
    from reflectune.flows.recycle import recycle

    schema = recycle.parameters.model_dump()
    defs = schema["definitions"]

    def walk(properties: dict, prefix: str) -> dict[str, str]:
        out = {}
        for name, spec in properties.items():
            if "$ref" in spec:
                out |= walk(defs[spec["$ref"].rsplit("/", 1)[1]]["properties"], f"{prefix}{name}.")
            else:
                out[prefix + name] = spec["description"]
        return out

    return walk(defs[schema["properties"]["params"]["$ref"].rsplit("/", 1)[1]]["properties"], "")


def test_recycle_help_shows_every_parameter_of_the_form_with_its_description(capsys):
    from reflectune.cli import main
    from reflectune.config import RecycleParams, config_fields

    form = flow_form()
    assert set(form) == set(config_fields(RecycleParams)) and len(form) > 50
    with pytest.raises(SystemExit):
        main(["recycle", "--help"])
    text = capsys.readouterr().out
    squeezed = "".join(text.split())  # help text is wrapped, hyphenated words included
    for name, description in form.items():
        assert f"--{name} " in text, f"--{name} is missing from `recycle --help`"
        assert "".join(description.split()) in squeezed, f"--{name}: the form's description is not its help"


def other_value(info):
    """A valid command-line value, other than the default, for a RecycleParams field."""
    from typing import Literal, get_args, get_origin

    default = info.get_default(call_default_factory=True)
    if get_origin(info.annotation) is dict:
        return {"instruction": "prompt"}
    kinds = [a for a in (get_args(info.annotation) or (info.annotation,)) if a is not type(None)]
    kind = kinds[0]
    if get_origin(info.annotation) is Literal:
        return next(c for c in get_args(info.annotation) if c != default)
    if kind is bool:
        return not default
    if kind is int:
        return 64 if default is None else default + 1
    if kind is float:
        return 0.5 if default != 0.5 else 0.25
    return f"other-{info.description[:6].strip()}"


def as_argument(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return json.dumps(value) if isinstance(value, dict) else str(value)


def test_every_parameter_is_reachable_from_the_command_line(tmp_path):
    """Each field, set alone, by its dotted name (`key=value` and `--key value`), arrives in the
    flow's parameters; a value from --params stays unless an option overrides it."""
    from reflectune.cli import _dotted, _parser, recycle_params
    from reflectune.config import RecycleParams, config_fields

    parser = _parser()

    def parse(*args):
        return recycle_params(parser.parse_args(_dotted(["recycle", *args])))

    def get(params, name):
        for part in name.split("."):
            params = getattr(params, part)
        return params

    # a setting that is refused without another one gets that one too
    needs = {"teacher.budget_usd": ["teacher.price_output_per_m=2.5"],
             "evaluation.judge_budget_usd": ["evaluation.judge_price_output_per_m=2.5"]}
    fields = config_fields(RecycleParams)
    # a text field that takes named values
    named = {"evaluation.baselines": "length,ifd"}
    for name, info in fields.items():
        value = named.get(name) or other_value(info)
        assert value != info.get_default(call_default_factory=True), name
        assert get(parse(f"{name}={as_argument(value)}", *needs.get(name, [])), name) == value, name
        flag = ([f"--{name}"] if value else [f"--no-{name}"]) if isinstance(value, bool) else [f"--{name}", as_argument(value)]
        assert get(parse(*flag, *needs.get(name, [])), name) == value, name

    given = tmp_path / "params.json"
    given.write_text(json.dumps({"shard_size": 7, "selection": {"budget": 0.1, "mode": "paper"}}))
    params = parse("data.jsonl", "--params", str(given), "selection.budget=0.2", "--teacher", "t", "--exact", "--no-train")
    assert (params.dataset, params.shard_size, params.selection.mode, params.selection.budget) == ("data.jsonl", 7, "paper", 0.2)
    assert (params.teacher.model, params.student.dtype, params.training.enabled) == ("t", "float32", False)

    with pytest.raises(ReflectuneError) as err:
        parse("selection.budget=2", "shard_size=0")
    assert "selection.budget" in str(err.value) and "shard_size" in str(err.value)


# a few shards of the cherry method: the command's own Prefect server, the scorer, no teacher;
# settings given both ways, as flags and as dotted names
SMALL_RUN = ["selection.method=cherry", "--no-train", "shard_size=2", "--limit", "6", "student.max_length=256",
             "selection.budget=0.5"]


def _recycle(out, log):
    """`reflectune recycle` in a session of its own, as a terminal runs it, with the command's
    own Prefect server (no PREFECT_API_URL)."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    return subprocess.Popen([sys.executable, "-m", "reflectune.cli", "recycle", str(SAMPLE), "--out", str(out),
                             *SMALL_RUN], cwd=ROOT, env=env, stdout=log, stderr=log, start_new_session=True)


def _until(proc, log, ready):
    """Wait for `ready()` while the command runs."""
    deadline = time.monotonic() + 600
    while not ready():
        assert proc.poll() is None and time.monotonic() < deadline, Path(log.name).read_text()[-3000:]
        time.sleep(0.1)


@pytest.mark.slow
def test_ctrl_c_stops_in_seconds_with_one_line_and_the_rerun_resumes(prefect_api, tmp_path):
    """SIGINT to the process group mid-scoring, as a terminal sends it. (That the command's own
    Prefect server dies with a SIGKILLed command is tests/test_api_server.py's.)"""
    import psutil

    out = tmp_path / "out"
    with open(tmp_path / "log", "w") as log:
        proc = _recycle(out, log)
        _until(proc, log, lambda: list((out / "scores").glob("*.parquet.json")))  # mid-scoring
        kids = psutil.Process(proc.pid).children(recursive=True)
        os.killpg(proc.pid, signal.SIGINT)  # as a terminal sends it
        start = time.monotonic()
        code = proc.wait(60)
    assert code == 130 and time.monotonic() - start < 15
    err = (tmp_path / "log").read_text()
    assert "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == ("reflectune: interrupted: finished shards are kept; to resume, run the "
                                            "same command again (only unfinished shards run)")
    time.sleep(1)
    assert not [k for k in kids if k.is_running() and k.status() != psutil.STATUS_ZOMBIE]
    scored = len(list((out / "scores").glob("*.parquet.json")))
    assert 0 < scored < 3 and not (out / "manifest.json").exists()

    # the same command again, in this process (on the test's Prefect API)
    from reflectune.flows.recycle import recycle
    from reflectune.cli import _dotted, _parser, recycle_params

    argv = _dotted(["recycle", str(SAMPLE), "--out", str(out), *SMALL_RUN])
    manifest = recycle(recycle_params(_parser().parse_args(argv)))
    assert json.loads((out / "manifest.json").read_text())["counts"] == manifest["counts"]
    # the dotted names reached the flow
    given = manifest["parameters"]
    assert (given["limit"], given["shard_size"], given["selection"]["method"], given["selection"]["budget"],
            given["training"]["enabled"], given["student"]["max_length"]) == (6, 2, "cherry", 0.5, False, 256)
    assert 0 < manifest["counts"]["selected_rows"] <= 3  # the top half by IFD, of those with IFD < 1
    assert sum(r["reused"] for r in manifest["shard_results"]) >= scored


def test_report_on_an_unfinished_or_damaged_folder_says_what_to_do(tmp_path, capsys):
    from reflectune.cli import main

    (tmp_path / "manifest.json").write_text('{"status": "complete", "counts": {}}')
    assert main(["report", str(tmp_path)]) == 2
    assert "decisions.parquet is missing: the run did not finish there" in capsys.readouterr().err
    (tmp_path / "manifest.json").write_text('{"status": "compl')
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "manifest.json is not valid JSON (cut short?)" in err and "Traceback" not in err


def test_a_checkout_hiding_a_regular_install_is_named_with_the_fix(tmp_path):
    """flows/ and tasks/ are installed inside the package; a source tree of `reflectune` alone
    ahead on the path (a checkout over a regular install) has neither: exit 2, the fix named."""
    import shutil
    import sysconfig

    shutil.copytree(ROOT / "reflectune", tmp_path / "reflectune", ignore=shutil.ignore_patterns("__pycache__"))
    # -S: no site processing, so no editable finder; the dependencies from site-packages as a plain path
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{sysconfig.get_paths()['purelib']}"}
    done = subprocess.run([sys.executable, "-S", "-m", "reflectune.cli", "cluster", "setup"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "reflectune.flows is not importable" in done.stderr and "pip install -e ." in done.stderr
    assert "Traceback" not in done.stderr


def test_recycle_into_a_folder_another_run_holds_is_refused_before_a_prefect_server_starts(tmp_path, capsys,
                                                                                           monkeypatch):
    """The lock is read before the command's own Prefect server starts (about 15 s): the busy
    folder and its claim file are named at once, and no server was started (PREFECT_API_URL,
    which starting one sets, is still unset)."""
    from reflectune import run_folder
    from reflectune.cli import main

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    out = tmp_path / "out"
    out.mkdir()
    (out / run_folder.LOCK).write_text(json.dumps({"host": "elsewhere", "pid": 7, "beat": time.time(),
                                                   "token": "t", "since": "now"}))
    start = time.monotonic()
    assert main(["recycle", str(SAMPLE), "--out", str(out), *SMALL_RUN]) == 2
    err = capsys.readouterr().err
    assert f"output {out} is in use by another run (host elsewhere, process 7" in err
    assert f"delete {out / run_folder.LOCK}" in err and "Traceback" not in err
    assert "PREFECT_API_URL" not in os.environ and time.monotonic() - start < 10


def _finished_run(folder: Path, method: str, sample_ids: list[str], score: float) -> Path:
    """A finished run's folder as `compare` reads it: the manifest, the evaluation's summary and
    the decisions (one row per sample)."""
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"parameters": {"dataset": "data.jsonl",
                                                                     "selection": {"method": method}}}))
    row = {"baseline": "random", "test_set": "vicuna", "n": 80, "wins": 30, "ties": 30, "losses": 20,
           "winning_score": score}
    (folder / "evaluation.json").write_text(json.dumps({"model": "m", "judge": "j", "table": [row]}))
    pl.DataFrame({"sample_id": sample_ids}).write_parquet(folder / "decisions.parquet")
    return folder


def test_compare_tells_folders_of_one_name_apart_and_refuses_what_it_cannot_compare(tmp_path, capsys):
    """Two folders named `out` are told apart by their parents; a folder given twice, a path that
    does not exist and a run on other data are each named, all at once, exit 2."""
    from reflectune.cli import main

    a = _finished_run(tmp_path / "runs" / "a" / "out", "selective", ["s1", "s2"], 1.125)
    b = _finished_run(tmp_path / "runs" / "b" / "out", "cherry", ["s2", "s1"], 0.9)
    assert main(["compare", str(a), str(b)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("a/out (selective) ") and lines[2].startswith("b/out (cherry) ")

    other = _finished_run(tmp_path / "other", "selective", ["s1", "s3"], 1.0)
    missing = tmp_path / "nowhere"
    assert main(["compare", str(a), f"{a}/", str(missing), str(other)]) == 2
    captured = capsys.readouterr()
    assert not captured.out and "Traceback" not in captured.err
    assert f"{a}/: the same folder as {a}: give each run once" in captured.err
    assert f"{missing}: no such folder: check the path" in captured.err
    assert f"{other} ran on other data than {a}: 2 samples of data.jsonl against 2 of data.jsonl, 1 in common" \
        in captured.err


def test_recycles_summary_and_its_evaluation_table_go_to_stderr_together(capsys):
    """A command that writes files keeps stdout empty: recycle's summary and the evaluation's
    table both go to stderr (the rule in `reflectune --help`)."""
    from reflectune.cli import _summary, main

    row = {"baseline": "random", "test_set": "vicuna", "n": 2, "wins": 1, "ties": 1, "losses": 0,
           "winning_score": 1.5, "heldout_loss_model": None, "heldout_loss_baseline": None}
    manifest = {"student": "s", "counts": {"input_rows": 2, "valid_rows": 2, "rejected_rows": 0, "selected_rows": 1,
                                           "dropped_rows": 1},
                "training": {"trained": False, "reason": "training disabled"},
                "evaluation": {"evaluated": True, "baselines": {}, "model": "out/model", "judge": "j", "table": [row]}}
    _summary(manifest)
    captured = capsys.readouterr()
    assert not captured.out
    assert "2 input rows: 2 valid" in captured.err and "evaluation: out/model against each baseline" in captured.err
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "itssummarytostderrandnothingtostdout" in "".join(capsys.readouterr().out.split())


def test_the_max_new_tokens_help_says_what_an_api_engine_is_sent():
    from reflectune.config import RecycleParams, config_fields

    text = config_fields(RecycleParams)["teacher.max_new_tokens"].description
    assert "sent as the request's max_tokens" in text and "applies its own limit" not in text


def test_the_emulator_command_serves_until_ctrl_c():
    """`reflectune emulator` takes the emulator's own options and stops on Ctrl-C with 130."""
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    proc = subprocess.Popen([sys.executable, "-m", "reflectune.cli", "emulator", "--port", "0", "--rpm", "60"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = proc.stdout.readline()
        url = line.split(" at ", 1)[1].split(" ", 1)[0]
        assert url.startswith("http://127.0.0.1:") and url.endswith("/v1"), line
        with urllib.request.urlopen(url.removesuffix("/v1") + "/health", timeout=10) as answer:
            assert answer.status == 200
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            time.sleep(0.1)
