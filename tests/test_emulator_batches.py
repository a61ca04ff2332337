"""The emulator's batch protocols, driven by the providers' own SDKs: OpenAI's Files and Batches
API and Anthropic's Message Batches move through their states in time, answer each line as the
online endpoint answers the same request, expire, fail and cancel lines as the providers do,
refuse what the providers refuse, and count what was submitted and what was paid for."""

from __future__ import annotations

import json
import time
from typing import Any

import anthropic
import openai
import pytest

from reflectune import emulator as emulator_module
from reflectune.emulator import Emulator, answer_key, canonical

SCHEMA = {"type": "object", "properties": {"new_instruction": {"type": "string"},
                                           "score": {"type": "integer", "minimum": 1, "maximum": 5}},
          "required": ["new_instruction", "score"], "additionalProperties": False}
SYSTEM = "You improve answers. Write [Better Answer] then the answer."
OPENAI_END = ("completed", "expired", "cancelled")


def openai_body(i: int, kind: str = "text") -> dict[str, Any]:
    """An online chat request: free text, a JSON schema, or an answer cut off by its token limit."""
    body: dict[str, Any] = {"model": "gpt-teacher", "max_tokens": 400, "temperature": 0.7,
                            "messages": [{"role": "system", "content": SYSTEM},
                                         {"role": "user", "content": f"Question {i}: why is the sky blue?"}]}
    if kind == "schema":
        body["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": "rewrite", "schema": SCHEMA, "strict": True}}
    elif kind == "cut":
        body["max_tokens"] = 8
    return body


def anthropic_params(body: dict[str, Any]) -> dict[str, Any]:
    """The same request as Anthropic params: the system split out (as text blocks), a schema as a forced tool."""
    system, *messages = body["messages"]
    params: dict[str, Any] = {"model": "claude-teacher", "max_tokens": body["max_tokens"],
                              "temperature": body["temperature"], "messages": messages,
                              "system": [{"type": "text", "text": system["content"]}]}
    if "response_format" in body:
        params["tools"] = [{"name": "rewrite", "description": "The rewrite.", "input_schema": SCHEMA}]
        params["tool_choice"] = {"type": "tool", "name": "rewrite"}
    return params


KINDS = ("text", "schema", "cut")


def bodies(n: int) -> dict[str, dict[str, Any]]:
    return {f"req-{i}": openai_body(i, KINDS[i % 3]) for i in range(n)}


def jsonl(requests: dict[str, dict[str, Any]]) -> bytes:
    return "".join(json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions", "body": body})
                   + "\n" for cid, body in requests.items()).encode()


def oai(e: Emulator) -> openai.OpenAI:
    return openai.OpenAI(base_url=e.url, api_key="sk-test", max_retries=0)


def claude(e: Emulator) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=e.root, api_key="sk-ant-test", max_retries=0)


def start_openai(client: openai.OpenAI, requests: dict[str, dict[str, Any]]) -> Any:
    file = client.files.create(file=("requests.jsonl", jsonl(requests)), purpose="batch")
    return client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h")


def wait_openai(client: openai.OpenAI, batch_id: str, timeout: float = 8.0) -> tuple[Any, list[Any]]:
    """The batch once it has ended, and every state it was seen in on the way."""
    seen, deadline = [], time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        seen.append(batch)
        if batch.status in OPENAI_END:
            return batch, seen
        assert time.monotonic() < deadline, f"batch still {batch.status}"
        time.sleep(0.02)


def wait_anthropic(client: anthropic.Anthropic, batch_id: str, timeout: float = 8.0) -> tuple[Any, list[Any]]:
    seen, deadline = [], time.monotonic() + timeout
    while True:
        batch = client.messages.batches.retrieve(batch_id)
        seen.append(batch)
        if batch.processing_status == "ended":
            return batch, seen
        assert time.monotonic() < deadline, f"batch still {batch.processing_status}"
        time.sleep(0.02)


