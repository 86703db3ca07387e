"""``POST /v1/feedback`` (scores and pairwise votes) and ``GET /v1/leaderboard``."""

from __future__ import annotations

import anyio
from fastapi import APIRouter, Depends, Query

from gateway.errors import NotFound
from gateway.experiments.ratings import bradley_terry, variant_figures
from gateway.protocol.experiments import (
    FeedbackRequest,
    FeedbackResponse,
    Leaderboard,
    ModelRating,
    RevealedResponse,
)
from gateway.routes.deps import gateway_state, require_api_key
from gateway.state import GatewayState

router = APIRouter(dependencies=[Depends(require_api_key)])


@router.post("/v1/feedback")
async def give_feedback(body: FeedbackRequest, state: GatewayState = Depends(gateway_state)) -> FeedbackResponse:
    """Store a score or a vote; answers which model gave each response (the arena reveals names with it)."""
    pair = body.pair()
    ids = [body.response_id] if pair is None else [pair[0], pair[1]]
    found = await state.feedback.find([i for i in ids if i is not None])
    missing = [i for i in ids if i not in found]
    if missing:
        raise NotFound(f"no response with id {missing[0]!r}", param="response_id", code="response_not_found")
    revealed = [RevealedResponse(response_id=i, model=found[i].model, route=found[i].route) for i in found]
    if pair is None:
        assert body.response_id is not None and body.score is not None  # checked by FeedbackRequest
        value = 0.0 if body.score == -1 else float(body.score)
        await state.feedback.score(body.response_id, value)
        return FeedbackResponse(kind="score", score=value, revealed=revealed)
    await state.feedback.vote(*pair)
    return FeedbackResponse(kind="vote", outcome=pair[2], revealed=revealed)


@router.get("/v1/leaderboard")
async def leaderboard(
    bootstrap_rounds: int = Query(100, ge=0, le=2000, description="Bootstrap fits for the 95 % intervals."),
    state: GatewayState = Depends(gateway_state),
) -> Leaderboard:
    battles = await state.feedback.battles()
    served = await state.feedback.served()
    ratings = await anyio.to_thread.run_sync(lambda: bradley_terry(battles, rounds=bootstrap_rounds))
    return Leaderboard(
        battles=sum(b.model_a != b.model_b for b in battles),
        bootstrap_rounds=bootstrap_rounds,
        models=[ModelRating(model=r.model, rating=r.rating, ci_low=r.ci_low, ci_high=r.ci_high, battles=r.battles,
                            wins=r.wins, losses=r.losses, ties=r.ties, win_rate=r.win_rate) for r in ratings],
        variants=variant_figures(served),
    )
