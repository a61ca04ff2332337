"""Fine-tune the student on the selected data (TRL's SFT trainer).

Each pair becomes a prompt-completion example whose prompt is the same template P the
student scored with (or, for `chat`, the student's own chat format), tokenized as the scorer
tokenizes it, so the student trains on the format and the tokens it was judged on; the loss
covers the completion (response) tokens only. The global batch is the configured one on any
number of devices (torchrun sets WORLD_SIZE).
With LoRA, the adapters are merged before saving, so `{out}/model` always loads with
`AutoModelForCausalLM.from_pretrained`.
"""

from __future__ import annotations

import math
import os
import tempfile
from typing import Any

import polars as pl

from reflectune import io, templates
from reflectune.config import StudentConfig, TrainingConfig
from reflectune.errors import missing_extra


def examples(pairs: pl.DataFrame, template: str) -> list[dict[str, Any]]:
    rows = []
    for r in pairs.iter_rows(named=True):
        if template == "chat":
            rows.append({"prompt": [{"role": "user", "content": templates.user_turn(r["instruction"], r["input"])}],
                         "completion": [{"role": "assistant", "content": r["output"]}]})
        else:
            rows.append({"prompt": templates.render(template, r["instruction"], r["input"]), "completion": r["output"]})
    return rows


def tokenized(pairs: pl.DataFrame, template: str, tokenizer: Any, max_length: int) -> tuple[list[dict[str, list[int]]], int]:
    """(training rows, rows left out). Each row is the whole text's ids with the completion
    labelled from the prompt's own token count: the boundary the scorer uses
    (scoring.labelled), so the student trains on the tokens it was scored on. The completion
    ends with the end-of-sequence token (text templates) or the chat template's end of turn.
    A row whose prompt fills max_length has nothing to learn from and is left out."""
    from reflectune.scoring import labelled

    rows, left_out = [], 0
    for example in examples(pairs, template):
        if template == "chat":
            prompt = tokenizer.apply_chat_template(example["prompt"], add_generation_prompt=True, tokenize=False)
            whole = tokenizer.apply_chat_template(example["prompt"] + example["completion"], tokenize=False)
            if not whole.startswith(prompt):
                raise ValueError("the student's chat template renders a prompt that the whole conversation does not "
                                 "start with: use a text template (student.template vicuna, alpaca or wizardlm)")
            seq = labelled(tokenizer, prompt, whole[len(prompt):], max_length, specials=False)
        else:
            seq = labelled(tokenizer, example["prompt"], example["completion"] + tokenizer.eos_token, max_length)
        if isinstance(seq, str):
            left_out += 1
            continue
        rows.append({"input_ids": list(seq.ids),
                     "completion_mask": [0] * seq.label_start + [1] * seq.n_labels})
    return rows, left_out


def accumulation_steps(cfg: TrainingConfig, world_size: int) -> int:
    """Gradient accumulation that keeps the global batch (per device x accumulation x devices)
    at cfg.batch_size on any number of devices."""
    per_step = cfg.per_device_batch_size * world_size
    if cfg.batch_size % per_step:
        raise ValueError(
            f"training.batch_size {cfg.batch_size} is not a multiple of training.per_device_batch_size "
            f"{cfg.per_device_batch_size} x {world_size} devices: choose a per-device batch that divides "
            f"{cfg.batch_size // world_size if cfg.batch_size % world_size == 0 else cfg.batch_size}")
    return cfg.batch_size // per_step


def train(pairs: pl.DataFrame, student: StudentConfig, cfg: TrainingConfig, output: str) -> dict[str, Any]:
    """Train on `pairs` (instruction, input, output); save to `output` (local or remote)."""
    if pairs.height == 0:
        return {"trained": False, "reason": "no selected rows to train on"}
    try:
        import torch
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer
    except ImportError:
        raise missing_extra("trl", "train", "training") from None

    from reflectune.engines.hf import load_causal_lm

    gpu = torch.cuda.is_available()
    bf16 = gpu and torch.cuda.is_bf16_supported()
    model, tokenizer = load_causal_lm(student.model, "bfloat16" if bf16 else "float32")
    torch.set_grad_enabled(True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    world_size = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun / accelerate launch
    accumulation = accumulation_steps(cfg, world_size)
    rows, left_out = tokenized(pairs, student.template, tokenizer, cfg.max_length)
    if not rows:
        return {"trained": False, "reason": f"all {left_out} selected rows have prompts that fill training.max_length"}
    peft_config = None
    if cfg.lora:
        try:
            from peft import LoraConfig
        except ImportError:
            raise missing_extra("peft", "train", "LoRA training") from None
        peft_config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                 target_modules="all-linear", task_type="CAUSAL_LM")

    with tempfile.TemporaryDirectory(prefix="reflectune-train-") as work:
        args = SFTConfig(
            output_dir=work,
            num_train_epochs=cfg.epochs,
            learning_rate=cfg.learning_rate,
            per_device_train_batch_size=cfg.per_device_batch_size,
            gradient_accumulation_steps=accumulation,
            max_length=cfg.max_length,
            warmup_steps=cfg.warmup_ratio,  # a float below 1 is a fraction of the steps
            weight_decay=cfg.weight_decay,
            lr_scheduler_type="cosine",
            completion_only_loss=True,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            seed=cfg.seed,
            bf16=bf16,
            use_cpu=not gpu,
            disable_tqdm=True,
        )
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                             processing_class=tokenizer, peft_config=peft_config)
        result = trainer.train()
        if trainer.is_world_process_zero():  # one process writes the model
            trained = trainer.model.merge_and_unload() if cfg.lora else trainer.model
            local = os.path.join(work, "model")
            trained.save_pretrained(local, safe_serialization=True)
            tokenizer.save_pretrained(local)
            _publish(local, output)
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    losses = [entry["loss"] for entry in logged]
    return {
        "trained": True,
        "rows": len(rows),
        "rows_left_out": left_out,
        "global_batch": cfg.per_device_batch_size * accumulation * world_size,
        "devices": world_size,
        "steps": trainer.state.global_step,
        "epochs": cfg.epochs,
        "first_loss": losses[0] if losses else math.nan,
        "last_loss": losses[-1] if losses else math.nan,
        "train_loss": result.training_loss,
        # the same rows each epoch: whether training lowers the loss, which single steps on
        # different batches cannot tell
        "epoch_losses": epoch_losses(logged),
        "seconds": result.metrics.get("train_runtime"),
        "lora": cfg.lora,
    }


def epoch_losses(logged: list[dict[str, Any]]) -> list[float]:
    """The mean logged training loss of each epoch (from steps logged with their epoch)."""
    by_epoch: dict[int, list[float]] = {}
    for entry in logged:
        by_epoch.setdefault(max(1, math.ceil(entry.get("epoch", 1.0) - 1e-9)), []).append(entry["loss"])
    return [round(sum(v) / len(v), 4) for _, v in sorted(by_epoch.items())]


def _publish(local: str, output: str) -> None:
    """Move the saved model to `output`; the directory appears whole (renamed, or uploaded
    file by file with the config last so a reader never loads half a model)."""
    import shutil

    fs, path = io.filesystem(output)
    if io.is_local(fs):
        tmp = f"{path}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(local, tmp)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
        return
    names = sorted(os.listdir(local), key=lambda n: n == "config.json")
    for name in names:
        fs.put_file(os.path.join(local, name), f"{path.rstrip('/')}/{name}")
