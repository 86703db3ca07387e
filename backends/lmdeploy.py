"""LMDeploy upstream (``lmdeploy serve api_server``, PyTorch engine with ``--adapters name=path``).

Protocol facts (LMDeploy's ``/v1/completions``, ``lmdeploy/serve/openai``):

* ``model`` other than the base model's name selects the adapter of that name; ``/v1/models`` lists the base
  first, then the adapter names (no ``parent`` field). Adapters are fixed at server start: no runtime loading.
* ``prompt`` is a string, or a *list of prompts* (a batch) -- not a list of token ids -- so we send the rendered
  text, and ``/v1/completions`` never applies a chat template to it (``do_preprocess=False``).
* Extensions we set: ``ignore_eos``, ``top_k`` (its default is 40; 0 is accepted and means no top-k) and
  ``skip_special_tokens: false``, so a special stop word (``<|eot_id|>``...) reaches the gateway as text and its
  stop matching sees it. ``stop`` is honoured, but LMDeploy turns each stop word into the ids of every token
  *containing* it, so it may stop a little earlier than the gateway would for multi-character plain-text stops;
  ``stop_token_ids`` is not a request field there (eos from the model's generation config stops by itself).
* Where answers stop: LMDeploy adds the tokenizer's ``eos_token_id`` and ``generation_config.json``'s
  ``eos_token_id`` to every request's stop ids (``AsyncEngine._determine_gen_config`` →
  ``GenerationConfig.update_from_hf_gen_cfg``), and its ``ignore_eos`` turns *all* stop ids, the stop words' too,
  into banned tokens (``pytorch/messages.py``). So LLaMA-Factory's rule (the template's stop ids only) cannot be
  followed: answers also end on the model's eos ids. ``STOP_RULE`` says so in the log at start.
* Sampling as-is: ``frequency_penalty``, ``presence_penalty``, ``repetition_penalty``, ``min_p`` are request
  fields there. It has no ``logit_bias``, and its ``logprobs`` name tokens by text (the prompt is text too), which
  the gateway cannot line up with its own tokens: both are refused with a 400.
* Structured output: LMDeploy's ``response_format`` is a field of its ``/v1/chat/completions`` only (its
  ``/v1/completions`` request has none), so ``response_format`` and forced ``tool_choice`` are refused with a 400.
* Streaming: ``data: {json}\\n\\n`` chunks, with ``stream_options.include_usage`` a usage chunk with
  ``choices: []``, then ``data: [DONE]``. Errors: flat ``{"object": "error", "message", "type", "code": <int>,
  "param"}`` with the same status; an unknown model answers 404.
"""

from __future__ import annotations

import logging
from typing import Any

from backends.base import Capabilities, GenerationRequest
from backends.completions import (
    CompletionsBackend,
    penalty_extensions,
    refuse_constraint,
    refuse_unsupported,
    sampling_fields,
)

log = logging.getLogger(__name__)

STOP_RULE = (
    "lmdeploy upstream: answers also end on the model's eos ids (the tokenizer's eos_token_id and "
    "generation_config.json's eos_token_id), which LMDeploy adds to every request's stop ids; LLaMA-Factory stops "
    "on the template's stop ids only, and LMDeploy's ignore_eos would ban the template's stop words too, so a model "
    "that emits such an id before its template's eos answers shorter here than in LLaMA-Factory")


class LMDeployBackend(CompletionsBackend):
    capabilities = Capabilities(runtime_adapters=False, token_ids_in=False, token_ids_out=False)
    engine = "lmdeploy"

    async def start(self) -> None:
        log.warning(STOP_RULE)
        await super().start()

    def build_payload(self, request: GenerationRequest) -> dict[str, Any]:
        refuse_unsupported(request, self.engine, ("logit_bias", "logprobs", "prompt_logprobs"))
        refuse_constraint(request, self.engine)
        return {
            "model": self.model_for(request.adapter),
            "prompt": request.prompt_text,
            **sampling_fields(request),
            **penalty_extensions(request),
            "top_k": request.sampling.top_k,
            "skip_special_tokens": False,
            "ignore_eos": request.sampling.ignore_eos,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
