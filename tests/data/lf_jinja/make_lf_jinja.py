"""Ask LLaMA-Factory (0.9.5, installed in its own throw-away venv) for the Jinja chat template it generates from
each of its text templates — what ``llamafactory-cli train`` saves as ``chat_template.jinja`` when a template
replaces the model's Jinja — and the Ollama ``Modelfile`` ``llamafactory-cli export`` writes, as test data here
(``<template>.jinja``, ``<template>.Modelfile`` and ``index.json``).

    python3 -m venv /tmp/lfvenv && /tmp/lfvenv/bin/pip install llamafactory==0.9.5 torch==2.13.0
    /tmp/lfvenv/bin/python tests/data/lf_jinja/make_lf_jinja.py TOKENIZER_DIR

TOKENIZER_DIR is a Qwen-style tokenizer (the demo base's: ``python -m gateway.cli demo build`` prints it). Each
template first fixes a fresh copy of it, as training does (``fix_special_tokens``: eos replaced or added, stop words
added), and its Jinja uses that tokenizer's bos/eos. Templates LLaMA-Factory cannot translate (slots with ``token``
dicts) are listed with ``"jinja": null``.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import sys
import types
from pathlib import Path

# LLaMA-Factory's multimodal plugin imports torchaudio at import time; text templates never use it, and no
# torchaudio build may match the CPU torch pinned here. An empty module stands in when it is missing.
if importlib.util.find_spec("torchaudio") is None:
    sys.modules["torchaudio"] = types.ModuleType("torchaudio")
    sys.modules["torchaudio"].__spec__ = importlib.machinery.ModuleSpec("torchaudio", None)

from llamafactory.data.template import TEMPLATES  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

HERE = Path(__file__).parent
OURS = Path(__file__).parents[3] / "chat_templates"


def main(tokenizer_dir: str) -> None:
    names = sorted(p.stem for p in OURS.glob("*.yaml"))
    index = {}
    for name in names:
        template = TEMPLATES[name]
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        template.fix_special_tokens(tokenizer)
        try:
            jinja = template._get_jinja_template(tokenizer)
        except ValueError as exc:  # "Dict is not supported."
            jinja, reason = None, str(exc)
        else:
            reason = None
            (HERE / f"{name}.jinja").write_text(jinja, encoding="utf-8")
            # what ``llamafactory-cli export`` writes beside merged weights
            (HERE / f"{name}.Modelfile").write_text(template.get_ollama_modelfile(tokenizer), encoding="utf-8")
        index[name] = {"jinja": f"{name}.jinja" if jinja is not None else None, "not_generated": reason,
                       "eos_token": tokenizer.eos_token, "bos_token": tokenizer.bos_token,
                       "replace_jinja_template": template.replace_jinja_template}
    (HERE / "index.json").write_text(json.dumps(index, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"{sum(v['jinja'] is not None for v in index.values())} of {len(index)} templates have a Jinja")


if __name__ == "__main__":
    main(sys.argv[1])
