"""Pydantic models mirroring the OpenAI API (fields in OpenAI's order). No torch, no backend imports.

Our extensions sit in a marked block at the end of each request model, each with a description.
"""

from gateway.protocol.chat import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatMessage,
)
from gateway.protocol.common import Usage
from gateway.protocol.completions import Completion, CompletionChunk, CompletionRequest
from gateway.protocol.models import Model, ModelList

__all__ = [
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatCompletionRequest",
    "ChatMessage",
    "Completion",
    "CompletionChunk",
    "CompletionRequest",
    "Model",
    "ModelList",
    "Usage",
]
