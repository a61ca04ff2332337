"""transformers engines: the student scorer (and, later, a teacher) on CPU or one GPU.

The scorer sorts sequences by length and packs them into right-padded batches under a token
budget. Right padding with causal attention needs no attention mask (a real token never
attends to a later pad), so attention takes the fused causal path. The LM head runs only on
the hidden states that predict a label, the costly part of a forward pass for a small-vocab
model is thereby skipped on prompt tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from reflectune import models
from reflectune import progress as progress_hook
from reflectune.scoring import TokenSequence


def pick_device(device: str = "auto") -> Any:
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def cpu_has_fast_bf16() -> bool:
    """True where oneDNN has native bfloat16 kernels (AVX-512 BF16 / AMX). Elsewhere bf16 is
    emulated and runs many times slower than fp32."""
    import torch

    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def pick_dtype(dtype: str, device: Any) -> Any:
    import torch

    named = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype != "auto":
        if dtype not in named:
            raise ValueError(f"unknown dtype '{dtype}': choose auto, float32, bfloat16 or float16")
        return named[dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def load_causal_lm(spec: str, dtype: str = "auto", device: str = "auto") -> tuple[Any, Any]:
    """(model, tokenizer) in eval mode on the chosen device."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = models.resolve(spec)
    dev = pick_device(device)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=pick_dtype(dtype, dev), attn_implementation="sdpa")
    model.to(dev).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.set_grad_enabled(False)
    return model, tokenizer


