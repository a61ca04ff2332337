"""A run's record: the manifest, written last (its presence means the run finished), and the
one summary rendered from it, which the command line, the demo, the Prefect summary artifact
and the report all show."""

from __future__ import annotations

import os
from typing import Any

from reflectune import prompts
from reflectune.config import RecycleParams
from reflectune.engines.batch_api import TALLY
from reflectune.journal import Spend, dollars


def build(params: RecycleParams, results: list[dict[str, Any]], counts: dict[str, Any], training: dict[str, Any],
          evaluation: dict[str, Any], *, teacher: str | None, student: str, scorer: str, engine_loads: int,
          engine_load_seconds: float, seconds: float, journal: Spend | None = None) -> dict[str, Any]:
    """The manifest of a finished run from its shard results and the whole-run stages' outputs;
    `journal`: what the run's request journal holds (everything paid for in this folder)."""
    teacher_results = [r for r in results if r["stage"] == "teacher"]
    student_results = [r for r in results if r["stage"] == "student"]
    return {
        "status": "complete",
        "parameters": params.model_dump(mode="json"),
        "method": params.selection.method,
        "teacher": teacher,
        "student": student,
        "scorer": scorer,
        "prompt_versions": [prompts.INSTRUCTION_VERSION, prompts.RESPONSE_VERSION],
        "counts": counts,
        "token_usage": _sum(teacher_results, ("generations", "prompt_tokens", "completion_tokens")),
        "teacher_spend": teacher_spend(params, teacher_results, journal or Spend()),
        # identical sequences (copies of an original) are scored once
        "scoring": _sum(student_results, ("sequences", "sequences_scored")),
        "shards": len(student_results),
        "shard_results": sorted(results, key=lambda r: (r["shard"], r["stage"])),
        "training": training,
        "evaluation": evaluation,
        # local mode: engine loads in this process (cluster workers load their own)
        "engine_loads": engine_loads,
        "engine_load_seconds": round(engine_load_seconds, 2),
        "seconds": round(seconds, 2),
    }


SPEND_KEYS = ("requests_sent", "requests_answered", "sent_prompt_tokens", "sent_completion_tokens", "requests_replayed",
              "replayed_prompt_tokens", "replayed_completion_tokens", "http_requests", "rate_limited")


def teacher_spend(params: RecycleParams, teacher_results: list[dict[str, Any]], journal: Spend) -> dict[str, Any]:
    """What the teacher cost: requests and tokens this run sent and replayed from the journal
    (shards finished by an earlier run count in neither), what the journal holds, and their
    cost at the user's prices (a batch API's: the batch prices); the budget in force; a batch
    API's batches and lines."""
    t = params.teacher
    this = _sum([r for r in teacher_results if not r.get("reused")], SPEND_KEYS + (TALLY if t.batched else ()))
    price_in, price_out = t.prices
    usd = lambda p, c: round((p * price_in + c * price_out) / 1e6, 6)  # a small run's cost is under a cent
    return {
        **this,
        "sent_usd": usd(this["sent_prompt_tokens"], this["sent_completion_tokens"]),
        "replayed_usd": usd(this["replayed_prompt_tokens"], this["replayed_completion_tokens"]),
        "journal": {"requests": journal.requests, "prompt_tokens": journal.prompt_tokens,
                    "completion_tokens": journal.completion_tokens,
                    "usd": usd(journal.prompt_tokens, journal.completion_tokens)},
        "price_input_per_m": price_in, "price_output_per_m": price_out,
        "priced_as": "batch" if t.batched else "online",
        "budget_tokens": t.budget_tokens, "budget_usd": t.budget_usd,
    }


