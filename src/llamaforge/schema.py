"""The sections of the job schema, one pydantic model each.

Kept apart from `config.py` (which assembles the job and loads YAML) so that feature modules can
define their own sections on the same base without importing the whole job schema.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator, model_validator

from llamaforge.registry import METHODS, OPTIMIZERS

TemplateName = Literal["auto", "model", "llama3", "chatml", "alpaca", "raw"]
DataFormat = Literal["auto", "alpaca", "sharegpt", "messages", "text", "feedback"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    source: str = Field(
        "smollm2-135m-instruct",
        description="catalog name (llamaforge models list), local transformers folder, .gguf file, or hub id",
    )
    revision: str | None = Field(None, description="hub revision (hub ids only)")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype the base weights are held in; bf16 autocast still applies in training"
    )
    quantization: Literal["none", "4bit", "8bit"] = Field("none", description="load the base quantized")
    quantization_backend: Literal["auto", "bitsandbytes", "torchao"] = Field(
        "auto",
        description="4-bit (QLoRA) backend: auto = bitsandbytes where it runs on the device, else torchao NF4",
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    trust_remote_code: bool = False


class FeedbackOptions(Section):
    """How a `format: feedback` source (the server's feedback.jsonl) becomes examples (data/feedback.py)."""

    kind: Literal["sft", "binary", "pairs"] = Field(
        "binary",
        description="sft: corrections as answers; binary (KTO): rated answers labelled good/bad, corrections "
        "good; pairs (DPO/ORPO): correction over the original answer, and better- over worse-rated answers "
        "to the same prompt",
    )
    since: str | None = Field(None, description="only feedback given at or after this UTC time (ISO 8601)")
    until: str | None = Field(None, description="only feedback given before this UTC time (ISO 8601)")
    good_from: int = Field(4, ge=1, le=5, description="a 1-5 rating at or above this is good (like up)")
    bad_to: int = Field(2, ge=1, le=5, description="a 1-5 rating at or below this is bad (like down)")

    @field_validator("since", "until")
    @classmethod
    def _iso(cls, value: str | None) -> str | None:
        from datetime import datetime

        if value is not None:
            try:
                datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError:
                raise ValueError(f"{value!r} is not an ISO 8601 time, e.g. 2026-11-30T18:00:00Z") from None
        return value

    @model_validator(mode="after")
    def _order(self) -> FeedbackOptions:
        if self.bad_to >= self.good_from:
            raise ValueError(f"bad_to ({self.bad_to}) must be below good_from ({self.good_from})")
        return self


class DataSource(Section):
    path: str = Field(description="a .json/.jsonl/.csv/.parquet/.txt file, or a catalog dataset name")
    format: DataFormat = "auto"
    max_samples: int | None = Field(None, ge=1, description="take at most this many records")
    repeat: int = Field(1, ge=1, description="repeat the source this many times (upsampling small sets)")
    variables: dict[str, str] = Field(
        default_factory=dict, description="values for {{placeholders}} in the records, e.g. name, author"
    )
    feedback: FeedbackOptions = Field(
        default_factory=FeedbackOptions, description="format: feedback only: which examples, which window"
    )


class DataConfig(Section):
    sources: list[DataSource] = Field(
        default_factory=lambda: [
            DataSource(  # identity's first 16 records are its English ones (the other 75 are Chinese)
                path="identity",
                max_samples=16,
                repeat=8,
                variables={"name": "Forge", "author": "the llamaforge team"},
            ),
            DataSource(path="alpaca-demo", max_samples=200),
        ]
    )
    val_sources: list[DataSource] = Field(default_factory=list, description="explicit validation sets")
    val_size: float = Field(
        0.1, ge=0, description="fraction (<1) or count (>=1) held out when no val_sources"
    )
    template: TemplateName = Field("auto", description="auto = the model's own chat template when it has one")
    system_prompt: str | None = None
    max_length: int = Field(1024, ge=16, description="longer records are rejected (kept in rejects.jsonl)")
    train_on_prompt: bool = Field(False, description="also train on user/system tokens")
    strict: bool = Field(False, description="stop at the first bad record instead of rejecting it")
    seed: int = 42
    prepared: str | None = Field(
        None,
        description="a `llamaforge prepare` output folder: train on its train/val splits as they are "
        "(data.sources, data.val_sources and data.val_size then stay unset)",
    )

    @model_validator(mode="after")
    def _prepared_alone(self) -> DataConfig:
        if self.prepared is None:
            return self
        fields = type(self).model_fields
        given = [
            f"data.{name}"
            for name in ("sources", "val_sources", "val_size")
            if getattr(self, name) != fields[name].get_default(call_default_factory=True)
        ]
        if given:
            raise ValueError(
                "data.prepared trains on the prepare output's own train/val splits: leave "
                f"{', '.join(given)} unset"
            )
        return self


class MethodConfig(Section):
    name: str = Field(
        "lora", description="a registered training method: lora, qlora, dora, full, prefix, ..."
    )
    rank: int = Field(16, ge=1)
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    targets: str | list[str] = Field("all-linear", description="'all-linear', 'attention', or module names")
    rslora: bool = False
    modules_to_save: list[str] = Field(
        default_factory=list,
        description="also train these fully, e.g. [embed_tokens, lm_head] for base models",
    )
    num_virtual_tokens: int = Field(20, ge=1, description="prefix tuning only")
    objective: Literal["sft", "dpo", "kto", "orpo"] = Field(
        "sft",
        description="sft on conversations; dpo/orpo on {prompt, chosen, rejected} pairs; kto on "
        "{prompt, completion, label} records (train/preference.py)",
    )
    beta: float = Field(
        0.1, gt=0, description="dpo/kto: strength of the pull to the reference; orpo: odds-ratio weight"
    )
    precompute_reference: bool = Field(
        False, description="dpo/kto: reference log-probs computed once before training (required for full)"
    )
    desirable_weight: float = Field(1.0, gt=0, description="kto: weight of the desirable examples' loss")
    undesirable_weight: float = Field(1.0, gt=0, description="kto: weight of the undesirable examples' loss")

    @field_validator("name")
    @classmethod
    def _registered(cls, value: str) -> str:
        return METHODS.check(value)


class TrainConfig(Section):
    epochs: float = Field(3.0, gt=0)
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; overrides epochs")
    batch_size: PositiveInt | Literal["auto"] = Field(
        "auto",
        description="micro-batch size per device; auto = the planner picks the one that fits "
        "train.memory_fraction of the free memory at the best throughput, and train.grad_accum makes up "
        "train.effective_batch_size",
    )
    grad_accum: int = Field(
        1, ge=1, description="micro-batches per optimizer step (derived when batch_size is auto)"
    )
    effective_batch_size: int | None = Field(
        None,
        ge=1,
        description="examples (packed rows) per optimizer step over all devices; "
        "default batch_size x grad_accum x devices, or 8 when batch_size is auto",
    )
    micro_batch_tokens: PositiveInt | Literal["auto"] | None = Field(
        "auto",
        description="most padded tokens (rows x longest row) in one micro-batch: a longer micro-batch is "
        "split into smaller ones within the same optimizer step (the same gradient, a fraction of the "
        "activation memory; a single longer row stays whole); auto = 512 on CPU, where more tokens buy no "
        "speed (the quickstart, AMD EPYC AVX2, jemalloc: peak RSS 2.2 GB against 4.3 at the same tokens/s), none "
        "on GPUs; "
        "null = never split. Padded rows only: not with packing, preference objectives, FSDP or DeepSpeed",
    )
    memory_fraction: float = Field(
        0.6,
        gt=0,
        le=1,
        description="share of the memory available to this process (or of the GPU's free "
        "memory) that batch_size / gradient_checkpointing auto may plan for",
    )
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    max_grad_norm: float = Field(1.0, ge=0, description="0 disables clipping")
    precision: Literal["auto", "bf16", "fp32", "fp16"] = Field(
        "auto",
        description="auto = what this hardware does fast: bf16 on Ampere+ GPUs (fp16 with a loss scaler "
        "before), on CPUs bf16 only with bf16 instructions and a probe showing it faster, else fp32",
    )
    gradient_checkpointing: bool | Literal["auto"] = Field(
        "auto",
        description="recompute activations in backward (~30% more compute, far less memory); "
        "auto = only when no micro-batch fits without it",
    )
    packing: bool = Field(
        False,
        description="several examples per row (position ids restart, no attention across them); "
        "batch_size then counts packed rows of pack_length tokens",
    )
    pack_length: int | None = Field(
        None,
        ge=16,
        description="tokens per packed row; default data.max_length. sdpa attends over the whole "
        "row (block-diagonal mask), so shorter rows are cheaper; longer examples get a row of their own",
    )
    loss_chunk_size: int = Field(1024, ge=1, description="tokens per chunk of the chunked cross-entropy")
    release_memory: Literal["step", "eager", "off"] = Field(
        "off",
        description="CPU memory (glibc malloc): step = hand the heap's free pages back after every "
        "optimizer step, eval and generation (no growth from step to step); eager = also map each block "
        "over 64 KiB on its own and unmap it when freed (the lowest peak, ~1.5x less RSS, but page faults "
        "cost ~35% more CPU time); off = glibc's defaults, the default: on the quickstart (AMD EPYC AVX2) "
        "step peaked at 6.12 GB and 96.7 tokens/s against off's 6.23 GB and 104.3. Left alone when "
        "MALLOC_* variables or a preloaded jemalloc/tcmalloc are set",
    )
    allocator: Literal["auto", "jemalloc", "system"] = Field(
        "auto",
        description="CPU memory allocator of `llamaforge train`: auto = jemalloc when the library is "
        "installed (the command re-runs itself once with it preloaded, and says so), else the C "
        "library's malloc; jemalloc = required; system = never preload. A preloaded jemalloc/tcmalloc "
        "is kept as it is. On the quickstart's first 12 steps (AMD EPYC AVX2) jemalloc peaked at 2.99 GB "
        "against glibc's 4.23 GB, at 103.5 vs 104.7 tokens/s",
    )
    eval_every: int = Field(0, ge=0, description="optimizer steps between evals; 0 = at each epoch end only")
    log_every: int = Field(1, ge=1)
    save_every: int = Field(0, ge=0, description="steps between resumable checkpoints; 0 = none")
    keep_checkpoints: int = Field(2, ge=1)
    seed: int = 42
    early_stopping_patience: int | None = Field(
        None, ge=0, description="stop after this many evals without an eval-loss improvement; 0/None = off"
    )
    early_stopping_min_delta: float = Field(
        0.0, ge=0, description="an eval loss must beat the best by more than this to reset the patience"
    )
    load_best_at_end: bool | None = Field(
        None,
        description="save the best-by-eval-loss weights (kept in checkpoints/best) rather than the last; "
        "None = true when eval_every is set",
    )
    overfit_warning_evals: int = Field(
        3,
        ge=0,
        description="warn when the eval loss rises this many evals in a row while the train loss falls; "
        "0 = off",
    )
    optimizer: str = Field(
        "adamw",
        description="a registered optimizer: adamw (torch, fused kernel); adamw_8bit / paged_adamw_8bit "
        "(bitsandbytes, 8-bit states; paging needs CUDA); sgd (momentum 0.9)",
    )
    deterministic: bool = Field(
        False,
        description="deterministic kernels only (torch.use_deterministic_algorithms), all RNGs seeded: "
        "a rerun gives the same losses and weights, possibly slower",
    )
    trackers: list[Literal["tensorboard", "mlflow"]] = Field(
        default_factory=list,
        description="besides metrics.jsonl (always): tensorboard (run_dir/tensorboard), "
        "mlflow (train.mlflow_uri)",
    )
    mlflow_uri: str | None = Field(
        None, description="MLflow tracking URI; None = a local store in run_dir/mlruns"
    )
    mlflow_experiment: str = Field("llamaforge", description="MLflow experiment the run is logged under")

    @field_validator("optimizer")
    @classmethod
    def _registered(cls, value: str) -> str:
        return OPTIMIZERS.check(value)

    @field_validator("release_memory", mode="before")
    @classmethod
    def _yaml_off(cls, value):
        """YAML 1.1 reads a bare `off` as false: that is the "off" the user wrote."""
        return "off" if value is False else value

    @model_validator(mode="after")
    def _check_batch(self) -> TrainConfig:
        if self.batch_size == "auto":
            if self.grad_accum != 1:
                raise ValueError(
                    "train.grad_accum is derived when train.batch_size is auto: set "
                    "train.effective_batch_size instead (or a fixed train.batch_size)"
                )
        elif self.effective_batch_size is not None and self.effective_batch_size % (
            self.batch_size * self.grad_accum
        ):
            raise ValueError(
                f"train.effective_batch_size={self.effective_batch_size} is not a multiple of "
                f"train.batch_size x train.grad_accum = {self.batch_size * self.grad_accum}"
            )
        return self

    def target_effective_batch(self) -> int:
        """Examples per optimizer step over all devices that auto batch sizing keeps."""
        if self.effective_batch_size is not None:
            return self.effective_batch_size
        return 8 if self.batch_size == "auto" else self.batch_size * self.grad_accum


class EvalConfig(Section):
    prompts: list[str] = Field(
        default_factory=lambda: ["Who are you?"], description="answered before and after training"
    )
    max_new_tokens: int = Field(96, ge=1)
    before_after: bool = Field(True, description="eval loss and sample answers before training too")
    sample_size: int = Field(
        0,
        ge=0,
        description="at each eval, answer the first N validation records (greedy, max_new_tokens) "
        "and log BLEU-4, ROUGE and exact match against their reference answers; 0 = off",
    )
    general: bool = Field(
        False,
        description="after training, score base and tuned on the general suite (evaluation.general "
        "settings): <run>/general/results.*, and `general` in summary.json",
    )


class OutputConfig(Section):
    dir: str = "runs"
    name: str | None = Field(None, description="run name; default: <model>-<method>-<timestamp>")
    overwrite: bool = Field(False, description="replace an existing run folder (only one llamaforge created)")

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: str | None) -> str | None:
        """A run folder may be replaced: its name must not reach outside output.dir."""
        from llamaforge.atomic import name_problem

        problem = name_problem(name) if name is not None else None
        if problem:
            raise ValueError(problem)
        return name
