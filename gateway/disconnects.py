"""Non-streamed answers stop when their client hangs up, as streams do.

A stream notices a gone client when a write fails; a non-streamed answer writes nothing until it is complete, so
without this a client that gave up (a timeout, a closed tab) would keep its batch rows busy to the last token.
``while_connected`` awaits the answer and, in parallel, the ASGI ``http.disconnect`` message (the body has been
read by then, so the next ``receive`` returns only when the connection closes).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

from starlette.requests import Request

from gateway.errors import ClientDisconnected

log = logging.getLogger(__name__)

T = TypeVar("T")


async def while_connected(request: Request, answer: Coroutine[Any, Any, T]) -> T:
    """``await answer``, unless the client disconnects first: then ``answer`` is cancelled (its choice streams end,
    which frees their engine rows at the next step) and ``ClientDisconnected`` is raised."""
    work = asyncio.ensure_future(answer)
    gone = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await work
    if work.cancelled():
        log.info("client went away before its answer was complete; generation stopped")
        raise ClientDisconnected("the client closed the connection before the answer was complete")
    return work.result()


async def _disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
