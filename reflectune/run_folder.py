"""A run's output folder, local or on S3: every file and subfolder a run writes is named here,
and nowhere else.

    OUT/
      intake/rejected.parquet, intake/summary.json   what intake refused, and its counts
      shards/part-NNNNN.parquet                        the valid records, a shard a file
      variants/part-NNNNN.KEY.parquet (+ .json)        the teacher's variants of a shard
      scores/part-NNNNN.KEY.parquet (+ .json)          the student's scores of a shard
      journal/                                         every teacher generation that returned
      decisions.parquet, selected.parquet, selected.jsonl, rejected.parquet
      model/, training.json                            the trained student
      baselines/KIND.parquet, KIND-model/, KIND-training.json   each baseline's pairs, student, training
      evaluation.parquet, evaluation-table.parquet, evaluation.json   verdicts, the table, the summary
      judge-journal/                                   every verdict of the evaluation's judge that returned
      stops/RUN.json                                   a GPU flow run's stop on an error no retry mends
      README.md (the dataset card), report.html, manifest.json (written last)
      .reflectune-lock.json                            held while a run writes here

A re-recycling root (a watched folder's runs) holds `ledger.parquet`, `inputs/` and `runs/`.
KEY is a hash of everything that determines a shard's output (reflectune.stages); the `.json`
beside a shard's output is its done marker.
"""

from __future__ import annotations

from dataclasses import dataclass

from reflectune import io

DECISIONS = "decisions.parquet"
SELECTED = "selected.parquet"
SELECTED_JSONL = "selected.jsonl"
REJECTED = "rejected.parquet"
MANIFEST = "manifest.json"
CARD = "README.md"
REPORT = "report.html"
LOCK = ".reflectune-lock.json"
# what says "this folder is a finished run": written last, removed when a run starts writing
FINISHED = (MANIFEST, CARD, REPORT)
# what `reflectune publish` uploads: the dataset and what describes it
PUBLISHED = (CARD, SELECTED, SELECTED_JSONL, DECISIONS, REJECTED, MANIFEST, REPORT)


@dataclass(frozen=True)
class RunFolder:
    root: str

    def _at(self, *parts: str) -> str:
        return io.join(self.root, *parts)

    # -- intake and shards
    @property
    def intake_rejected(self) -> str:
        return self._at("intake", REJECTED)

    @property
    def intake_summary(self) -> str:
        return self._at("intake", "summary.json")

    def shard(self, index: int) -> str:
        return self._at("shards", f"{shard_name(index)}.parquet")

    def variants(self, shard: str, key: str) -> str:
        return self._at("variants", f"{shard}.{key}.parquet")

    def scores(self, shard: str, key: str) -> str:
        return self._at("scores", f"{shard}.{key}.parquet")

    @property
    def journal(self) -> str:
        return self._at("journal")

    def stop(self, run: str) -> str:
        """How a GPU flow run named `run` (its stage or step and what it covers) stopped on an
        error a retry cannot mend: the error's type and message, for the run that launched it."""
        return self._at("stops", f"{run}.json")

    @property
    def judge_journal(self) -> str:
        """The evaluation judge's request journal."""
        return self._at("judge-journal")

    # -- selection
    @property
    def decisions(self) -> str:
        return self._at(DECISIONS)

    @property
    def selected(self) -> str:
        return self._at(SELECTED)

    @property
    def selected_jsonl(self) -> str:
        return self._at(SELECTED_JSONL)

    @property
    def rejected(self) -> str:
        return self._at(REJECTED)

    # -- training and evaluation
    @property
    def model(self) -> str:
        return self._at("model")

    @property
    def training(self) -> str:
        return self._at("training.json")

    def baseline_pairs(self, kind: str) -> str:
        return self._at(f"baselines/{kind}.parquet")

    def baseline_model(self, kind: str) -> str:
        return self._at(f"baselines/{kind}-model")

    def baseline_training(self, kind: str) -> str:
        return self._at(f"baselines/{kind}-training.json")

    @property
    def evaluation_summary_table(self) -> str:
        return self._at("evaluation-table.parquet")

    @property
    def evaluation_table(self) -> str:
        return self._at("evaluation.parquet")

    @property
    def evaluation(self) -> str:
        return self._at("evaluation.json")

    # -- what describes the run
    @property
    def manifest(self) -> str:
        return self._at(MANIFEST)

    @property
    def card(self) -> str:
        return self._at(CARD)

    @property
    def report(self) -> str:
        return self._at(REPORT)

    @property
    def lock(self) -> str:
        return self._at(LOCK)

    def file(self, name: str) -> str:
        """One of the names above (FINISHED, PUBLISHED) in this folder."""
        return self._at(name)


def shard_name(index: int) -> str:
    return f"part-{index:05d}"


@dataclass(frozen=True)
class RecyclingRoot:
    """The folder re-recycling writes for a watched folder: its ledger of rows taken, each
    batch's input, and each batch's run folder."""

    root: str

    @property
    def ledger(self) -> str:
        return io.join(self.root, "ledger.parquet")

    def batch_input(self, name: str) -> str:
        return io.join(self.root, "inputs", f"{name}.jsonl")

    def run(self, name: str) -> str:
        return io.join(self.root, "runs", name)