def lines(client: openai.OpenAI, file_id: str | None) -> dict[str, dict[str, Any]]:
    """A batch output or error file's lines by custom_id (none for no file)."""
    if file_id is None:
        return {}
    return {line["custom_id"]: line for line in map(json.loads, client.files.content(file_id).text.splitlines())}


def in_order(states: list[str], order: list[str]) -> bool:
    """Whether `states` runs through `order` forwards, never back."""
    ranks = [order.index(s) for s in states]
    return ranks == sorted(ranks)


def test_the_canonical_form_is_the_same_whichever_protocol_asks():
    body = openai_body(1, "schema") | {"seed": 7, "stream": False}
    params = anthropic_params(body)
    assert canonical(body) == canonical(params, "anthropic")
    assert canonical(body)["messages"][0] == {"role": "system", "content": SYSTEM}
    assert canonical(body)["schema"] == SCHEMA
    # the model, seed and stream flag decide nothing; temperature does, and its absence means 1.0
    assert answer_key(canonical(body | {"model": "other", "seed": 8})) == answer_key(canonical(body))
    assert answer_key(canonical(body | {"temperature": 0.2})) != answer_key(canonical(body))
    assert canonical({k: v for k, v in body.items() if k != "temperature"})["temperature"] == 1.0
    assert canonical(body | {"max_completion_tokens": 9})["max_tokens"] == 9
    with pytest.raises(ValueError, match="not in tools"):
        canonical(params | {"tool_choice": {"type": "tool", "name": "missing"}}, "anthropic")


def test_an_openai_batch_moves_through_its_states_and_answers_as_the_online_endpoint():
    requests = bodies(12)
    with Emulator(latency=0.0, batch_seconds=1.0) as e:
        client = oai(e)
        created = start_openai(client, requests)
        assert created.status == "validating" and created.request_counts.total == 12
        assert created.output_file_id is None and created.id.startswith("batch_")
        batch, seen = wait_openai(client, created.id)
        states = [b.status for b in seen]
        assert in_order(states, ["validating", "in_progress", "finalizing", "completed"]), states
        assert "in_progress" in states and states[-1] == "completed"
        done = [b.request_counts.completed for b in seen]
        assert done == sorted(done) and any(0 < n < 12 for n in done), done
        assert (batch.request_counts.completed, batch.request_counts.failed) == (12, 0)
        assert batch.error_file_id is None and batch.completed_at and batch.in_progress_at

        output = lines(client, batch.output_file_id)
        assert set(output) == set(requests)
        for cid, body in requests.items():
            line = output[cid]
            assert line["id"].startswith("batch_req_") and line["error"] is None
            assert line["response"]["status_code"] == 200
            # the same request online (another model and a seed change nothing) gets the same completion
            online = client.chat.completions.with_raw_response.create(
                **body | {"model": "gpt-other", "seed": 3}).http_response.json()
            answered = line["response"]["body"]
            assert answered["choices"] == online["choices"] and answered["usage"] == online["usage"]
            assert answered["id"] == online["id"] and answered["model"] == body["model"]
        finishes = {output[cid]["response"]["body"]["choices"][0]["finish_reason"] for cid in requests}
        assert finishes == {"stop", "length"}
        stats = e.snapshot()
        assert (stats["answered"], stats["distinct"], stats["duplicates"]) == (24, 12, 12)
        assert stats["batches"] == {"openai": 1} and stats["batch_lines"] == stats["batch_lines_distinct"] == 12
        assert stats["statuses"] == {"200": 12}  # the online answers alone: batch calls are not rate limited


