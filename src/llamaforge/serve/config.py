"""The `serve` section of a job: what to serve, who may call it, and what is logged and refused."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from llamaforge.schema import Section, TemplateName


class AuditConfig(Section):
    path: str | None = Field(None, description="JSON-lines audit log (one line per request); off when unset")
    max_bytes: int = Field(10_000_000, ge=1024, description="rotate the log when it passes this size")
    backups: int = Field(5, ge=0, description="rotated files kept (audit.jsonl.1 ... .N)")
    redact_pii: bool = Field(
        True, description="redact PII in prompts and answers with the data curation's detector"
    )
    log_text: bool = Field(
        True, description="record prompt and response text (False: only counts and timings)"
    )
    max_field_chars: int = Field(
        4096, ge=64, description="longer prompts, answers and other fields are cut to this many characters"
    )


class ModerationConfig(Section):
    blocklist: list[str] = Field(
        default_factory=list, description="words or phrases refused (whole words, any case)"
    )
    endpoint: str | None = Field(
        None, description="an OpenAI-compatible /v1/moderations URL (e.g. a Llama Guard deployment)"
    )
    endpoint_model: str | None = Field(None, description="the `model` field sent to the endpoint")
    endpoint_api_key_env: str | None = Field(
        None, description="environment variable holding the endpoint's key"
    )
    timeout_s: float = Field(5.0, gt=0)
    fail_closed: bool = Field(
        True, description="refuse requests when the endpoint is unreachable (False: let them through)"
    )
    check_output: bool = True
    stream_window_chars: int = Field(
        256,
        ge=1,
        description="streamed answers go to the endpoint every this many characters; text leaves the server "
        "only once checked",
    )
    refusal: str = "I can't help with that request."


class ServeConfig(Section):
    model: str = Field(
        "smollm2-135m-instruct", description="a run directory or any model source (catalog, folder)"
    )
    served_model_name: str | None = Field(
        None, description="name of the base in /v1/models (default: the source)"
    )
    adapters: dict[str, str] = Field(
        default_factory=dict, description="name -> adapter folder loaded at start"
    )
    adapter_dirs: list[str] = Field(
        default_factory=lambda: ["runs"],
        description="hot-loaded adapters must live under one of these folders",
    )
    allow_adapter_loading: bool = Field(
        True,
        description="enable /v1/load_lora_adapter and /v1/unload_lora_adapter (with API keys: admin keys only)",
    )
    max_adapters: int = Field(8, ge=0, description="adapters loaded at once (at start and at runtime)")
    max_lora_rank: int = Field(256, ge=1, description="adapters of a higher LoRA rank are refused")
    template: TemplateName = Field("auto", description="chat template when the model or adapter carries none")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    dtype: Literal["float32", "bfloat16"] = "float32"
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="auto: bf16 autocast where fast")
    max_batch_size: int = Field(16, ge=1, description="requests decoded together in one forward")
    mixed_adapter_batches: bool = Field(
        True, description="batch requests for different adapters into one forward (peft adapter_names)"
    )
    batch_wait_ms: float = Field(
        5.0, ge=0, description="wait this long for more requests before a batch starts"
    )
    max_queue: int = Field(64, ge=1, description="waiting requests beyond this get 429 with Retry-After")
    prefix_cache_tokens: int = Field(
        4096,
        ge=0,
        description="keep the KV of this many prompt-prefix tokens (LRU) so requests starting alike (a shared "
        "system prompt) skip its prefill; memory: tokens x layers x 2 x kv_heads x head_dim x dtype bytes; 0: off",
    )
    prefix_block_size: int = Field(
        16, ge=1, le=1024, description="prefix cache granularity: prompts share cached KV in whole blocks"
    )
    max_model_len: int | None = Field(None, ge=16, description="context limit (default: the model's)")
    engine: str = Field(
        "auto",
        description="what decodes (a registry.ENGINES name): auto picks vLLM on CUDA when installed, llama.cpp "
        "on CPU when built (`make serve-cpu`), else transformers (in process); or llamacpp, vllm, transformers",
    )
    gguf_dtype: Literal["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q4_k_m", "q5_k_m", "q6_k"] = Field(
        "q8_0",
        description="llama.cpp engine: the GGUF type the base model is converted to (cached); the K-quants "
        "q4_k_m, q5_k_m, q6_k are made by llama.cpp's llama-quantize",
    )
    engine_threads: int | None = Field(
        None, ge=1, description="llama.cpp engine: CPU threads (default: all cores)"
    )
    engine_start_timeout_s: float = Field(
        600.0, gt=0, description="an engine process not healthy after this long fails to start"
    )
    engine_wait_s: float = Field(
        120.0,
        gt=0,
        description="requests wait this long in the gateway for an engine being (re)started before a 503",
    )
    default_max_tokens: int = Field(256, ge=1)
    default_temperature: float = Field(
        1.0, ge=0, le=2, description="OpenAI's default when a request sets none"
    )
    api_keys_file: str | None = Field(
        None,
        description="file with one key per line: `key`, `name:key`, or `name:key:admin` (may load adapters)",
    )
    api_keys_env: str = Field(
        "LLAMAFORGE_API_KEYS", description="comma-separated keys (or name:key) in this env var"
    )
    max_request_bytes: int = Field(
        4_000_000, ge=1024, description="larger request bodies get 413 before they are read"
    )
    max_prompt_chars: int | None = Field(
        None, ge=1, description="longer prompts get 400 before tokenizing (default: 16 per token of context)"
    )
    rate_limit_per_minute: int = Field(0, ge=0, description="requests per key per minute (0: unlimited)")
    metrics_prefix: str = Field(
        "vllm:", description="vLLM's metric names, so its Grafana dashboards work as is"
    )
    audit: AuditConfig = Field(default_factory=AuditConfig)
    state_dir: str | None = Field(
        None,
        description="where the canary routing table is kept across restarts (routes.json; default: the "
        "audit log's folder; neither set: not kept)",
    )
    moderation: ModerationConfig = Field(default_factory=ModerationConfig)
