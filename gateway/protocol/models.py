"""``/v1/models``: every base and adapter the gateway serves."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "lora-gateway"
    root: str | None = Field(None, description="The folder the weights come from.")
    parent: str | None = Field(None, description="For an adapter: the id of its base model.")
    # --- lora-gateway extensions ---
    template: str = Field(description="The chat template this model's prompts are rendered with.")
    template_source: str = Field(description="Why that template: which rule or file decided it.")
    max_model_len: int | None = None
    tool_policy: Literal["auto", "render", "ignore"] = Field(
        "auto", description="What this model does with a request's `tools` (see README: tool policy).")
    tool_handling: str = Field("", description="When this model renders a request's tools, and how we know.")
    sampling_defaults: dict[str, float | int] = Field(
        {}, description="What a request that leaves these sampling parameters out gets.")
    state: Literal["available", "refused"] = Field(
        "available", description="`refused`: a configured adapter the backend cannot serve; requests get a 422.")
    reason: str | None = Field(None, description="Why a refused adapter cannot be served.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]
