"""The token boundary between prompt and target, as the reference draws it, in scoring and in
training: with a SentencePiece tokenizer (Llama-style, trained here), where the first target
token differs between the whole text and the target alone (`A` after `ASSISTANT:` against
`▁A` alone), and with the packaged BPE tokenizer."""

import io
import json

import polars as pl
import pytest
import torch

from reflectune import oracle, templates
from reflectune.scoring import TokenSequence, build_sequences, score_rows
from reflectune.training import tokenized

from .conftest import SAMPLE


@pytest.fixture(scope="module")
def rows():
    return [json.loads(line) for line in SAMPLE.read_text().splitlines() if line.strip()][:8]


@pytest.fixture(scope="module")
def llama_style(tmp_path_factory, rows):
    """A Llama-style tokenizer on a SentencePiece model trained on the sample, and a small
    Llama initialised with a fixed seed, saved as a model directory."""
    import sentencepiece as spm
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    where = tmp_path_factory.mktemp("llama-style")
    corpus = [r[k] for r in rows for k in ("instruction", "output")] + [templates.VICUNA_SYSTEM] * 4 + \
        [templates.REVERSE_PROMPT] * 4
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=model, vocab_size=400,
                                   model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True,
                                   character_coverage=1.0, minloglevel=2)
    (where / "tokenizer.model").write_bytes(model.getvalue())
    (where / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "legacy": True}))
    tok = AutoTokenizer.from_pretrained(where)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048,
                         bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(where)
    tok.save_pretrained(where)
    return where


def _check_reference_tokens(tok, rows):
    """Every conditional sequence is the whole text's tokens, labelled from the prompt's own
    count; returns how many a_condition boundaries differ from joining separate encodings."""
    differs = 0
    for row, parts in zip(rows, build_sequences(rows, tok, "vicuna")):
        prompt = templates.render("vicuna", row["instruction"], row.get("input", ""))
        whole = tok(prompt + row["output"])["input_ids"]
        alone = tok(prompt)["input_ids"]
        assert parts["a_condition"] == TokenSequence(tuple(whole), len(alone))
        differs += alone + tok(row["output"], add_special_tokens=False)["input_ids"] != whole
    return differs


def test_sentencepiece_scoring_takes_the_references_tokens(llama_style, rows):
    from reflectune.engines.hf import TransformersScorer

    scorer = TransformersScorer(str(llama_style), dtype="float32")
    # the case the rule exists for: the target's first token is not the same alone
    assert _check_reference_tokens(scorer.tokenizer, rows) == len(rows)
    got = score_rows(rows, scorer)
    for row, scores in zip(rows, got):
        want = oracle.score_pair(scorer.model, scorer.tokenizer, row["instruction"], row.get("input", ""),
                                 row["output"])
        for key in ("loss_q_direct", "loss_a_direct", "loss_q_condition", "loss_a_condition"):
            assert scores[key] == pytest.approx(want[key], rel=1e-4), key


def test_packaged_bpe_scoring_takes_the_references_tokens(tokenizer, rows):
    _check_reference_tokens(tokenizer, rows)


def test_training_labels_the_span_scoring_labels(llama_style, rows, tmp_path):
    """Through TRL's own dataset preparation: the labels start where the scorer's do, and the
    completion is the scored response followed by the end-of-sequence token."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(llama_style)
    pairs = pl.DataFrame([{"instruction": r["instruction"], "input": r.get("input", ""), "output": r["output"]}
                          for r in rows])
    train_rows, left_out = tokenized(pairs, "vicuna", tok, 1024)
    assert left_out == 0 and len(train_rows) == len(rows)
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(llama_style), processing_class=tok,
        args=SFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], completion_only_loss=True,
                       max_length=1024, per_device_train_batch_size=2),
        train_dataset=Dataset.from_list(train_rows))
    scored = build_sequences(pairs.to_dicts(), tok, "vicuna")
    for i, parts in enumerate(scored):
        example = trainer.train_dataset[i]
        seq = parts["a_condition"]
        ids, labels = example["input_ids"], example["labels"]
        assert ids == [*seq.ids, tok.eos_token_id]
        assert labels == [-100] * seq.label_start + ids[seq.label_start:]
    # and the batch the collator builds keeps them
    batch = trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[1]])
    first = scored[0]["a_condition"]
    assert batch["labels"][0, : first.label_start].eq(-100).all()
    assert batch["labels"][0, first.label_start] == first.ids[first.label_start]
