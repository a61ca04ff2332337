"""The teacher's output forms under vLLM's regex compilation limit: each compiles with xgrammar,
as vLLM's backend compiles it, well within the limit at every budget; and a form that does not
compile in time (vLLM ends the request with no text) is a failed request, never an answer that
lacks its form."""

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from reflectune import formats, models

from ..conftest import MODEL, ROOT

# vLLM's default VLLM_REGEX_COMPILATION_TIMEOUT_S
LIMIT = 5.0


@pytest.fixture(scope="module")
def compiler():
    xgr = pytest.importorskip("xgrammar")
    from transformers import AutoTokenizer

    info = xgr.TokenizerInfo.from_huggingface(AutoTokenizer.from_pretrained(models.resolve(MODEL)))
    return lambda: xgr.GrammarCompiler(info, max_threads=8, cache_enabled=False)  # vLLM's settings, uncached


@pytest.mark.parametrize("kind", ["ins", "res"])
def test_the_teacher_forms_compile_well_within_vllms_limit(compiler, kind):
    # measured on 2 cores: 0.04-0.15 s at every budget with the 1.5B teacher's 152k-token
    # vocabulary, where the forms bounded in characters took 8-10 s; a fifth of the limit
    # leaves a busy machine its margin
    for max_new_tokens in (256, 384, 512, 1024, 2048):
        regex = formats.teacher_format(kind, max_new_tokens).regex
        start = time.perf_counter()
        compiler().compile_regex(regex)
        seconds = time.perf_counter() - start
        assert seconds < LIMIT / 5, (kind, max_new_tokens, seconds)


# a form bounded in characters, field by field: xgrammar takes about 4 s on it with the test
# model's vocabulary (measured on 2 cores), over the limit of 1 s the test sets
SLOW = "".join(r"[^\[]{0,2000}\n\[E%d\] [^\[\n]{0,1500}" % i for i in range(8))

SCRIPT = textwrap.dedent("""
    import json, sys
    from reflectune.engines.vllm_engine import VLLMEngine
    from reflectune.formats import OutputFormat
    from reflectune.reflection import Sampling

    engine = VLLMEngine(sys.argv[1], dtype="float32", max_model_len=1024)
    try:
        slow = OutputFormat("slow", sys.argv[2], {}, ())
        chats = [[{"role": "user", "content": "Say something."}]]
        gens = engine.generate(chats, Sampling(max_new_tokens=16, temperature=0.0, constrained="on"),
                               formats=[slow])
        print(json.dumps([g.__dict__ for g in gens]))
    finally:
        engine.close()
""")


def test_a_form_that_does_not_compile_in_time_is_a_failed_request():
    pytest.importorskip("vllm")
    # in a process of its own: vLLM reads its settings once, when its engine starts
    env = {**os.environ, "VLLM_REGEX_COMPILATION_TIMEOUT_S": "1"}
    done = subprocess.run([sys.executable, "-c", SCRIPT, MODEL, SLOW], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    [gen] = json.loads(done.stdout.strip().splitlines()[-1])
    assert gen["text"] == "" and gen["constrained"] == "regex"
    assert gen["error"] and "output form did not compile" in gen["error"], gen
