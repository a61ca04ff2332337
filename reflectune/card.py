"""The dataset card: a run's output folder as a dataset others can load and cite.

`README.md` in the Hugging Face card format: YAML metadata whose `configs` point the
`datasets` library at the run's tables (`load_dataset(DIR)` loads `selected.parquet`; the
`decisions` and `rejected` configs the others), then what a reader needs to trust the data:
source and license, method, models with their identities and prompt versions, counts, parse
rates, score distributions, the evaluation, and how to cite the methods. Every figure is read
from the manifest and the decisions table, so the card and the manifest cannot disagree.
"""

from __future__ import annotations

import math
import os
from typing import Any

import polars as pl

from reflectune import run_folder
from reflectune.records import PARSE_STATUSES, VARIANTS

METHOD_NAMES = {
    "selective": "Selective Reflection-Tuning",
    "reflection": "Reflection-Tuning",
    "cherry": "Cherry LLM (IFD selection)",
    "superfilter": "Superfiltering",
}
CITATIONS = {
    "selective": """@inproceedings{li2024selective,
  title     = {Selective Reflection-Tuning: Student-Selected Data Recycling for {LLM} Instruction-Tuning},
  author    = {Li, Ming and Chen, Lichang and Chen, Jiuhai and He, Shwai and Gu, Jiuxiang and Zhou, Tianyi},
  booktitle = {Findings of the Association for Computational Linguistics: ACL 2024},
  year      = {2024},
  note      = {arXiv:2402.10110}
}""",
    "reflection": """@article{li2023reflection,
  title   = {Reflection-Tuning: Data Recycling Improves {LLM} Instruction-Tuning},
  author  = {Li, Ming and Chen, Lichang and Chen, Jiuhai and He, Shwai and Huang, Heng and Gu, Jiuxiang and Zhou, Tianyi},
  journal = {arXiv preprint arXiv:2310.11716},
  year    = {2023}
}""",
    "cherry": """@inproceedings{li2024quantity,
  title     = {From Quantity to Quality: Boosting {LLM} Performance with Self-Guided Data Selection for Instruction Tuning},
  author    = {Li, Ming and Zhang, Yong and Li, Zhitao and Chen, Jiuhai and Chen, Lichang and Cheng, Ning and Wang, Jianzong and Zhou, Tianyi and Xiao, Jing},
  booktitle = {Proceedings of NAACL 2024},
  year      = {2024},
  note      = {arXiv:2308.12032}
}""",
    "superfilter": """@inproceedings{li2024superfiltering,
  title     = {Superfiltering: Weak-to-Strong Data Filtering for Fast Instruction-Tuning},
  author    = {Li, Ming and Zhang, Yong and He, Shwai and Li, Zhitao and Zhao, Hongyi and Wang, Jianzong and Cheng, Ning and Zhou, Tianyi},
  booktitle = {Proceedings of ACL 2024},
  year      = {2024},
  note      = {arXiv:2402.00530}
}""",
}
# the papers a method rests on: IFD (Cherry LLM) is part of every method here but reflection
CITE = {"selective": ("selective", "cherry"), "reflection": ("reflection",), "cherry": ("cherry",),
        "superfilter": ("superfilter", "cherry")}
CONFIGS = (("default", run_folder.SELECTED), ("decisions", run_folder.DECISIONS), ("rejected", run_folder.REJECTED))


