"""Any OpenAI-compatible server with ``/v1/completions`` (``--backend openai``): llama.cpp's server, SGLang, TGI...

Only standard OpenAI fields are sent (``frequency_penalty``, ``presence_penalty`` and ``logit_bias`` are; vLLM's
``repetition_penalty`` / ``min_p``, ``top_k`` and ``ignore_eos`` are not: such a request is refused with a 400, and so
is ``logprobs``, since such servers report tokens as text the gateway cannot line up with its own detokenization,
and structured output: OpenAI's ``/v1/completions`` has no ``response_format``).
The prompt is the rendered text unless ``token_prompt=True`` (the OpenAI spec allows a list of token ids as ``prompt``;
servers that honour it then see exactly the gateway's ids).
Adapters must already be served under some model name: map them with ``served_adapters``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from backends.base import Capabilities, GenerationRequest
from backends.completions import CompletionsBackend, refuse_constraint, refuse_unsupported, sampling_fields
from backends.upstream_pool import UpstreamPool
from gateway.errors import InvalidRequest


class OpenAICompatBackend(CompletionsBackend):
    engine = "openai"

    def __init__(
        self,
        pool: UpstreamPool,
        *,
        base_model: str | None = None,
        adapters: Mapping[str, str] | None = None,
        served_adapters: Mapping[str, str] | None = None,
        adapter_paths: Mapping[str, str] | None = None,
        token_prompt: bool = False,
    ) -> None:
        super().__init__(
            pool, base_model=base_model, adapters=adapters, served_adapters=served_adapters, adapter_paths=adapter_paths
        )
        self.token_prompt = token_prompt
        self.capabilities = Capabilities(runtime_adapters=False, token_ids_in=token_prompt, token_ids_out=False)

    def build_payload(self, request: GenerationRequest) -> dict[str, Any]:
        if request.sampling.ignore_eos:
            raise InvalidRequest("this OpenAI-compatible upstream cannot ignore end-of-sequence", param="ignore_eos")
        refuse_unsupported(request, self.engine,
                           ("top_k", "repetition_penalty", "min_p", "logprobs", "prompt_logprobs"))
        refuse_constraint(request, "openai")  # OpenAI's /v1/completions has no response_format
        prompt: Any = list(request.prompt_token_ids) if self.token_prompt else request.prompt_text
        return {
            "model": self.model_for(request.adapter),
            "prompt": prompt,
            **sampling_fields(request),
            "stream": True,
            "stream_options": {"include_usage": True},
        }
