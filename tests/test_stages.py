"""The stages' bookkeeping: a run that starts writing takes back what said an earlier run had
finished in its folder."""

from reflectune import run_folder, stages
from reflectune.config import RecycleParams

from .conftest import SAMPLE


def test_a_run_that_starts_writing_takes_back_the_finished_marks(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for name in run_folder.FINISHED:
        (out / name).write_text("an earlier run's")
    (out / "selected.jsonl").write_text("kept until the new run writes it\n")
    summary = stages.shard_dataset(RecycleParams(dataset=str(SAMPLE), output=str(out), limit=4, shard_size=2))
    assert len(summary["shards"]) == 2
    assert not [name for name in run_folder.FINISHED if (out / name).exists()]
    assert (out / "selected.jsonl").exists()


def test_the_teacher_token_limit_has_one_default():
    import inspect

    from reflectune import plan
    from reflectune.config import TeacherConfig
    from reflectune.reflection import MAX_NEW_TOKENS, Sampling

    defaults = {Sampling().max_new_tokens, TeacherConfig().max_new_tokens,
                inspect.signature(plan.plan).parameters["max_new_tokens"].default}
    assert defaults == {MAX_NEW_TOKENS} == {2048}
