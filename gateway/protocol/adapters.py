"""The adapter admin API (ours; no OpenAI counterpart) and vLLM's runtime LoRA bodies, accepted as they are."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from gateway.protocol.common import RequestBody


class LoadAdapterRequest(RequestBody):
    """``POST /v1/adapters``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(description="The name clients will use as `model`.")
    path: str = Field(description="The LoRA folder; relative paths are taken inside the adapter roots.")
    base: str | None = Field(None, description="The base it was trained on; must be the served base if given.")
    template: str | None = Field(None, description="Chat template; detected from the folder when unset.")


class VLLMLoadLoraRequest(RequestBody):
    """vLLM's ``POST /v1/load_lora_adapter`` body."""

    model_config = ConfigDict(extra="allow", strict=True)

    lora_name: str
    lora_path: str


class VLLMUnloadLoraRequest(RequestBody):
    """vLLM's ``POST /v1/unload_lora_adapter`` body."""

    model_config = ConfigDict(extra="allow", strict=True)

    lora_name: str
    lora_int_id: int | None = None


class AdapterObject(BaseModel):
    id: str = Field(description="The adapter's name (the `model` clients send).")
    object: Literal["adapter"] = "adapter"
    path: str = Field(description="The real folder the weights are loaded from.")
    state: Literal["loaded", "on_disk", "loading", "unloading", "refused"]
    reason: str | None = Field(None, description="For state `refused`: why the backend cannot serve it.")
    source: Literal["config", "api", "root"] = Field(description="Configured, loaded through this API, or found "
                                                                 "under an adapter root.")
    size_bytes: int = Field(description="Size of the adapter weights file.")
    rank: int
    target_modules: list[str]
    template: str
    template_source: str
    last_used: float | None = Field(None, description="Unix time of the last request that used it.")
    in_flight: int = Field(description="Requests using it right now.")
    pinned: bool
    loads: int = Field(description="How many times it was loaded into the backend (evictions make it reload).")
    tool_policy: Literal["auto", "render", "ignore"] = Field("auto", description="What it does with `tools`.")
    tool_handling: str = Field("", description="When it renders a request's tools, and how we know.")
    sampling_defaults: dict[str, float | int] = Field(
        {}, description="What a request that leaves these sampling parameters out gets.")


class AdapterList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AdapterObject]


class AdapterDeleted(BaseModel):
    id: str
    object: Literal["adapter"] = "adapter"
    deleted: bool = True
