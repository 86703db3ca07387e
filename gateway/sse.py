"""Server-sent events the way OpenAI streams them: ``data: {json}`` events, then ``data: [DONE]``."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator

from pydantic import BaseModel
from sse_starlette import EventSourceResponse

from gateway.errors import GatewayError

log = logging.getLogger(__name__)


async def _events(chunks: AsyncIterator[BaseModel]) -> AsyncIterator[str]:
    try:
        async for chunk in chunks:
            yield chunk.model_dump_json(exclude_none=True)
    except GatewayError as exc:
        # Headers are gone: the error travels as an event the OpenAI SDK raises as APIError.
        log.warning("stream ended with error: %s", exc.message)
        yield json.dumps(exc.body(), ensure_ascii=False)
        return
    yield "[DONE]"


def sse_response(chunks: AsyncIterator[BaseModel]) -> EventSourceResponse:
    return EventSourceResponse(_events(chunks), ping=15, sep="\n")
