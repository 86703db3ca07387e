"""lora-gateway's own endpoints for comparing models: ``/v1/compare``, ``/v1/feedback``, ``/v1/routes``,
``/v1/leaderboard``. Not part of the OpenAI API; the answers embed OpenAI chat completions and chunks."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from gateway.protocol.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, ChatMessage
from gateway.settings import RouteConfig

# --- POST /v1/compare ---------------------------------------------------------------------------------------------


class CompareRequest(ChatCompletionRequest):
    """A chat request (every chat field applies) sent to several models at once."""

    model: str = Field("", description="Not used: name the models in `models`.")
    models: list[str] = Field(default_factory=list, max_length=8, description=(
        "Served models or routes to ask (each once). With `blind`, the pool two anonymous contestants are drawn "
        "from (default: every served model)."))
    model_messages: dict[str, list[ChatMessage]] | None = Field(None, description=(
        "Messages for one model instead of `messages`: a multi-turn comparison where each model sees its own "
        "earlier answers. Keys must be listed in `models`."))
    blind: bool = Field(False, description=(
        "Arena mode: two models drawn at random answer as `A` and `B`; names, variants and prompts stay hidden "
        "until a vote on the two response ids reveals them."))

    @model_validator(mode="after")
    def _check(self) -> CompareRequest:
        if self.model:
            raise ValueError("compare takes `models` (a list), not `model`")
        if not self.blind and not self.models:
            raise ValueError("models: name at least one model to compare")
        if len(set(self.models)) != len(self.models):
            raise ValueError("models: each model once")
        unknown = sorted(set(self.model_messages or {}) - set(self.models))
        if unknown:
            raise ValueError(f"model_messages: {', '.join(unknown)} not in models")
        if self.blind and self.model_messages:
            raise ValueError("model_messages: not with blind (the models are not known to the client)")
        if self.n != 1:
            raise ValueError("n: compare runs one choice per model")
        return self


class CompareMetrics(BaseModel):
    ttft_s: float | None = Field(description="Seconds from the request to the first text.")
    total_s: float = Field(description="Seconds from the request to the last token.")
    tokens_per_s: float | None = Field(description="Completion tokens divided by total_s.")
    prompt_tokens: int
    completion_tokens: int


class CompareResult(BaseModel):
    """One model's answer. In blind mode `model` is the slot (`A`, `B`) and `prompt` and `variant` are absent."""

    model: str
    variant: str | None = Field(None, description="For a route that is not blind: the variant that answered.")
    response_id: str | None = Field(None, description="The id feedback refers to (also the completion's id).")
    completion: ChatCompletion | None = None
    prompt: str | None = Field(None, description="The exact prompt text this model received.")
    metrics: CompareMetrics | None = None
    error: dict[str, Any] | None = Field(None, description="The OpenAI error object, when this model failed.")


class CompareResponse(BaseModel):
    object: Literal["compare"] = "compare"
    blind: bool
    results: list[CompareResult]


class CompareEvent(BaseModel):
    """One event of a streamed compare: a model's chat chunk, or (last for each model) its result without the
    completion (the chunks carried it)."""

    model: str
    index: int = Field(description="Position of the model in the request's `models` (or the slot).")
    chunk: ChatCompletionChunk | None = None
    result: CompareResult | None = None


# --- POST /v1/feedback ----------------------------------------------------------------------------------------------

Outcome = Literal["a", "b", "tie", "both_bad"]


class FeedbackRequest(BaseModel):
    """A score on one response, or a vote between two."""

    response_id: str | None = None
    score: float | None = Field(None, description="1 / -1 (thumbs up / down) or a number in [0, 1].")
    winner_response_id: str | None = None
    loser_response_id: str | None = None
    response_ids: list[str] | None = Field(None, min_length=2, max_length=2)
    outcome: Outcome | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> FeedbackRequest:
        kinds = [self.response_id is not None or self.score is not None,
                 self.winner_response_id is not None or self.loser_response_id is not None,
                 self.response_ids is not None or self.outcome is not None]
        if sum(kinds) != 1:
            raise ValueError("give one of: response_id + score; winner_response_id + loser_response_id; "
                             "response_ids + outcome")
        if kinds[0] and (self.response_id is None or self.score is None):
            raise ValueError("a score needs both response_id and score")
        if kinds[0] and self.score is not None and self.score != -1 and not 0 <= self.score <= 1:
            raise ValueError("score: 1 or -1 (thumbs), or a number in [0, 1]")
        if kinds[1] and (self.winner_response_id is None or self.loser_response_id is None):
            raise ValueError("a vote needs both winner_response_id and loser_response_id")
        if kinds[2] and (self.response_ids is None or self.outcome is None):
            raise ValueError("a vote needs both response_ids and outcome")
        pair = self.pair()
        if pair is not None and pair[0] == pair[1]:
            raise ValueError("a vote compares two different responses")
        return self

    def pair(self) -> tuple[str, str, Outcome] | None:
        if self.winner_response_id is not None and self.loser_response_id is not None:
            return self.winner_response_id, self.loser_response_id, "a"
        if self.response_ids is not None and self.outcome is not None:
            return self.response_ids[0], self.response_ids[1], self.outcome
        return None


class RevealedResponse(BaseModel):
    response_id: str
    model: str
    route: str | None = None


class FeedbackResponse(BaseModel):
    object: Literal["feedback"] = "feedback"
    kind: Literal["score", "vote"]
    score: float | None = Field(None, description="The stored score, in [0, 1] (a thumbs-down is 0).")
    outcome: Outcome | None = None
    revealed: list[RevealedResponse] = Field(description="Which model gave each response (the arena's reveal).")


# --- /v1/routes -----------------------------------------------------------------------------------------------------


class RouteObject(BaseModel):
    id: str
    object: Literal["route"] = "route"
    variants: dict[str, float]
    sticky: Literal["user", "header", "none"]
    blind: bool


class RouteList(BaseModel):
    object: Literal["list"] = "list"
    data: list[RouteObject]


RouteUpdate = RouteConfig

# --- GET /v1/leaderboard --------------------------------------------------------------------------------------------


class ModelRating(BaseModel):
    model: str
    rating: float = Field(description="Bradley-Terry rating on the Elo scale (400 / ln 10 per unit, base 1000).")
    ci_low: float = Field(description="2.5 % bootstrap quantile.")
    ci_high: float = Field(description="97.5 % bootstrap quantile.")
    battles: int
    wins: int
    losses: int
    ties: int
    win_rate: float = Field(description="(wins + ties / 2) / battles.")


class VariantRow(BaseModel):
    route: str | None = Field(description="The route that sent these requests; null for requests naming the model.")
    model: str
    requests: int
    errors: int
    latency_p50_s: float | None
    latency_p95_s: float | None
    completion_tokens: int
    scores: int
    mean_score: float | None
    score_ci_low: float | None
    score_ci_high: float | None


class Leaderboard(BaseModel):
    object: Literal["leaderboard"] = "leaderboard"
    battles: int
    bootstrap_rounds: int
    models: list[ModelRating]
    variants: list[VariantRow]
