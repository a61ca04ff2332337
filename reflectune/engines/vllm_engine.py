"""vLLM's offline engine as teacher and as student (engine arguments and memory sizing are in
vllm_args, the `vllm serve` process in vllm_serve). vLLM is imported inside functions only,
so this module imports without it.
"""

from __future__ import annotations

from reflectune import models
from reflectune import progress as progress_hook
from reflectune.engines.vllm_args import (EngineArgs, defaults, engine_env, fill_context, memory_args, on_gpu,
                                          require_vllm)


class VLLMEngine:
    """vLLM's offline engine as teacher (chat generation) and as student (prompt log-probs).

    Scoring sends the project's own token ids (so label spans are exactly those of every other
    engine) with `max_tokens=1, prompt_logprobs=0`: the log-probability of each prompt token.
    Requests are submitted a block at a time so that continuous batching fills the engine and
    progress can still be reported.
    """

    def __init__(self, spec: str, args: EngineArgs | None = None, block: int = 512, **options):
        require_vllm("--engine vllm")
        engine_env()
        import vllm

        self.spec = spec
        self.args = fill_context(defaults(args or EngineArgs(**options)), spec)
        a = self.args
        self.llm = vllm.LLM(
            model=models.resolve(spec), dtype=a.dtype, max_model_len=a.max_model_len,
            **memory_args(spec, a), tensor_parallel_size=a.tensor_parallel_size,
            enforce_eager=a.enforce_eager, enable_prefix_caching=a.enable_prefix_caching, seed=a.seed,
            disable_log_stats=True,
        )
        self.tokenizer = self.llm.get_tokenizer()
        self.max_sequence = a.max_model_len - 1  # scoring asks for one generated token
        self.teacher_id = f"vllm:{models.model_id(spec)}"
        self.block = block
        self.calls = 0  # generate() calls into the engine, for tests and accounting
        self._requests = 0
        self.cached_tokens = 0  # prompt tokens read from the prefix cache while scoring

    # -- student ---------------------------------------------------------------------------
    def token_nll(self, sequences, progress=None) -> list[float]:
        """Mean NLL of each sequence's labelled tokens.

        vLLM by default skips the prefix cache for requests that ask for prompt log-probs,
        because a cached position gets no log-prob. Label tokens always follow the shared
        prefixes (templates, the reverse prompt, a pair's own prompt), so reading the cache is
        safe: a request whose cached part reaches into its labels is scored again uncached.
        """
        from vllm import SamplingParams

        too_long = [s for s in sequences if len(s.ids) > self.max_sequence]
        if too_long:  # the scorer leaves such sequences out; a caller that did not is wrong
            raise ValueError(f"a sequence of {len(too_long[0].ids)} tokens does not fit max_model_len {self.args.max_model_len}")
        cached = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0, detokenize=False,
                                skip_reading_prefix_cache=False)
        uncached = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0, detokenize=False)
        out: list[float] = []
        for start in range(0, len(sequences), self.block):
            progress_hook.check()
            block = list(sequences[start : start + self.block])
            values = self._score(block, cached)
            redo = [k for k, v in enumerate(values) if v is None]
            if redo:
                for k, v in zip(redo, self._score([block[k] for k in redo], uncached)):
                    values[k] = v
            out.extend(values)
            if progress:
                progress(sum(len(s.ids) for s in block))
        return out

    def _score(self, block, params) -> list[float | None]:
        from vllm.inputs import TokensPrompt

        self.calls += 1
        results = self.llm.generate([TokensPrompt(prompt_token_ids=list(s.ids)) for s in block], params, use_tqdm=False)
        values: list[float | None] = []
        for seq, result in zip(block, results):
            self.cached_tokens += result.num_cached_tokens or 0
            # token j's log-prob comes from position j - 1: it must have been computed
            if (result.num_cached_tokens or 0) >= seq.label_start:
                values.append(None)
                continue
            logprobs = result.prompt_logprobs
            values.append(-sum(logprobs[j][seq.ids[j]].logprob for j in range(seq.label_start, len(seq.ids))) / seq.n_labels)
        return values

    # -- teacher ---------------------------------------------------------------------------
    def generate(self, chats, sampling, progress=None, formats=None, *, admit=None, done=None):
        """One generation per chat (reflection.TeacherEngine). All of them go to the engine at
        once (continuous batching keeps it full), each admitted first; `progress(1, tokens)`
        and `done(i, generation)` are called as each one finishes. `formats` are enforced with
        vLLM's structured outputs unless `sampling.constrained` is off."""
        from reflectune.engines.hf import render_chat

        texts = [render_chat(self.tokenizer, c) for c in chats]
        return self.complete(texts, sampling, progress, specials=False, formats=formats, admit=admit, done=done)

    def complete(self, texts, sampling, progress=None, specials: bool = True, formats=None, *, admit=None,
                 done=None):
        """Continue raw prompts (e.g. a scoring template's P(x)); `specials` adds the
        tokenizer's BOS as the scorer and the trainer do. Chats go through `generate`."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import StructuredOutputsParams

        from reflectune.formats import fit
        from reflectune.reflection import NOT_SENT, Generation, new_tokens

        encoded = [self.tokenizer(t, add_special_tokens=specials)["input_ids"] for t in texts]
        out = [Generation() for _ in texts]
        refused = False
        constrain = sampling.constrained != "off" and formats is not None
        # vLLM on CPU fails a request with its own seed when its prompt is prefilled in chunks
        # ("CPU Generator does not use offset"): there the engine's seed alone makes runs repeatable
        seed = sampling.seed if on_gpu() else None
        requests = []
        for i, ids in enumerate(encoded):
            budget = new_tokens(len(ids), sampling.max_new_tokens, self.args.max_model_len)
            if isinstance(budget, str):
                out[i] = Generation(prompt_tokens=len(ids), error=budget)
                continue
            refused = refused or (admit is not None and not admit(i))
            if refused:
                out[i] = Generation(error=NOT_SENT)
                continue
            fmt = fit(formats[i], budget) if constrain else None
            params = SamplingParams(
                temperature=sampling.temperature, top_p=sampling.top_p, max_tokens=budget,
                seed=seed, repetition_penalty=sampling.repetition_penalty,
                structured_outputs=StructuredOutputsParams(regex=fmt.regex) if fmt else None)
            requests.append((i, TokensPrompt(prompt_token_ids=ids), params, "regex" if fmt else "none"))

        def finished(k, result):
            i, _, _, how = requests[k]
            completion = result.outputs[0]
            if completion.finish_reason == "error":
                # vLLM ends a request it could not run with no text: a failure, not an answer
                # without its form (the parser would take it for a teacher that wrote nothing)
                out[i] = Generation(prompt_tokens=len(encoded[i]), error=engine_failed(how), constrained=how)
            else:
                out[i] = Generation(text=completion.text, prompt_tokens=len(encoded[i]),
                                    completion_tokens=len(completion.token_ids),
                                    finish_reason=completion.finish_reason, constrained=how)
            if done:
                done(i, out[i])
            if progress:
                progress(1, len(completion.token_ids))

        self.calls += 1
        self._run([(prompt, params) for _, prompt, params, _ in requests], finished)
        return out

    def _run(self, requests, finished) -> None:
        """Add every request to the engine, step it until all are done, and call
        `finished(k, output)` for each as it completes."""
        engine = self.llm.llm_engine
        ids = {}
        for k, (prompt, params) in enumerate(requests):
            self._requests += 1
            ids[f"reflectune-{self._requests}"] = k
            engine.add_request(f"reflectune-{self._requests}", prompt, params)
        try:
            while engine.has_unfinished_requests():
                progress_hook.check()
                for output in engine.step():
                    if output.finished:
                        finished(ids[output.request_id], output)
        except BaseException:
            engine.abort_request(list(ids))
            raise

    def close(self) -> None:
        """Shut the engine's processes down now; interpreter exit does not do it cleanly."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is None:
            return
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is not None:
            core.shutdown()
            # The client's output thread exits after the shutdown signal. Left running into
            # interpreter exit, it frees tensors while Python tears down its threads, which
            # aborts the process ("terminate called without an active exception"): wait for it.
            thread = getattr(core, "output_queue_thread", None)
            if thread is not None:
                thread.join(timeout=30)


def engine_failed(constrained: str) -> str:
    """A generation's error where vLLM ended the request with an error of its own."""
    if constrained == "regex":
        return ("vLLM failed the request: its output form did not compile (over "
                "VLLM_REGEX_COMPILATION_TIMEOUT_S on a busy machine; vLLM's log has the cause)")
    return "vLLM failed the request (vLLM's log has the cause)"
