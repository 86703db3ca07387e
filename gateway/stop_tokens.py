"""What ends a generation, as LLaMA-Factory decides it.

LLaMA-Factory's chat engine stops on ``Template.get_stop_token_ids``: the eos of its "fixed" tokenizer (with
``replace_eos`` the template's first stop word) plus the template's stop words — not on the other eos ids a base's
``config.json`` / ``generation_config.json`` may list (a Qwen base lists ``<|im_end|>`` and ``<|endoftext|>``; a
``default``-template run emits ``<|im_end|>`` now and then, which LLaMA-Factory decodes away as a special token and
generates past). So a chat's end tokens are the template's (``Rendering.stop``); ``--stop-on-model-eos`` adds the
model's. A raw ``/v1/completions`` prompt has no template: it ends on the model's eos ids, as vLLM does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CONFIG_FILES = ("config.json", "generation_config.json")


def model_eos_ids(folder: Path | None) -> tuple[int, ...]:
    """Every ``eos_token_id`` (an int or a list) in the folder's ``config.json`` and ``generation_config.json``."""
    ids: dict[int, None] = {}
    for name in CONFIG_FILES:
        path = folder / name if folder is not None else None
        if path is None or not path.is_file():
            continue
        try:
            value = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
        except (OSError, ValueError, AttributeError):
            continue  # the model loader reports broken config files; stopping rules do not need them
        for token_id in value if isinstance(value, list) else [value]:
            if isinstance(token_id, int) and not isinstance(token_id, bool):
                ids[token_id] = None
    return tuple(ids)


def model_eos_tokens(folder: Path | None, tokenizer: Any) -> tuple[str, ...]:
    """The model's eos ids as token strings (stop strings that ``stop_token_ids`` turns back into these ids)."""
    tokens = [tokenizer.convert_ids_to_tokens(token_id) for token_id in model_eos_ids(folder)]
    return tuple(dict.fromkeys(t for t in tokens if isinstance(t, str)))