def test_an_anthropic_batch_gets_the_same_answers_with_the_system_split_out_and_the_schema_as_a_tool():
    requests = bodies(9)
    with Emulator(latency=0.0, batch_seconds=1.0) as e:
        ac, client = claude(e), oai(e)
        created = ac.messages.batches.create(requests=[{"custom_id": cid, "params": anthropic_params(body)}
                                                       for cid, body in requests.items()])
        assert created.id.startswith("msgbatch_") and created.processing_status == "in_progress"
        assert created.request_counts.processing == 9 and created.results_url is None
        batch, seen = wait_anthropic(ac, created.id)
        processing = [b.request_counts.processing for b in seen]
        assert processing == sorted(processing, reverse=True) and any(0 < n < 9 for n in processing), processing
        assert batch.request_counts.succeeded == 9 and batch.ended_at is not None
        assert batch.results_url == f"{e.root}/v1/messages/batches/{batch.id}/results"

        results = {r.custom_id: r.result for r in ac.messages.batches.results(batch.id)}
        assert set(results) == set(requests)
        for cid, body in requests.items():
            online = client.chat.completions.create(**body)
            text, usage = online.choices[0].message.content, online.usage
            result = results[cid]
            assert result.type == "succeeded" and result.message.model == "claude-teacher"
            [block] = result.message.content
            if "response_format" in body:
                assert block.type == "tool_use" and block.name == "rewrite" and block.id.startswith("toolu_")
                assert block.input == json.loads(text) and result.message.stop_reason == "tool_use"
            elif body["max_tokens"] == 8:
                assert block.text == text and result.message.stop_reason == "max_tokens"
            else:
                assert block.text == text and "[Better Answer]" in text and result.message.stop_reason == "end_turn"
            assert (result.message.usage.input_tokens, result.message.usage.output_tokens) == (
                usage.prompt_tokens, usage.completion_tokens)
        stats = e.snapshot()
        assert (stats["answered"], stats["distinct"]) == (18, 9)
        assert stats["batches"] == {"anthropic": 1} and stats["batch_lines"] == 9


def test_expired_lines_go_to_the_error_file_and_are_not_paid_for():
    requests = bodies(20)
    with Emulator(latency=0.0, batch_seconds=0.6, expire_rate=0.3, seed=3) as e:
        client, ac = oai(e), claude(e)
        batch, _ = wait_openai(client, start_openai(client, requests).id)
        assert batch.status == "expired" and batch.expired_at is not None and batch.completed_at is None
        output, errors = lines(client, batch.output_file_id), lines(client, batch.error_file_id)
        assert 0 < len(errors) < 20 and set(output) | set(errors) == set(requests) and not set(output) & set(errors)
        assert all(line["response"] is None and line["error"]["code"] == "batch_expired" for line in errors.values())
        assert batch.request_counts.completed == len(output) and batch.request_counts.total == 20
        stats = e.snapshot()
        assert stats["batch_lines_expired"] == len(errors) and stats["answered"] == len(output)
        assert stats["prompt_tokens"] == sum(line["response"]["body"]["usage"]["prompt_tokens"]
                                             for line in output.values())

        mb = ac.messages.batches.create(requests=[{"custom_id": cid, "params": anthropic_params(body)}
                                                  for cid, body in requests.items()])
        mb, _ = wait_anthropic(ac, mb.id)
        results = [r.result.type for r in ac.messages.batches.results(mb.id)]
        assert 0 < mb.request_counts.expired == results.count("expired")
        assert mb.request_counts.succeeded == results.count("succeeded") == 20 - mb.request_counts.expired
        stats = e.snapshot()
        assert stats["batch_lines_expired"] == len(errors) + mb.request_counts.expired
        assert stats["answered"] == len(output) + mb.request_counts.succeeded