def _sum(results: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[str, int]:
    return {k: sum(r["detail"].get(k, 0) for r in results) for k in keys}


def lines(manifest: dict[str, Any]) -> list[str]:
    """The run in a few plain lines: what ran, what came in and out, and why. Names (the
    method, the models) stand in `backticks`: code in the markdown and the report, bare in
    `text`."""
    c = manifest["counts"]
    params = manifest.get("parameters", {})
    selection = params.get("selection", {})
    method = f"`{manifest.get('method') or selection.get('method', 'selective')}`"
    if method == "`selective`":
        method += f" ({selection.get('mode', 'released')} rule)"
    scorer = manifest.get("scorer")
    who = f"teacher `{manifest.get('teacher') or 'none'}`, student `{manifest['student']}`"
    if scorer and scorer != manifest["student"]:
        who += f", scorer `{scorer}`"
    out = [
        f"Method {method}: {who}; {params.get('dataset', '')} -> {params.get('output', '')} in "
        f"{manifest.get('seconds', 0):.0f} s",
        f"{c['input_rows']} input rows: {c['valid_rows']} valid, {c['rejected_rows']} rejected "
        f"({c.get('duplicate_rows', 0)} duplicates); {c['selected_rows']} selected, {c['dropped_rows']} dropped",
        "branches: " + (", ".join(f"{k} {v}" for k, v in c.get("per_branch", {}).items()) or "none"),
    ]
    per_variant = c.get("per_variant", {})
    rewrites = {v: n for v, n in sorted(per_variant.items()) if v != "orig"}
    out.append(f"selected: {per_variant.get('orig', 0)} originals, {sum(rewrites.values())} rewrites"
               + (f" ({', '.join(f'{v} {n}' for v, n in rewrites.items())})" if rewrites else ""))
    usage = manifest.get("token_usage", {})
    if manifest.get("teacher"):
        out.append(f"teacher: {usage.get('generations', 0)} generations, {usage.get('prompt_tokens', 0)} prompt "
                   f"tokens, {usage.get('completion_tokens', 0)} completion tokens")
        spend = manifest.get("teacher_spend")
        if spend:
            out.append(spend_line(spend))
    out += usable_lines(c.get("parse_status", {}), sum(rewrites.values()), c["selected_rows"],
                        c.get("selected_rewrites_usable"))
    t = manifest.get("training", {})
    out.append(f"training: {t['rows']} rows, {t['steps']} steps, loss {t['first_loss']:.3f} -> {t['last_loss']:.3f}"
               + (f", by epoch {' -> '.join(f'{x:.3f}' for x in t['epoch_losses'])}" if t.get("epoch_losses") else "")
               if t.get("trained") else f"training: {t.get('reason', 'not run')}")
    ev = manifest.get("evaluation", {})
    if ev.get("evaluated"):
        out += [f"{k} baseline: {b['rows']} original pairs, training loss by epoch "
                f"{' -> '.join(f'{x:.3f}' for x in b['training'].get('epoch_losses', []))}"
                for k, b in ev.get("baselines", {}).items()]
        out += [f"evaluation against the {r['baseline']} baseline on {r['test_set']}: {r['wins']} wins, {r['ties']} "
                f"ties, {r['losses']} losses, winning score {r['winning_score']:.3f}" for r in ev.get("table", [])]
    else:
        out.append(f"evaluation: {ev.get('reason', 'not run')}")
    if manifest.get("report"):
        out.append(f"report: {manifest['report']}")
    return out


def usable_lines(parse_status: dict[str, dict[str, int]], rewrites: int, selected: int,
                 selected_usable: int | None) -> list[str]:
    """What the teacher's rewrites were worth, per variant: usable (its parse status ok, every
    content check passed) or fallen back to the original with each reason; then the usable rate
    of everything generated and the rewrites' share of the selection. Nothing where no teacher
    ran."""
    if not parse_status:
        return []
    out = []
    for variant, statuses in parse_status.items():
        total = sum(statuses.values()) or 1
        usable = statuses.get("ok", 0)
        reasons = ", ".join(f"{s} {n}" for s, n in statuses.items() if s != "ok")
        out.append(f"teacher rewrites, {variant}: usable {usable}/{total} ({usable / total:.0%})"
                   + (f"; fell back to the original: {reasons}" if reasons else ""))
    generated = sum(sum(s.values()) for s in parse_status.values()) or 1
    usable = sum(s.get("ok", 0) for s in parse_status.values())
    share = f"{rewrites / selected:.0%}" if selected else "none"
    checked = f", {selected_usable} of them usable" if selected_usable is not None else ""
    out.append(f"usable rewrites: {usable}/{generated} generated ({usable / generated:.0%}); the selection is "
               f"{share} rewrites ({rewrites} of {selected}{checked})")
    return out


def spend_line(spend: dict[str, Any]) -> str:
    """What the teacher cost, in one line: sent and replayed by this run, held by the journal."""
    j = spend["journal"]
    priced = spend["price_input_per_m"] or spend["price_output_per_m"]
    cost = lambda usd: f" (${dollars(usd)})" if priced else ""
    limits = [f"{spend['budget_tokens']:,} tokens" if spend.get("budget_tokens") else "",
              f"${dollars(spend['budget_usd'])}" if spend.get("budget_usd") else ""]
    budget = " and ".join(x for x in limits if x)
    batches = ""
    if spend.get("priced_as") == "batch":
        batches = (f" in {spend.get('batches_created', 0):,} batches ({spend.get('batch_lines', 0):,} lines, "
                   f"{spend.get('batch_lines_resubmitted', 0):,} submitted again; "
                   f"{spend.get('batches_reattached', 0):,} batches waited for from an earlier run), at the batch price")
    # a request the provider refused (400) or that failed was sent and not answered; older manifests lack the count
    answered = spend.get("requests_answered", spend["requests_sent"])
    refused = (f" ({answered:,} answered, {spend['requests_sent'] - answered:,} refused or failed)"
               if answered != spend["requests_sent"] else "")
    return (f"teacher requests: {spend['requests_sent']:,} sent{refused}{batches}, "
            f"{spend['sent_prompt_tokens'] + spend['sent_completion_tokens']:,} tokens{cost(spend['sent_usd'])}; "
            f"{spend['requests_replayed']:,} replayed from the journal, "
            f"{spend['replayed_prompt_tokens'] + spend['replayed_completion_tokens']:,} tokens"
            f"{cost(spend['replayed_usd'])} not paid again; {spend.get('rate_limited', 0):,} answered 429; "
            f"the journal holds {j['requests']:,} requests, {j['prompt_tokens'] + j['completion_tokens']:,} tokens"
            f"{cost(j['usd'])}" + (f", budget {budget}" if budget else ""))


def text(manifest: dict[str, Any]) -> str:
    return "\n".join(lines(manifest)).replace("`", "")


def markdown(manifest: dict[str, Any]) -> str:
    """The summary as the Prefect UI shows it: a list, the report a link."""
    body = [f"- {line}" for line in lines(manifest) if not line.startswith("report: ")]
    report = manifest.get("report")
    if report:
        link = report if "://" in report else "file://" + os.path.abspath(report)
        body.append(f"- report: [{report}]({link})")
    return f"# Reflectune recycle: {manifest.get('parameters', {}).get('dataset', '')}\n\n" + "\n".join(body) + "\n"
