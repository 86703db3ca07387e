"""The native backend: one base model in transformers, LoRA adapters through peft, on CUDA, Ascend NPU or CPU."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import torch

from backends.base import Capabilities, Delta, GenerationRequest, Health
from backends.engine import BASE_ADAPTER, Engine, Sequence
from backends.kv_cache import check_cache
from backends.lora import read_adapter
from backends.structured import GrammarCompiler, RowGrammar
from gateway.errors import BackendUnavailable, Conflict, GatewayError, InvalidRequest
from gateway.request_context import current_request

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(name: str) -> torch.device:
    """``auto`` prefers CUDA, then Ascend NPU, then CPU. ``npu`` needs the torch-npu package."""
    if name in ("npu", "auto"):
        try:
            import torch_npu  # noqa: F401  (registers the "npu" device with torch)
        except ImportError as exc:
            if name == "npu":
                raise BackendUnavailable(
                    "--device npu needs torch-npu (Ascend): pip install 'lora-gateway[npu]' matching your CANN"
                ) from exc
        else:
            if torch.npu.is_available():  # type: ignore[attr-defined]
                return torch.device("npu")
            if name == "npu":
                raise BackendUnavailable("--device npu: torch-npu is installed but no NPU is visible")
    if name in ("cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda")
    if name == "cuda":
        raise BackendUnavailable("--device cuda: no CUDA device is visible to torch")
    return torch.device("cpu")


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return _DTYPES[name]
    return torch.float32 if device.type == "cpu" else torch.bfloat16


class TorchBackend:
    """Serves a base model and its adapters in this process.

    Build with ``await TorchBackend.load(...)``: weights load off the event loop.
    """

    def __init__(self, model: Any, *, device: torch.device, eos_token_ids: frozenset[int], pad_token_id: int,
                 max_model_len: int, max_batch_size: int, max_queue: int, tokenizer: Any = None) -> None:
        self.device = device
        self.max_model_len = max_model_len
        self.eos_token_ids = eos_token_ids
        self.capabilities = Capabilities(runtime_adapters=True, max_context=max_model_len)
        embeddings = model.get_output_embeddings()
        self.vocab_size = int(embeddings.weight.shape[0]) if embeddings is not None else int(model.config.vocab_size)
        self.adapter_paths: dict[str, str] = {}
        # Structured output needs the tokenizer's pieces; without one, constrained requests are refused.
        vocab = int(model.config.vocab_size)
        self._grammars = GrammarCompiler(tokenizer, vocab) if tokenizer is not None else None
        self._engine = Engine(model, device=device, pad_token_id=pad_token_id, max_batch_size=max_batch_size,
                              max_queue=max_queue)

    @classmethod
    async def load(cls, model_dir: str | Path, *, device: str = "auto", dtype: str = "auto",
                   max_model_len: int | None = None, max_batch_size: int = 8, max_queue: int = 256,
                   pad_token_id: int | None = None, tokenizer: Any = None, stop_on_model_eos: bool = True
                   ) -> TorchBackend:
        """``tokenizer`` (the Hugging Face tokenizer prompts are encoded with) enables structured output.
        ``stop_on_model_eos=False``: only ``stop_token_ids`` end a generation (the gateway sends the template's,
        as LLaMA-Factory stops); otherwise every eos id of the model's config and generation config does too."""
        torch_device = pick_device(device)
        torch_dtype = pick_dtype(dtype, torch_device)

        def load_model() -> Any:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch_dtype)
            return model.to(torch_device).eval()  # type: ignore[arg-type]  # transformers types .to oddly

        model = await anyio.to_thread.run_sync(load_model)
        check_cache(model)  # hybrid/recurrent caches are refused here, with a sentence, not at the first request
        config = model.config
        context = max_model_len or getattr(config, "max_position_embeddings", None) or 4096
        eos = set()
        for source in (config, getattr(model, "generation_config", None)):
            value = getattr(source, "eos_token_id", None)
            eos.update(value if isinstance(value, list) else [value] if value is not None else [])
        pad = pad_token_id if pad_token_id is not None else (getattr(config, "pad_token_id", None) or 0)
        log.info("loaded %s on %s as %s (context %d)", model_dir, torch_device, torch_dtype, context)
        eos_ids = frozenset(eos) if stop_on_model_eos else frozenset()
        return cls(model, device=torch_device, eos_token_ids=eos_ids, pad_token_id=pad,
                   max_model_len=context, max_batch_size=max_batch_size, max_queue=max_queue, tokenizer=tokenizer)

    # --- generation ---------------------------------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        if request.adapter is not None and request.adapter not in self.adapter_paths:
            raise InvalidRequest(f"adapter {request.adapter!r} is not loaded")
        for token, _ in request.sampling.logit_bias:
            if not 0 <= token < self.vocab_size:
                raise InvalidRequest(f"logit_bias: token id {token} is not in the model's vocabulary",
                                     param="logit_bias")
        queue: asyncio.Queue[Delta | GatewayError] = asyncio.Queue()
        eos = frozenset() if request.sampling.ignore_eos else self.eos_token_ids
        stop_ids = eos | frozenset(request.sampling.stop_token_ids)
        grammar = await self._row_grammar(request, stop_ids)
        sequence = Sequence(
            request=request,
            loop=asyncio.get_running_loop(),
            queue=queue,
            stop_token_ids=stop_ids,
            max_total_len=self.max_model_len,
            grammar=grammar,
        )
        self._engine.submit(sequence)
        observer = current_request()
        try:
            while True:
                item = await queue.get()
                if isinstance(item, GatewayError):
                    raise item
                if observer is not None and sequence.joined_at is not None and observer.engine_queue_seconds is None:
                    observer.engine_queue_seconds = sequence.joined_at - sequence.submitted_at
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            sequence.cancelled = True
            self._engine.wake()

    def adapter_requests(self) -> tuple[dict[str, int], dict[str, int]]:
        """(running, waiting) engine rows per adapter (the base's rows left out), for ``vllm:lora_requests_info``."""
        running, waiting = self._engine.adapter_rows()
        running.pop(BASE_ADAPTER, None)
        waiting.pop(BASE_ADAPTER, None)
        return running, waiting
    async def _row_grammar(self, request: GenerationRequest, stop_ids: frozenset[int]) -> RowGrammar | None:
        constraint = request.sampling.constraint
        if constraint is None:
            return None
        if self._grammars is None:
            raise InvalidRequest("this torch backend was started without a tokenizer: structured output is off",
                                 param=constraint.param)
        return await anyio.to_thread.run_sync(self._grammars.row_grammar, constraint, stop_ids)

    # --- adapters -----------------------------------------------------------------------------------------------

    async def load_adapter(self, name: str, path: str) -> None:
        """Read and check the files on a worker thread, then install between two engine steps (milliseconds)."""
        if self.adapter_paths.get(name) == path:
            return
        weights = await anyio.to_thread.run_sync(read_adapter, name, path)

        def install() -> None:
            busy = self._engine.adapters_in_use().get(name, 0)
            if busy:  # replacing weights under running rows would switch them mid-answer
                raise Conflict(f"adapter {name!r} has {busy} requests waiting or running; it cannot be replaced now")
            self._engine.lora.install(weights)

        await self._engine.run_command(install)
        self.adapter_paths[name] = path

    async def unload_adapter(self, name: str) -> None:
        if name not in self.adapter_paths:
            return

        def remove() -> None:
            busy = self._engine.adapters_in_use().get(name, 0)
            if busy:  # the gateway's AdapterPool never asks this; other callers get a refusal, not wrong rows
                raise Conflict(f"adapter {name!r} has {busy} requests waiting or running")
            self._engine.lora.remove(name)

        await self._engine.run_command(remove)
        del self.adapter_paths[name]

    # --- lifecycle ----------------------------------------------------------------------------------------------

    async def health(self) -> Health:
        return Health(ok=True, detail=f"{self.device.type}", extra={
            "batch": self._engine.batch_size, "queued": self._engine.queue_depth,
        })

    async def aclose(self) -> None:
        await anyio.to_thread.run_sync(self._engine.stop)

