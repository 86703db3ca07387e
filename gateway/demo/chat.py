"""Greedy answers from a demo model, prompted exactly as the gateway prompts it (for tests and the CLI)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from gateway.demo.data import as_segment_tokenizer
from gateway.templates import SlotTemplate, encode_segments


def greedy_answer(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    template: str,
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
    *,
    enable_thinking: bool | None = None,
    max_new_tokens: int = 96,
) -> str:
    """The decoded answer (special tokens kept, the final stop token dropped) to ``messages`` rendered with the
    LLaMA-Factory ``template`` and encoded segment by segment."""
    rendering = SlotTemplate.named(template).render(
        messages, tools, enable_thinking=enable_thinking, eos_token=tokenizer.eos_token
    )
    segment_tokenizer = as_segment_tokenizer(tokenizer)
    prompt = encode_segments(segment_tokenizer, rendering.segments)
    stop_ids = [segment_tokenizer.convert_tokens_to_ids(word) for word in rendering.stop]
    with torch.no_grad():
        output = model.generate(  # type: ignore[operator]
            input_ids=torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=stop_ids,
            pad_token_id=tokenizer.pad_token_id,
        )
    new = output[0, len(prompt) :].tolist()
    if new and new[-1] in stop_ids:
        new = new[:-1]
    return str(tokenizer.decode(new, skip_special_tokens=False))
