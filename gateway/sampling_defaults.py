"""What a request that leaves a sampling parameter out gets: the model's own defaults, then the configuration's.

Layers, later wins, key by key:

1. OpenAI's defaults: temperature 1.0, top_p 1.0 (and no top_k / min_p / repetition penalty);
2. with ``--generation-config auto`` (the default): the served model's ``generation_config.json`` — an adapter
   folder's own file if it has one, else the base's — as vLLM's ``--generation-config auto`` reads it: only
   ``temperature``, ``top_p``, ``top_k``, ``min_p`` and ``repetition_penalty`` (``do_sample`` and the rest are
   Hugging Face ``generate`` switches, not sampling defaults);
3. ``sampling_defaults:`` of the base in the config file;
4. ``sampling_defaults:`` of the adapter in the config file.

A value the request sets (not ``null``) always wins. ``/v1/models`` shows the result per model.

    defaults = resolve_sampling_defaults(mode="auto", base_dir=base, adapter_dir=run, base_config=None,
                                         adapter_config=None)
    values = requested_or_default(body, defaults.values)   # {"temperature": 0.7, "top_p": 0.8, ...}
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.settings import GenerationConfigMode, SamplingDefaultsConfig

log = logging.getLogger(__name__)

GENERATION_CONFIG = "generation_config.json"
# The request fields a model may give defaults for (the generation_config.json keys have the same names).
DEFAULTED_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
OPENAI_DEFAULTS: dict[str, float | int] = {"temperature": 1.0, "top_p": 1.0}


@dataclass(frozen=True)
class SamplingDefaults:
    """The defaults of one model: ``values`` (request field name → value) and where each layer came from."""

    values: Mapping[str, float | int]
    sources: tuple[str, ...]


def read_generation_config(folder: Path) -> dict[str, float | int] | None:
    """The sampling fields of ``folder/generation_config.json``; ``None`` when there is no such file.

    A field that is not a number is left out (with a warning), as is a file that is not JSON."""
    path = folder / GENERATION_CONFIG
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        log.warning("ignoring %s: %s", path, exc)
        return {}
    if not isinstance(data, dict):
        return {}
    values: dict[str, float | int] = {}
    for name in DEFAULTED_FIELDS:
        value = data.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            log.warning("ignoring %s in %s: %r is not a number", name, path, value)
            continue
        values[name] = int(value) if name == "top_k" else float(value)
    return values


def resolve_sampling_defaults(*, mode: GenerationConfigMode, base_dir: Path | None, adapter_dir: Path | None,
                              base_config: SamplingDefaultsConfig | None,
                              adapter_config: SamplingDefaultsConfig | None) -> SamplingDefaults:
    """The layered defaults of one model (see the module docstring)."""
    values: dict[str, float | int] = dict(OPENAI_DEFAULTS)
    sources = ["OpenAI's defaults"]
    if mode == "auto":
        for folder in (adapter_dir, base_dir):
            found = read_generation_config(folder) if folder is not None else None
            if folder is not None and found is not None:
                values.update(found)
                sources.append(str(folder / GENERATION_CONFIG))
                break
    for config, where in ((base_config, "sampling_defaults of the base in the config"),
                          (adapter_config, "sampling_defaults of the adapter in the config")):
        if config is not None and config.values():
            values.update(config.values())
            sources.append(where)
    return SamplingDefaults(values=values, sources=tuple(sources))


def requested_or_default(body: Any, defaults: Mapping[str, float | int]) -> dict[str, Any]:
    """Each defaulted field: the request's value when it set one (not ``null``), else the model's default, else
    ``None`` (the parameter is off). Fields a request model does not have yet read as unset."""
    declared = type(body).model_fields
    values: dict[str, Any] = {}
    for name in DEFAULTED_FIELDS:
        requested = getattr(body, name) if name in declared else None  # an undeclared extra is not a knob yet
        values[name] = requested if requested is not None else defaults.get(name)
    return values