def test_failed_and_refused_lines_are_answered_with_their_errors():
    requests = bodies(12)
    requests["bad"] = openai_body(99) | {"structured_outputs": {"json": SCHEMA}}  # vLLM's field: OpenAI refuses it
    with Emulator(latency=0.0, batch_seconds=0.6, batch_error_rate=0.3, seed=5) as e:
        client, ac = oai(e), claude(e)
        batch, _ = wait_openai(client, start_openai(client, requests).id)
        assert batch.status == "completed"
        output, errors = lines(client, batch.output_file_id), lines(client, batch.error_file_id)
        codes = {cid: line["response"]["status_code"] for cid, line in errors.items()}
        assert codes.pop("bad") == 400 and "structured_outputs" in errors["bad"]["response"]["body"]["error"]["message"]
        assert codes and set(codes.values()) == {500}
        assert batch.request_counts.failed == len(errors)
        assert batch.request_counts.completed == len(output) == 12 - len(codes)
        assert e.snapshot()["batch_lines_failed"] == len(errors) and e.snapshot()["answered"] == len(output)

        params = [{"custom_id": cid, "params": anthropic_params(body)} for cid, body in bodies(12).items()]
        params.append({"custom_id": "bad", "params": anthropic_params(openai_body(99)) | {"response_format": {}}})
        mb, _ = wait_anthropic(ac, ac.messages.batches.create(requests=params).id)
        errored = {r.custom_id: r.result.error.error for r in ac.messages.batches.results(mb.id)
                   if r.result.type == "errored"}
        assert errored.pop("bad").type == "invalid_request_error"
        assert errored and {error.type for error in errored.values()} == {"api_error"}
        assert mb.request_counts.errored == len(errored) + 1


def test_a_cancel_keeps_what_finished_and_cancels_the_rest():
    requests = bodies(16)
    with Emulator(latency=0.0, batch_seconds=1.0) as e:
        client, ac = oai(e), claude(e)
        created = start_openai(client, requests)
        time.sleep(0.5)
        cancelled = client.batches.cancel(created.id)
        asked = time.monotonic()
        assert cancelled.status == "cancelling" and cancelled.cancelling_at is not None
        batch, seen = wait_openai(client, created.id)
        assert batch.status == "cancelled" and time.monotonic() - asked < 0.5
        assert {b.status for b in seen} <= {"cancelling", "cancelled"}
        output, errors = lines(client, batch.output_file_id), lines(client, batch.error_file_id)
        assert 0 < len(output) < 16 and set(output) | set(errors) == set(requests)
        assert {line["error"]["code"] for line in errors.values()} == {"batch_cancelled"}
        assert batch.request_counts.completed == len(output)
        stats = e.snapshot()
        assert stats["answered"] == len(output) and stats["batch_lines_cancelled"] == len(errors)
        with pytest.raises(openai.ConflictError):
            client.batches.cancel(created.id)

        mb = ac.messages.batches.create(requests=[{"custom_id": cid, "params": anthropic_params(body)}
                                                  for cid, body in requests.items()])
        time.sleep(0.5)
        canceling = ac.messages.batches.cancel(mb.id)
        assert canceling.processing_status == "canceling" and canceling.cancel_initiated_at is not None
        mb, _ = wait_anthropic(ac, mb.id)
        counts = mb.request_counts
        assert 0 < counts.canceled < 16 and counts.succeeded + counts.canceled == 16
        results = [r.result.type for r in ac.messages.batches.results(mb.id)]
        assert results.count("canceled") == counts.canceled and results.count("succeeded") == counts.succeeded
        with pytest.raises(anthropic.BadRequestError):
            ac.messages.batches.cancel(mb.id)


