"""Prompt rendering with LLaMA-Factory semantics, and choosing the template each model was trained with.

    spec = load_spec("qwen")
    rendering = render(spec, to_conversation(messages, tools), enable_thinking=False, eos_token="<|im_end|>")
    rendering.prompt, rendering.segments, rendering.stop
    token_ids = encode_segments(tokenizer, rendering.segments)
"""

from gateway.templates.conversation import Conversation, Turn, to_conversation
from gateway.templates.rendering import Rendering, Segment, encode_segments, render
from gateway.templates.spec import TemplateNotFound, TemplateSpec, load_spec, template_names

__all__ = [
    "Conversation",
    "Rendering",
    "Segment",
    "TemplateNotFound",
    "TemplateSpec",
    "Turn",
    "encode_segments",
    "load_spec",
    "render",
    "template_names",
    "to_conversation",
]

from gateway.templates.chat_template import ChatTemplate, SlotTemplate  # noqa: E402
from gateway.templates.jinja_template import JinjaTemplate  # noqa: E402
from gateway.templates.parsing import OutputParser, ParsedDelta, ToolCall  # noqa: E402
from gateway.templates.resolution import ResolvedTemplate, TemplateResolutionError, resolve_template  # noqa: E402

__all__ += [
    "ChatTemplate",
    "JinjaTemplate",
    "OutputParser",
    "ParsedDelta",
    "ResolvedTemplate",
    "SlotTemplate",
    "TemplateResolutionError",
    "ToolCall",
    "resolve_template",
]
