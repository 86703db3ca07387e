"""One frozen settings object: defaults < YAML file < ``GATEWAY_*`` environment < command-line flags.

Field descriptions double as ``--help`` text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict


class SettingsError(ValueError):
    """A setting is missing or wrong; the message is a sentence for the user."""


ToolPolicy = Literal["auto", "render", "ignore"]
GenerationConfigMode = Literal["auto", "none"]


class SamplingDefaultsConfig(BaseModel):
    """Sampling defaults for a model, used for the parameters a request leaves out (``sampling_defaults:``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)

    def values(self) -> dict[str, float | int]:
        return {k: v for k, v in self.model_dump().items() if v is not None}


class AdapterConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(description="The name clients use as `model`.")
    path: str = Field(description="The LoRA folder (a LLaMA-Factory run folder or a checkpoint-N inside it).")
    template: str | None = Field(None, description="Chat template for this adapter; detected when unset.")
    training_config: str | None = Field(None, description=(
        "The LLaMA-Factory YAML it was trained with (`llamafactory-cli train FILE`); its `template:` is used."))
    tool_policy: ToolPolicy | None = Field(None, description="What to do with a request's `tools` for this adapter "
                                                             "(default: the base's --tool-policy).")
    sampling_defaults: SamplingDefaultsConfig | None = Field(
        None, description="Sampling defaults of this adapter, over its generation_config.json and the base's.")


DEFAULT_MAX_ADAPTERS_WITH_ROOTS = 16  # r=8..64 adapters of a 7B model: well under 2 GB together