class TransformersScorer:
    """Student engine on transformers. One model load per instance; reuse it across shards."""

    def __init__(self, spec: str, dtype: str = "auto", device: str = "auto", max_batch_tokens: int | None = None):
        self.spec = spec
        self.model, self.tokenizer = load_causal_lm(spec, dtype, device)
        self.device = self.model.device
        self.dtype = self.model.dtype
        # On CPU, activations of ~2k tokens stay in cache; larger batches measured slower there.
        self.max_batch_tokens = max_batch_tokens or (2048 if self.device.type == "cpu" else 32768)
        # On CPU, oneDNN compiles and keeps kernels for every input shape it meets: batches of
        # any width made the process grow by ~35 MB a shard (1.4 GB after 16 shards of 128
        # pairs). Widths rounded up to a multiple of SHAPE_STEP, rows to the full count for the
        # width or a power of two, and the head's rows to a power of two keep the shapes, and so
        # that memory, bounded; padding changes no score.
        self._shapes = self.device.type == "cpu"
        # positions past the trained context give meaningless scores
        self.max_sequence = getattr(self.model.config, "max_position_embeddings", None)
        self._decoder = self.model.get_decoder()
        self._head = self.model.get_output_embeddings()
        self._softcap = getattr(self.model.config, "final_logit_softcapping", None)
        self._pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def token_nll(self, sequences: Sequence[TokenSequence], progress: Callable[[int], None] | None = None) -> list[float]:
        import torch

        out = [math.nan] * len(sequences)
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i].ids), reverse=True)
        with torch.inference_mode():
            for batch in _pack(order, sequences, self.max_batch_tokens, SHAPE_STEP if self._shapes else 1):
                progress_hook.check()
                means = self._batch_nll([sequences[i] for i in batch])
                for i, value in zip(batch, means):
                    out[i] = value
                if progress:
                    progress(sum(len(sequences[i].ids) for i in batch))
        return out

    def _batch_nll(self, seqs: list[TokenSequence]) -> list[float]:
        import torch

        width = max(len(s.ids) for s in seqs)
        height = len(seqs)
        if self._shapes:
            width = -(-width // SHAPE_STEP) * SHAPE_STEP
            # a full batch as it is; a short one (the last of its width) up to a power of two
            height = max(height, min(self.max_batch_tokens // width, 1 << (height - 1).bit_length()))
        ids = torch.full((height, width), self._pad, dtype=torch.long)
        rows, positions, counts = [], [], []
        for r, s in enumerate(seqs):
            ids[r, : len(s.ids)] = torch.tensor(s.ids)
            # the hidden state at position p predicts token p + 1
            positions.append(torch.arange(s.label_start - 1, len(s.ids) - 1))
            rows.append(torch.full((s.n_labels,), r))
            counts.append(s.n_labels)
        rows_t, pos_t = torch.cat(rows), torch.cat(positions)
        ids = ids.to(self.device)
        hidden = self._decoder(input_ids=ids).last_hidden_state
        picked = hidden[rows_t.to(self.device), pos_t.to(self.device)]
        targets = ids[rows_t.to(self.device), pos_t.to(self.device) + 1]
        nll = torch.empty(picked.shape[0], dtype=torch.float32, device=self.device)
        for start in range(0, picked.shape[0], 2048):  # bound the [labels x vocab] logits
            chunk = picked[start : start + 2048]
            n = chunk.shape[0]
            if self._shapes:  # the head's input too takes one of a few shapes: a power of two rows
                chunk = torch.nn.functional.pad(chunk, (0, 0, 0, max(16, 1 << (n - 1).bit_length()) - n))
            logits = self._head(chunk)[:n].float()
            if self._softcap:
                logits = torch.tanh(logits / self._softcap) * self._softcap
            nll[start : start + n] = torch.nn.functional.cross_entropy(
                logits, targets[start : start + n], reduction="none"
            )
        sums = torch.zeros(len(seqs), dtype=torch.float64, device=self.device)
        sums.index_add_(0, rows_t.to(self.device), nll.double())
        return (sums.cpu() / torch.tensor(counts, dtype=torch.float64)).tolist()

    def close(self) -> None:
        self.model = self._decoder = self._head = None


SHAPE_STEP = 16


def _pack(order: list[int], seqs: Sequence[TokenSequence], budget: int, step: int = 1) -> list[list[int]]:
    """Consecutive runs of the length-sorted order whose padded size (widths rounded up to a
    multiple of `step`) stays within budget."""
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        width = -(-len(seqs[current[0] if current else i].ids) // step) * step
        if current and (len(current) + 1) * width > budget:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


class TransformersTeacher:
    """Teacher engine on transformers: batched chat generation with left padding, greedy by
    default. One model load per instance."""

    def __init__(self, spec: str, batch_size: int, dtype: str = "auto", device: str = "auto"):
        self.model, self.tokenizer = load_causal_lm(spec, dtype, device)
        self.tokenizer.padding_side = "left"
        self.teacher_id = f"transformers:{models.model_id(spec)}"
        self.batch_size = batch_size
        self.context = getattr(self.model.config, "max_position_embeddings", None)
        eos = self.model.generation_config.eos_token_id
        self._eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [self.tokenizer.eos_token_id])
        self._pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else next(iter(self._eos))
        self._compiler = None  # xgrammar, compiled on first constrained use

    def generate(self, chats, sampling, progress=None, formats=None, *, admit=None, done=None):
        return self.complete([render_chat(self.tokenizer, c) for c in chats], sampling, progress, specials=False,
                             formats=formats, admit=admit, done=done)

    def complete(self, texts, sampling, progress=None, specials: bool = True, formats=None, *, admit=None,
                 done=None):
        """Continue raw prompts (e.g. a scoring template's P(x)); `specials` adds the
        tokenizer's BOS as the scorer and the trainer do. Chats go through `generate`.
        `formats` are enforced with an xgrammar logits processor unless `sampling.constrained`
        is off; `progress(generations, new_tokens)` and `done(i, generation)` are called after
        each batch, whose rows are admitted (reflection.TeacherEngine) before it runs."""
        from dataclasses import replace

        import torch

        from reflectune.formats import fit
        from reflectune.reflection import NOT_SENT, Generation, new_tokens

        encoded = [self.tokenizer(t, add_special_tokens=specials)["input_ids"] for t in texts]
        out: list[Generation] = [Generation() for _ in texts]
        refused = False
        runnable, budgets = [], {}
        for i, ids in enumerate(encoded):
            budget = new_tokens(len(ids), sampling.max_new_tokens, self.context)
            if isinstance(budget, str):
                out[i] = Generation(prompt_tokens=len(ids), error=budget)
            else:
                runnable.append(i)
                budgets[i] = budget
        runnable.sort(key=lambda i: len(encoded[i]))  # similar lengths share a batch: less padding
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        with torch.inference_mode():
            for start in range(0, len(runnable), self.batch_size):
                progress_hook.check()
                batch = runnable[start : start + self.batch_size]
                if admit is not None:
                    for i in batch:
                        refused = refused or not admit(i)
                        if refused:
                            out[i] = Generation(error=NOT_SENT)
                    batch = [i for i in batch if out[i].error != NOT_SENT]
                    if not batch:
                        continue
                # one limit per batch: the longest prompt's, so every row fits the context
                params = replace(sampling, max_new_tokens=min(budgets[i] for i in batch))
                grammars = None
                if sampling.constrained != "off" and formats is not None:
                    grammars = [self._grammar(fit(formats[i], params.max_new_tokens)) for i in batch]
                steps = _Steps(len(batch), params.max_new_tokens, progress)
                for i, gen in zip(batch, self._generate_batch([encoded[i] for i in batch], params, grammars, steps)):
                    out[i] = gen
                    if done:
                        done(i, gen)
                if progress:
                    # what the steps did not report: the batch's generations, its real token count
                    progress(len(batch) - steps.generations, sum(out[i].completion_tokens for i in batch) - steps.tokens)
        return out

    def _grammar(self, fmt):
        """The format compiled for this tokenizer (xgrammar caches compiled grammars). None
        formats get a grammar that admits any text."""
        if self._compiler is None:
            import xgrammar as xgr

            info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.model.config.vocab_size,
                                                      stop_token_ids=sorted(self._eos))
            self._compiler = xgr.GrammarCompiler(info)
        return self._compiler.compile_regex(fmt.regex if fmt is not None else r"[\s\S]*")

    def _generate_batch(self, encoded, sampling, grammars=None, steps=None):
        import torch

        from reflectune.reflection import Generation

        width = max(len(ids) for ids in encoded)
        input_ids = torch.full((len(encoded), width), self._pad, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for r, ids in enumerate(encoded):
            input_ids[r, width - len(ids):] = torch.tensor(ids)
            mask[r, width - len(ids):] = 1
        greedy = sampling.temperature <= 0
        processors = []
        if grammars:
            import xgrammar as xgr

            # one processor per generate call: it holds each row's grammar state
            processors.append(xgr.contrib.hf.LogitsProcessor(grammars))
        generated = self.model.generate(
            input_ids=input_ids.to(self.model.device),
            attention_mask=mask.to(self.model.device),
            max_new_tokens=sampling.max_new_tokens,
            do_sample=not greedy,
            temperature=None if greedy else sampling.temperature,
            top_p=None if greedy else sampling.top_p,
            top_k=None,
            repetition_penalty=sampling.repetition_penalty if sampling.repetition_penalty != 1.0 else None,
            logits_processor=processors or None,
            stopping_criteria=[steps or _Steps(len(encoded), sampling.max_new_tokens, None)],
            pad_token_id=self._pad,
        )[:, width:].tolist()
        progress_hook.check()  # a batch cut short by the user's Ctrl-C is not a result
        results = []
        for ids, new in zip(encoded, generated):
            stop = next((k for k, t in enumerate(new) if t in self._eos), None)
            completion = new if stop is None else new[:stop]
            results.append(Generation(
                text=self.tokenizer.decode(completion, skip_special_tokens=True),
                prompt_tokens=len(ids),
                completion_tokens=len(completion) + (stop is not None),
                finish_reason="length" if stop is None else "stop",
                constrained="regex" if grammars else "none",
            ))
        return results

    def close(self) -> None:
        self.model = None


class _Steps:
    """A stopping criterion called at every decoding step: it reports progress in fractions of
    the batch's generations (a bar moves with the tokens written, not once a batch), and stops
    every row once the user asked the run to stop."""

    def __init__(self, rows: int, max_new_tokens: int, progress: Callable[[float, int], None] | None):
        self.rows, self.share, self.progress = rows, rows / max(max_new_tokens, 1), progress
        self.generations, self.tokens = 0.0, 0

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        if self.progress is not None and self.generations + self.share < self.rows:
            self.generations += self.share
            self.tokens += self.rows
            self.progress(self.share, self.rows)
        return torch.full((input_ids.shape[0],), progress_hook.stop.is_set(), dtype=torch.bool, device=input_ids.device)


def render_chat(tokenizer, chat) -> str:
    """The chat as the model's template writes it, ready for the assistant's turn. Templates
    that refuse a system role get the system text at the top of the first user turn."""
    try:
        return tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    except Exception:
        if not chat or chat[0]["role"] != "system":
            raise
        system, first, *rest = chat
        merged = [{"role": "user", "content": system["content"] + "\n\n" + first["content"]}, *rest]
        return tokenizer.apply_chat_template(merged, add_generation_prompt=True, tokenize=False)
