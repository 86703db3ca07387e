"""Fitting a conversation that has outgrown the context: drop its oldest turns, keep the system prompt and the last
user message.

Open WebUI keeps a failed message in the chat history: after one message too long for the context, every later
message of that chat would fail the same way. With ``--history-overflow drop_oldest`` (the default) the gateway
drops whole turns from the start of the conversation — always at a user message, so what is left still starts with
one — until the prompt leaves room for an answer; the answer says how many messages it dropped
(``x-gateway-messages-dropped``) and the log has a line. System messages are never dropped, nor the run of
messages from the last user message on. When even that does not fit, nothing is dropped and the request gets the
ordinary ``context_length_exceeded`` 400. ``--history-overflow error`` keeps OpenAI's behaviour (always that 400).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

MESSAGES_DROPPED_HEADER = "x-gateway-messages-dropped"
ANSWER_ROOM = 256  # tokens an answer should have after dropping, when the request sets no max_tokens

P = TypeVar("P")


def _cut_points(messages: Sequence[Any], role: Callable[[Any], str]) -> list[int]:
    """How many non-system messages each possible drop removes: every position of a user message but the first,
    up to the last user message."""
    rest = [m for m in messages if role(m) not in ("system", "developer")]
    return [i for i, m in enumerate(rest) if i > 0 and role(m) == "user"]


def _without_first(messages: Sequence[Any], role: Callable[[Any], str], count: int) -> list[Any]:
    kept, seen = [], 0
    for message in messages:
        if role(message) in ("system", "developer"):
            kept.append(message)
            continue
        if seen >= count:
            kept.append(message)
        seen += 1
    return kept


def fit_history(messages: Sequence[Any], render: Callable[[list[Any]], P], length: Callable[[P], int], *,
                max_len: int, wanted_room: int | None, role: Callable[[Any], str]) -> tuple[P, int] | None:
    """The prompt of ``messages`` with the fewest oldest messages dropped so that it leaves ``wanted_room`` tokens
    (default ``ANSWER_ROOM``, at most half the context) for the answer, else at least one; and how many messages
    were dropped. ``None`` when no drop makes it fit."""
    cuts = _cut_points(messages, role)
    if not cuts:
        return None
    room = min(wanted_room or ANSWER_ROOM, max_len // 2)

    def attempt(count: int) -> tuple[P, int]:
        prompt = render(_without_first(messages, role, count))
        return prompt, max_len - length(prompt)

    # Dropping more never lengthens the prompt: binary search the first cut that leaves the room.
    best: tuple[P, int] | None = None
    low, high = 0, len(cuts) - 1
    while low <= high:
        middle = (low + high) // 2
        prompt, left = attempt(cuts[middle])
        if left >= room:
            best, high = (prompt, cuts[middle]), middle - 1
        else:
            low = middle + 1
    if best is not None:
        return best
    prompt, left = attempt(cuts[-1])
    return (prompt, cuts[-1]) if left > 0 else None
