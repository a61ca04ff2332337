"""Fine-tune the student on the selected data (TRL's SFT trainer).

Each pair becomes a prompt-completion example whose prompt is the same template P the
student scored with (or, for `chat`, the student's own chat format), so the student trains
on the format it was judged in; the loss covers the completion (response) tokens only.
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
            content = f"{r['instruction']}\n\n{r['input']}" if r["input"] else r["instruction"]
            rows.append({"prompt": [{"role": "user", "content": content}],
                         "completion": [{"role": "assistant", "content": r["output"]}]})
        else:
            rows.append({"prompt": templates.render(template, r["instruction"], r["input"]), "completion": r["output"]})
    return rows


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
    accumulation = max(1, cfg.batch_size // cfg.per_device_batch_size)
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
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(examples(pairs, student.template)),
                             processing_class=tokenizer, peft_config=peft_config)
        result = trainer.train()
        trained = trainer.model.merge_and_unload() if cfg.lora else trainer.model
        local = os.path.join(work, "model")
        trained.save_pretrained(local, safe_serialization=True)
        tokenizer.save_pretrained(local)
        _publish(local, output)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {
        "trained": True,
        "rows": pairs.height,
        "steps": trainer.state.global_step,
        "epochs": cfg.epochs,
        "first_loss": losses[0] if losses else math.nan,
        "last_loss": losses[-1] if losses else math.nan,
        "train_loss": result.training_loss,
        "seconds": result.metrics.get("train_runtime"),
        "lora": cfg.lora,
    }


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