def render(manifest: dict[str, Any], decisions: pl.DataFrame) -> str:
    params = manifest["parameters"]
    sel = params["selection"]
    method = sel.get("method", "selective")
    license_ = params.get("license")
    c = manifest["counts"]
    yaml = ["---"]
    if license_:
        yaml.append(f"license: {license_}")
    yaml += ["task_categories:", "- text-generation", "tags:", "- instruction-tuning", "- reflectune",
             f"- {method}", "size_categories:", f"- {_size(c['selected_rows'])}", "configs:"]
    for name, path in CONFIGS:
        yaml += [f"- config_name: {name}", "  data_files:", "  - split: train", f"    path: {path}"]
    yaml.append("---")

    teacher = manifest.get("teacher")
    models = [f"- Student: `{manifest['student']}` (template `{params['student']['template']}`)"]
    if manifest.get("scorer") and manifest.get("scorer") != manifest["student"]:
        models.append(f"- Scorer: `{manifest['scorer']}` (scores the pairs in the student's place)")
    if teacher:
        models.append(f"- Teacher: `{teacher}`, prompts {', '.join(f'`{v}`' for v in manifest['prompt_versions'])}")
    else:
        models.append("- Teacher: none (this method scores the original pairs only)")
    branches = ", ".join(f"{k} {v}" for k, v in c.get("per_branch", {}).items()) or "none"
    body = [
        f"# {METHOD_NAMES[method]} of `{params['dataset']}`",
        "",
        f"Instruction data selected{' and recycled' if teacher else ''} by Reflectune with **{METHOD_NAMES[method]}** "
        f"(`selection.method: {method}`" + (f", rule `{sel['mode']}`" if method == "selective" else "")
        + (f", budget {_budget(manifest)}" if _budget(manifest) else "") + ").",
        "",
        "## Source and license",
        "",
        f"- Source dataset: `{params['dataset']}`" + (f" (first {params['limit']} rows)" if params.get("limit") else ""),
        f"- License: {f'`{license_}`' if license_ else 'the same as the source dataset (no --license was given)'}. "
        "Rewritten pairs are also subject to the terms of the teacher model's outputs.",
        "",
        "## Models",
        "",
        *models,
        "",
        "## Counts",
        "",
        "| input | valid | rejected (duplicates) | selected | dropped |",
        "|---|---|---|---|---|",
        f"| {c['input_rows']} | {c['valid_rows']} | {c['rejected_rows']} ({c['duplicate_rows']}) | "
        f"{c['selected_rows']} | {c['dropped_rows']} |",
        "",
        f"Branches: {branches}. Selected variants: "
        + (", ".join(f"{k} {v}" for k, v in sorted(c.get("per_variant", {}).items())) or "none") + ".",
        "",
        *_parse_rates(c.get("parse_status", {})),
        "## Scores",
        "",
        "IFD and r-IFD of the student (METHOD: PPL ratios; a kept pair has both below 1): median and 10th-90th "
        "percentiles over the samples with a score.",
        "",
        "| variant | n | IFD median [p10, p90] | r-IFD median [p10, p90] |",
        "|---|---|---|---|",
        *_score_rows(decisions),
        "",
        *_evaluation(manifest.get("evaluation") or {}),
        "## Files",
        "",
        "`selected.parquet` (and `selected.jsonl`, Alpaca format) is the data; `decisions.parquet` holds every "
        "sample's variants, scores, branch and reason; `rejected.parquet` the input rows that were not valid; "
        "`manifest.json` the parameters and figures of the run; `report.html` the plots.",
        "",
        "```python",
        "from datasets import load_dataset",
        'data = load_dataset("path/to/this/folder")  # the selected pairs; "decisions", "rejected" as configs',
        "```",
        "",
        "## Citation",
        "",
        "```bibtex",
        "\n\n".join(CITATIONS[k] for k in CITE[method]),
        "```",
        "",
    ]
    return "\n".join(yaml + [""] + body)