def test_the_providers_limits_are_refused_with_their_errors():
    small = bodies(3)
    with Emulator(latency=0.0, batch_seconds=0.5, max_batch_requests=3, max_batch_bytes=4000) as e:
        client, ac = oai(e), claude(e)
        assert start_openai(client, small).status == "validating"  # within the limits
        upload = lambda data: client.files.create(file=("requests.jsonl", data), purpose="batch")
        refused = {
            "over the batch limit of 3": jsonl(bodies(4)),
            "bytes, over the batch limit": jsonl({cid: body | {"messages": [{"role": "user", "content": "x" * 1500}]}
                                                  for cid, body in small.items()}),
            "Line 4 is not valid JSON": jsonl(small) + b"{not json\n",
            "Line 1 lacks body": jsonl(small).replace(b'"body"', b'"bodie"', 1),
            "'req-0' is not unique": jsonl(small) + jsonl({"req-0": small["req-0"]})[:-1],
        }
        for why, data in refused.items():
            with pytest.raises(openai.BadRequestError, match=why):
                upload(data)
        file = upload(jsonl(small))
        with pytest.raises(openai.BadRequestError, match="endpoint"):
            client.batches.create(input_file_id=file.id, endpoint="/v1/embeddings", completion_window="24h")
        with pytest.raises(openai.NotFoundError):
            client.batches.create(input_file_id="file-missing", endpoint="/v1/chat/completions",
                                  completion_window="24h")

        request = lambda cid, body=small["req-0"]: {"custom_id": cid, "params": anthropic_params(body)}
        assert ac.messages.batches.create(requests=[request("a"), request("b")]).processing_status == "in_progress"
        for why, requests in {"the limit is 3": [request(c) for c in "abcd"], "used twice": [request("a")] * 2,
                              "'has space' does not match": [request("has space")],
                              "'x{65}' does not match": [request("x" * 65)]}.items():
            with pytest.raises(anthropic.BadRequestError, match=why):
                ac.messages.batches.create(requests=requests)
        with pytest.raises(anthropic.APIStatusError) as large:
            ac.messages.batches.create(requests=[request("big", small["req-0"] | {
                "messages": [{"role": "user", "content": "x" * 5000}]})])
        assert large.value.status_code == 413
        assert e.snapshot()["batches"] == {"openai": 1, "anthropic": 1}


def test_lists_run_newest_first_and_the_stats_count_batches_and_lines():
    with Emulator(latency=0.0, batch_seconds=0.5) as e:
        client, ac = oai(e), claude(e)
        made = [start_openai(client, bodies(n)).id for n in (2, 3, 4)]  # req-0 and req-1 three times
        page = client.batches.list(limit=2)
        assert [b.id for b in page.data] == made[:0:-1] and page.has_more
        assert [b.id for b in client.batches.list(limit=2)] == made[::-1]  # the SDK pages on through `after`
        sent = [ac.messages.batches.create(requests=[{"custom_id": cid, "params": anthropic_params(body)}
                                                     for cid, body in bodies(n).items()]).id for n in (1, 2)]
        first = ac.messages.batches.list(limit=1)
        assert [b.id for b in first.data] == [sent[1]] and first.has_more and first.last_id == sent[1]
        assert [b.id for b in ac.messages.batches.list(limit=1)] == sent[::-1]
        stats = e.snapshot()
        assert stats["batches"] == {"openai": 3, "anthropic": 2}
        # Anthropic's req-0 is the same request as OpenAI's req-0: one key
        assert (stats["batch_lines"], stats["batch_lines_distinct"]) == (12, 4)
        e.reset_stats()
        stats = e.snapshot()
        assert stats["batches"] == {} and stats["batch_lines"] == 0 and stats["answered"] == 0
        assert client.batches.retrieve(made[0]).id == made[0]  # the batches themselves stay


def test_batch_lines_are_not_rate_limited():
    requests = bodies(10)
    with Emulator(latency=0.0, rpm=2, window=60.0, batch_seconds=0.5) as e:
        client = oai(e)
        batch, _ = wait_openai(client, start_openai(client, requests).id)
        assert batch.status == "completed" and batch.request_counts.completed == 10
        client.chat.completions.create(**requests["req-0"])
        client.chat.completions.create(**requests["req-1"])
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(**requests["req-2"])
        assert e.snapshot()["answered"] == 12


def test_the_command_line_sets_the_batch_options(monkeypatch):
    made: dict[str, Any] = {}

    class Started(Exception):
        pass

    def emulator(**kwargs: Any) -> None:
        made.update(kwargs)
        raise Started

    monkeypatch.setattr(emulator_module, "Emulator", emulator)
    with pytest.raises(Started):
        emulator_module.main(["--port", "0", "--batch-seconds", "2.5", "--expire-rate", "0.1",
                              "--batch-error-rate", "0.2"])
    assert (made["batch_seconds"], made["expire_rate"], made["batch_error_rate"]) == (2.5, 0.1, 0.2)