class RouteConfig(BaseModel):
    """A virtual model that sends each request to one of its variants (an A/B split)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    variants: dict[str, float] = Field(description="Served model name -> weight (relative; 0 keeps it, unused).")
    sticky: Literal["user", "header", "none"] = Field("user", description=(
        "What keeps a client on one variant: the request's `user` field, the `X-Session-Id` header, or nothing "
        "(random per request). A request without the key is assigned at random."))
    blind: bool = Field(False, description="Hide which variant served a request (the response names the route).")

    @field_validator("variants", mode="after")
    @classmethod
    def _weights(cls, variants: dict[str, float]) -> dict[str, float]:
        if not variants:
            raise ValueError("a route needs at least one variant")
        if any(w < 0 or w != w for w in variants.values()):
            raise ValueError("variant weights must be numbers >= 0")
        if not any(w > 0 for w in variants.values()):
            raise ValueError("at least one variant needs a weight above 0")
        return variants


Backend = Literal["torch", "vllm", "lmdeploy", "ollama", "openai"]
Device = Literal["auto", "cpu", "cuda", "npu"]
DType = Literal["auto", "float32", "bfloat16", "float16"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GATEWAY_", frozen=True, extra="forbid")

    model: str | None = Field(None, description="Base model folder (or, with an upstream backend, its name there).")
    served_model_name: str | None = Field(None, description="The id clients use for the base; default: folder name.")
    adapters: tuple[AdapterConfig, ...] = Field((), description="LoRA adapters served on the base.")
    template: str | None = Field(None, description="Chat template of the base model; detected when unset.")
    backend: Backend = Field("torch", description="Inference engine: native torch, or an upstream server.")
    upstream: tuple[str, ...] = Field((), description="Upstream server URLs (for upstream backends).")
    tokenizer: str | None = Field(None, description="Tokenizer folder when --model is not a local folder.")
    upstream_model: str | None = Field(
        None, description="The base model's name on the upstream; default: --model, or discovered from the upstream."
    )
    upstream_api_key: str | None = Field(None, description="Bearer token the gateway sends to the upstream.")
    upstream_connect_timeout: float = Field(2.0, gt=0, description="Seconds to connect to an upstream replica.")
    upstream_first_byte_timeout: float = Field(
        120.0, gt=0, description="Seconds an upstream may take to start answering (prefill included)."
    )
    upstream_idle_timeout: float = Field(60.0, gt=0, description="Longest silence inside an upstream stream, seconds.")
    upstream_health_interval: float = Field(5.0, ge=0, description="Seconds between upstream health checks (0: off).")
    upstream_adapter_paths: dict[str, str] = Field(
        {},
        description="LOCAL=REMOTE: an adapter folder prefix as the gateway sees it and as the upstream sees it "
        "(vLLM in a container or on another host).",
    )
    upstream_runtime_adapters: bool = Field(
        True, description="vLLM: load adapters it does not serve with /v1/load_lora_adapter."
    )
    tool_policy: ToolPolicy | None = Field(None, description=(
        "What to do with a request's `tools`, for the base and for adapters that set none: render (into the "
        "prompt, as the template's tool format), ignore (render as if absent; header x-gateway-tools-ignored), or "
        "auto (default: render for models known to be trained with tools, or when the request sets tool_choice)."))
    adapter_tool_policies: dict[str, ToolPolicy] = Field({}, description=(
        "NAME=POLICY: the tool policy of one adapter (configured, demo or under a root), over its config's."))
    history_overflow: Literal["drop_oldest", "error"] = Field("drop_oldest", description=(
        "A chat too long for the context: drop its oldest turns (keeping system messages and the last user "
        "message; header x-gateway-messages-dropped), or answer 400 context_length_exceeded (error)."))
    generation_config: GenerationConfigMode = Field("auto", description=(
        "auto: a request that leaves out temperature, top_p, top_k, min_p or repetition_penalty gets the model's "
        "generation_config.json values (an adapter folder's own file wins over the base's); none: OpenAI's "
        "defaults (sampling_defaults from the config still apply)."))
    sampling_defaults: SamplingDefaultsConfig | None = Field(
        None, description="Sampling defaults of the base (and its adapters), over generation_config.json.")
    decode_clean_up: Literal["tokenizer", "always", "never"] = Field("tokenizer", description=(
        "Clean up tokenization spaces in answers (\"ChatGPT ?\" -> \"ChatGPT?\"), streamed and not alike: as the "
        "served tokenizer's clean_up_tokenization_spaces says, always (LLaMA-Factory's non-streamed answers), or "
        "never."))
    stop_on_model_eos: bool = Field(False, description=(
        "Chats also stop on every eos id of the base's config.json / generation_config.json; by default they stop "
        "where LLaMA-Factory stops: the template's eos and stop words only."))
    device: Device = Field("auto", description="Where the native backend runs: cuda, npu (torch-npu) or cpu.")
    dtype: DType = Field("auto", description="Weights dtype for the native backend (auto: bf16 on GPU, fp32 on CPU).")
    max_batch_size: int = Field(8, ge=1, description="Most sequences decoded together by the native engine.")
    max_queue: int = Field(256, ge=1, description="Most requests waiting for a batch slot before 429.")
    max_model_len: int | None = Field(None, ge=16, description="Context length; default: the model's own.")
    max_body_bytes: int = Field(4 << 20, ge=1024, description=(
        "Largest request body accepted, in bytes (larger: 413); default 4 MiB."))
    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8000, ge=0, le=65535, description="Port to listen on.")
    api_key: str | None = Field(None, description=(
        "A client key (NAME:KEY or KEY); with any key set, clients must send `Authorization: Bearer <key>`."))
    api_keys: tuple[str, ...] = Field((), description="Client keys, each NAME:KEY or KEY (the name shows in logs "
                                      "and metrics, never the key).")
    api_key_file: str | None = Field(None, description="File with one client key per line (NAME:KEY or KEY; "
                                     "# comments).")
    metrics_auth: bool = Field(False, description=(
        "`/metrics` needs a key (a client key or the admin key); by default it is open, like vLLM's."))
    rate_limit_rpm: int | None = Field(None, ge=1, description="Requests per minute per key (429 beyond).")
    rate_limit_tpm: int | None = Field(None, ge=1, description=(
        "Prompt + completion tokens per minute per key, counted when each request ends (429 beyond)."))
    max_concurrent_per_key: int | None = Field(None, ge=1, description=(
        "Generation requests (streamed or not) one key may have in flight at once (429 beyond)."))
    rate_limit_storage: str = Field("memory://", description=(
        "Where the `limits` library keeps the counts: memory:// (this process) or redis://HOST:PORT (shared)."))
    max_messages: int = Field(2048, ge=1, description="Most messages in one chat request (400 beyond).")
    max_tools: int = Field(128, ge=0, description="Most tools in one chat request (400 beyond).")
    max_tools_bytes: int = Field(512 << 10, ge=1, description="Largest size of a request's tool definitions, bytes.")
    cors_origins: tuple[str, ...] = Field((), description=(
        "Browser origins allowed to call the API (CORS; `*` for any); none by default."))
    adapter_scan_interval: float = Field(5.0, ge=0, description=(
        "Seconds a listing of the --adapter-root folders is reused before it is read again (in a thread)."))
    demo: bool = Field(False, description="Serve the demo models (built locally on first use).")
    adapter_roots: tuple[str, ...] = Field((), description=(
        "Folder of LoRA run folders: a request for `model=RUN` or `model=RUN/checkpoint-N` under it loads that "
        "adapter on first use. When set, adapters load only from inside these folders."))
    max_adapters: int | None = Field(None, ge=1, description=(
        "Most adapters resident at once; the least recently used idle one is evicted (default: no limit, or "
        f"{DEFAULT_MAX_ADAPTERS_WITH_ROOTS} with --adapter-root, where clients choose what loads)."))
    pins: tuple[str, ...] = Field((), description="Adapter names that stay resident, never evicted.")
    allow_unsafe_adapters: bool = Field(False, description=(
        "Also load pickle weights (adapter_model.bin); by default only safetensors are loaded."))
    admin_key: str | None = Field(None, description=(
        "If set, the adapter admin endpoints require `Authorization: Bearer <admin key>`."))
    routes: dict[str, RouteConfig] = Field({}, description=(
        "Virtual models splitting traffic between variants: NAME=VARIANT:WEIGHT,...[;sticky=user|header|none]"
        "[;blind]."))
    feedback_db: str | None = Field(None, description=(
        "SQLite file for responses, feedback and votes (default: feedback.sqlite3 in the user data folder; "
        "`:memory:` keeps nothing)."))
    feedback_store_text: bool = Field(False, description=(
        "Also store each response's prompt and answer text with its record (off: only hashes and figures)."))
    drain_timeout: int = Field(30, ge=0, description=(
        "On SIGTERM: seconds requests in flight (streams included) may take to finish before they are cut."))
    workers: int = Field(1, ge=1, description=(
        "Gateway processes sharing the port (upstream backends only; adapters then come from the config and "
        "--adapter-root, the admin API cannot load or unload)."))

    @field_validator("adapters", mode="after")
    @classmethod
    def _unique_adapter_names(cls, adapters: tuple[AdapterConfig, ...]) -> tuple[AdapterConfig, ...]:
        names = [a.name for a in adapters]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"adapter names must be unique; repeated: {', '.join(duplicates)}")
        return adapters

    def adapter_limit(self) -> int | None:
        """``max_adapters``, or its default: bounded when adapter roots let clients pick what gets loaded."""
        if self.max_adapters is not None or not self.adapter_roots:
            return self.max_adapters
        return max(DEFAULT_MAX_ADAPTERS_WITH_ROOTS, len(self.pins))

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings

    @classmethod
    def load(cls, config_file: Path | None = None, **overrides: Any) -> Settings:
        """Build settings from a YAML file, the environment and explicit overrides (``None`` values ignored)."""
        import os

        data: dict[str, Any] = {}
        if config_file is not None:
            try:
                data = yaml.safe_load(config_file.read_text(encoding="utf-8")) or {}
            except OSError as exc:
                raise SettingsError(f"cannot read config file {config_file}: {exc.strerror}") from exc
            if not isinstance(data, dict):
                raise SettingsError(f"config file {config_file} must hold a mapping of settings")
        # The environment beats the file: drop file keys that a GATEWAY_ variable sets.
        data = {k: v for k, v in data.items() if f"GATEWAY_{k.upper()}" not in os.environ}
        data.update({k: v for k, v in overrides.items() if v is not None})
        try:
            settings = cls(**data)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise SettingsError(f"setting {where!r}: {first['msg']}") from exc
        if settings.model is None and not settings.demo:
            raise SettingsError("no model to serve: give --model DIR (or --demo to serve the demo models)")
        if settings.max_adapters is not None and len(settings.pins) > settings.max_adapters:
            raise SettingsError(f"--pin names {len(settings.pins)} adapters but --max-adapters is "
                                f"{settings.max_adapters}: pinned adapters must fit")
        if settings.workers > 1 and settings.backend == "torch":
            raise SettingsError(f"--workers {settings.workers} needs an upstream backend: the torch backend holds the "
                                "model in its process, so each worker would load its own copy; use one worker "
                                "(it batches requests) or run more replicas")
        if settings.backend != "torch" and not settings.upstream:
            raise SettingsError(f"--backend {settings.backend} needs at least one --upstream URL")
        return settings
