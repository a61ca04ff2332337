"""How a GPU flow run's stop reaches the recycle run that launched it: an error no retry mends
is written to the run folder as its type and message, and read back as that error; a
passing failure writes nothing, and a new try clears an earlier try's stop."""

import pytest

from reflectune.config import RecycleParams
from reflectune.errors import BudgetExceededError, InputFileError, ReflectuneError, ShardFailedError
from reflectune.flows.cluster import batch_run_name, recorded_stop, recording_stops, step_run_name
from reflectune.run_folder import RunFolder


def test_a_budget_stop_reaches_the_launching_run_as_its_own_type(tmp_path):
    params = RecycleParams(output=str(tmp_path / "out"))
    name = batch_run_name("teacher", [{"index": 3, "uri": "x", "rows": 2, "content": "c"}])
    assert name == "teacher-part-00003" and step_run_name("baseline", "random") == "baseline-random"
    message = "the teacher budget would be passed by the next request: spent 10 tokens"
    with pytest.raises(BudgetExceededError):
        with recording_stops(params, name):
            raise BudgetExceededError(message)
    stopped = recorded_stop(params, name)
    assert type(stopped) is BudgetExceededError and str(stopped) == message
    assert recorded_stop(params, "student-part-00003") is None

    # the next try clears it; a failure a retry may mend records nothing
    with pytest.raises(ShardFailedError):
        with recording_stops(params, name):
            raise ShardFailedError("the endpoint did not answer", retryable=True)
    assert recorded_stop(params, name) is None


def test_an_input_error_keeps_its_type_and_an_unknown_one_is_a_plain_reflectune_error(tmp_path):
    from reflectune import io

    params = RecycleParams(output=str(tmp_path / "out"))
    with pytest.raises(InputFileError):
        with recording_stops(params, "evaluate"):
            raise InputFileError("tests.jsonl: item 1: no instruction")
    assert type(recorded_stop(params, "evaluate")) is InputFileError
    io.write_json({"error": "SystemExit", "message": "m"}, RunFolder(params.output).stop("train"))
    assert type(recorded_stop(params, "train")) is ReflectuneError
