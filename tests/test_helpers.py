"""The pure helpers the slow tests rely on, checked alone: a provider's Retry-After, whether an
answer kept the form asked for, a request's token limit, and the re-recycling ledger."""

import json
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import pytest

from reflectune import formats, watch
from reflectune.engines.openai_compat import _follows, _retry_after
from reflectune.reflection import MIN_NEW_TOKENS, new_tokens


@pytest.mark.parametrize(("headers", "seconds"), [
    (None, None), ({}, None), ({"retry-after": "7"}, 7.0), ({"retry-after": "-3"}, 0.0),
    ({"retry-after-ms": "1500"}, 1.5), ({"retry-after-ms": "x", "retry-after": "2"}, 2.0),
    ({"retry-after": "soon"}, None),
])
def test_retry_after_in_seconds_or_milliseconds(headers, seconds):
    assert _retry_after(headers) == seconds


def test_retry_after_as_an_http_date():
    when = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=30), usegmt=True)
    assert 25 <= _retry_after({"retry-after": when}) <= 30
    past = format_datetime(datetime.now(timezone.utc) - timedelta(seconds=30), usegmt=True)
    assert _retry_after({"retry-after": past}) == 0.0


def test_an_answer_follows_the_form_it_was_asked_for():
    form = formats.teacher_format("res", 64)
    assert _follows("The answer is short.\n[Better Answer] A longer, complete answer. [End]", "regex", form)
    assert not _follows("no markers at all", "regex", form)
    assert not _follows("Short.\n[Better Answer] never closed", "regex", form)
    assert _follows(json.dumps({"analysis": "a", "better_answer": "b"}), "json", form)
    assert not _follows("[1, 2]", "json", form) and not _follows("not json", "json", form)


def test_a_requests_token_limit_is_the_references():
    assert new_tokens(100, 2048, None) == 2048  # no context known: what was asked
    assert new_tokens(100, 2048, 4096) == 2048
    assert new_tokens(3000, 2048, 4096) == 1096  # min(wanted, context - prompt)
    why = new_tokens(4090, 2048, 4096)
    assert isinstance(why, str) and "leaves 6 of the teacher's context of 4096" in why
    assert new_tokens(4096 - MIN_NEW_TOKENS, 2048, 4096) == MIN_NEW_TOKENS
    assert new_tokens(4090, 4, 4096) == 4  # a request that asks for little fits where it can


def test_the_ledger_takes_each_row_once(tmp_path):
    watched, root = tmp_path / "incoming", str(tmp_path / "root")
    watched.mkdir()
    rows = [{"instruction": f"Say {i}.", "input": "", "output": f"{i}."} for i in range(3)]
    (watched / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    first = watch.new_batch(str(watched), root)
    assert first is not None and len(first.keys) == 2 and first.seen_rows == 0
    assert watch.new_batch(str(watched), root).name == first.name  # not recorded yet: the same batch
    assert watch.record(root, first) == 2
    assert watch.new_batch(str(watched), root) is None  # nothing new
    (watched / "b.jsonl").write_text(json.dumps(rows[2]) + "\n" + json.dumps(rows[0]) + "\n")
    second = watch.new_batch(str(watched), root)
    assert len(second.keys) == 1 and second.seen_rows == 3 and second.name != first.name
    assert json.loads(open(second.input).read()) == rows[2]
    assert watch.record(root, second) == 3
