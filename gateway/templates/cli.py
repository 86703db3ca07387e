"""``gateway template ...``: list the shipped chat templates and render a request with one.

    gateway template list
    echo '{"messages": [{"role": "user", "content": "Hi"}]}' | gateway template render qwen --eos-token '<|im_end|>'

``render`` reads an OpenAI chat request (``messages``, optional ``tools``) as JSON on stdin and prints
``{"prompt", "segments": [{"kind", "text"}], "stop"}``. An unknown template exits with code 2 and the known names
on stderr; a request the template cannot render exits with code 1 and the reason.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer

from gateway.errors import GatewayError
from gateway.templates.chat_template import SlotTemplate
from gateway.templates.spec import TemplateNotFound, load_spec, template_names

template_app = typer.Typer(no_args_is_help=True, help="List and render LLaMA-Factory chat templates.")

REASONING_MARKER = " (reasoning)"


@template_app.command("list")
def list_templates() -> None:
    """Print every template name, one per line; reasoning templates are marked."""
    for name in template_names():
        typer.echo(name + (REASONING_MARKER if load_spec(name).reasoning else ""))


def _read_request() -> dict[str, Any]:
    try:
        request = json.loads(sys.stdin.read())
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"stdin is not JSON: {exc}", param_hint="stdin") from None
    if not isinstance(request, dict) or not isinstance(request.get("messages"), list):
        raise typer.BadParameter("stdin must be a chat request object with a `messages` list", param_hint="stdin")
    return request


@template_app.command("render")
def render_template(
    name: Annotated[str, typer.Argument(help="LLaMA-Factory template name (see `gateway template list`).")],
    bos_token: Annotated[str | None, typer.Option(help="The tokenizer's bos token, if it has one.")] = None,
    eos_token: Annotated[str | None, typer.Option(help="The tokenizer's eos token, if it has one.")] = None,
    no_thinking: Annotated[bool, typer.Option("--no-thinking", help="Render with enable_thinking=False.")] = False,
) -> None:
    """Render the chat request on stdin with template NAME and print the prompt, its segments and stop strings."""
    try:
        template = SlotTemplate.named(name)
    except TemplateNotFound:
        typer.echo(f"unknown template {name!r}; known templates:", err=True)
        typer.echo("\n".join(template_names()), err=True)
        raise typer.Exit(code=2) from None
    request = _read_request()
    try:
        rendering = template.render(
            request["messages"],
            request.get("tools"),
            enable_thinking=False if no_thinking else None,
            bos_token=bos_token,
            eos_token=eos_token,
        )
    except GatewayError as exc:
        typer.echo(f"cannot render this request: {exc}", err=True)
        raise typer.Exit(code=1) from None
    output = {
        "prompt": rendering.prompt,
        "segments": [{"kind": segment.kind, "text": segment.text} for segment in rendering.segments],
        "stop": list(rendering.stop),
    }
    typer.echo(json.dumps(output, ensure_ascii=False, indent=2))