def _size(n: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < limit:
            return name
    return "1M<n<10M"


def _budget(manifest: dict[str, Any]) -> str:
    from reflectune.config import SelectionConfig

    budget = SelectionConfig(**manifest["parameters"]["selection"]).fraction  # the budget in force
    return f"top {budget:.0%} by IFD" if budget else ""


def _parse_rates(parse_status: dict[str, dict[str, int]]) -> list[str]:
    """The run's parse-status counts per variant (none where no teacher ran) as rates."""
    lines = [f"| {variant} | " + " | ".join(f"{counts.get(s, 0) / sum(counts.values()):.0%}" for s in PARSE_STATUSES)
             + " |" for variant, counts in parse_status.items()]
    if not lines:
        return []
    return ["## Teacher rewrites", "", "Usable (`ok`: every field parsed and passed the content checks) or fallen "
            "back to the original pair, by reason (docs/method.md, *Parsing*): only usable rewrites can be selected.",
            "", f"| variant | {' | '.join(PARSE_STATUSES)} |", "|---" * (len(PARSE_STATUSES) + 1) + "|", *lines, ""]


def _score_rows(decisions: pl.DataFrame) -> list[str]:
    rows = []
    for variant in VARIANTS:
        cells = []
        n = 0
        for metric in ("ifd_ppl", "rifd_ppl"):
            column = f"{variant}_{metric}"
            values = (decisions[column].drop_nulls().filter(decisions[column].drop_nulls().is_finite())
                      if column in decisions.columns else pl.Series([], dtype=pl.Float64))
            n = max(n, values.len())
            cells.append(f"{values.median():.3f} [{values.quantile(0.1):.3f}, {values.quantile(0.9):.3f}]"
                         if values.len() else "n/a")
        if n:
            rows.append(f"| {variant} | {n} | {cells[0]} | {cells[1]} |")
    return rows


def _evaluation(ev: dict[str, Any]) -> list[str]:
    if not ev.get("evaluated"):
        return []

    def loss(x: Any) -> str:
        return f"{x:.3f}" if isinstance(x, float) and math.isfinite(x) else "n/a"

    return ["## Evaluation", "",
            f"A student trained on this data against students trained on baseline sets of original pairs, judged by "
            f"`{ev['judge']}` in both orders:", "",
            "| baseline | test set | n | wins | ties | losses | winning score | unparsed judgements | "
            "held-out loss (this / baseline) |",
            "|---|---|---|---|---|---|---|---|---|",
            *[f"| {r['baseline']} | {r['test_set']} | {r['n']} | {r['wins']} | {r['ties']} | {r['losses']} | "
              f"{r['winning_score']:.3f} | {r['unparsed_judgements']} | {loss(r.get('heldout_loss_model'))} / "
              f"{loss(r.get('heldout_loss_baseline'))} |" for r in ev.get("table", [])], ""]


def publish(folder: str, repo: str, token_env: str = "HF_TOKEN", private: bool = False) -> str:
    """Push a finished run's folder to the hub as dataset `repo`; its URL. Fails with a message
    that says what to do when the folder is not a finished run or the hub cannot be reached."""
    from reflectune.errors import ReflectuneError

    if "://" in folder and not folder.startswith("file://"):
        raise ReflectuneError(f"publish reads a local folder; {folder} is remote: copy it here first")
    missing = [name for name in (run_folder.CARD, run_folder.SELECTED, run_folder.MANIFEST)
               if not os.path.exists(os.path.join(folder, name))]
    if missing:
        raise ReflectuneError(f"{folder} is not a finished run's output ({', '.join(missing)} missing): the card "
                              "and the manifest are written when `reflectune recycle` finishes")
    from huggingface_hub import HfApi

    api = HfApi(token=os.environ.get(token_env) or None)
    try:
        api.create_repo(repo, repo_type="dataset", private=private, exist_ok=True)
        api.upload_folder(folder_path=folder, repo_id=repo, repo_type="dataset", allow_patterns=list(run_folder.PUBLISHED),
                          commit_message="Dataset written by Reflectune")
    except Exception as exc:  # no network, no token, no rights: all end here with the same advice
        cause = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        raise ReflectuneError(
            f"could not publish {folder} as dataset '{repo}' on {api.endpoint}: {type(exc).__name__}: {cause}. "
            f"Nothing was changed; the folder loads as it stands with datasets.load_dataset('{folder}'). Retry "
            f"where the hub is reachable, with a write token in ${token_env}.") from None
    return f"{api.endpoint}/datasets/{repo}"
