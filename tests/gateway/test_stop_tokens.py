"""Where a chat stops: LLaMA-Factory's rule (the template's eos and stop words), the model's config eos ids only
with --stop-on-model-eos (or for a Jinja template), special tokens never shown, and /v1/chat/render's ``stop`` the
same as what generation stops on. In-process, with a backend that honours ``stop_token_ids`` as engines do; and the
native backend on the demo model."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from backends.base import Capabilities, Delta, GenerationRequest, Health, SamplingParams
from gateway.app import create_app
from gateway.demo import DemoModels
from gateway.settings import AdapterConfig, Settings
from gateway.stop_tokens import model_eos_ids
from tests.gateway.scripted import chat_content

HELLO = [{"role": "user", "content": "你好，你是谁？"}]


class StoppingBackend:
    """Emits a scripted answer token by token and stops at the first id in the request's ``stop_token_ids``."""

    capabilities = Capabilities(runtime_adapters=True)

    def __init__(self) -> None:
        self.answer: list[int] = []
        self.requests: list[GenerationRequest] = []

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        self.requests.append(request)
        for token_id in self.answer:
            if token_id in request.sampling.stop_token_ids:
                yield Delta(token_ids=(token_id,), finish_reason="stop")
                return
            yield Delta(token_ids=(token_id,))
        yield Delta(finish_reason="length")

    async def load_adapter(self, name: str, path: str) -> None:
        return None

    async def unload_adapter(self, name: str) -> None:
        return None

    async def health(self) -> Health:
        return Health(ok=True)

    async def aclose(self) -> None:
        return None


@pytest.fixture(scope="module")
def detected(demo_models: DemoModels, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """pku-assistant without its training_args.yaml: its template is the folder's chat_template.jinja."""
    folder = tmp_path_factory.mktemp("adapters") / "detected"
    shutil.copytree(demo_models.adapters["pku-assistant"], folder)
    (folder / "training_args.yaml").unlink()
    return folder


async def _serve(demo_models: DemoModels, detected: Path, **overrides: Any) -> AsyncIterator[tuple[Any, Any]]:
    config = Settings(model=str(demo_models.base_dir), served_model_name="tiny-qwen", template="qwen", adapters=(
        AdapterConfig(name="plain", path=str(demo_models.adapters["pku-assistant"]), template="default"),
        AdapterConfig(name="detected", path=str(detected)),
        AdapterConfig(name="qwen", path=str(demo_models.adapters["pku-assistant"])),
    ), **overrides)
    backend = StoppingBackend()
    app = create_app(config, backend=backend)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
            yield client, backend


def _ids(tokenizer_dir: Path, *tokens: str) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    return [tokenizer.convert_tokens_to_ids(t) for t in tokens]


def _words(tokenizer_dir: Path) -> tuple[int, int]:
    """Two one-token words of the demo vocabulary: 你, 好."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    first, second = tokenizer.encode("你"), tokenizer.encode("好")
    assert len(first) == len(second) == 1
    return first[0], second[0]


async def _answer(client: Any, model: str, stream: bool) -> str:
    return await chat_content(client, {"model": model, "messages": HELLO, "stream": stream})


async def _render_stop(client: Any, model: str) -> list[str]:
    return list((await client.post("/v1/chat/render", json={"model": model, "messages": HELLO})).json()["stop"])


@pytest.mark.parametrize("stream", [False, True])
async def test_a_default_template_chat_generates_past_im_end_and_never_shows_it(
        demo_models: DemoModels, detected: Path, stream: bool) -> None:
    im_end, endoftext = _ids(demo_models.base_dir, "<|im_end|>", "<|endoftext|>")
    hello, world = _words(demo_models.base_dir)
    async for client, backend in _serve(demo_models, detected):
        backend.answer = [hello, im_end, world, endoftext, hello]
        assert await _render_stop(client, "plain") == ["<|endoftext|>"]  # the template's eos, nothing else
        assert await _answer(client, "plain", stream) == "你好"
        assert set(backend.requests[-1].sampling.stop_token_ids) == {endoftext}
        # a qwen run stops on <|im_end|> (replace_eos), and says so
        assert await _render_stop(client, "qwen") == ["<|im_end|>"]
        assert await _answer(client, "qwen", stream) == "你"


async def test_stop_on_model_eos_adds_the_configs_ids_and_render_reports_them(demo_models: DemoModels,
                                                                              detected: Path) -> None:
    im_end, endoftext = _ids(demo_models.base_dir, "<|im_end|>", "<|endoftext|>")
    hello, world = _words(demo_models.base_dir)
    assert set(model_eos_ids(demo_models.base_dir)) == {im_end, endoftext}  # config.json + generation_config.json
    async for client, backend in _serve(demo_models, detected, stop_on_model_eos=True):
        backend.answer = [hello, im_end, world, endoftext]
        assert set(await _render_stop(client, "plain")) == {"<|endoftext|>", "<|im_end|>"}
        assert await _answer(client, "plain", False) == "你"
        # a Jinja template has no LLaMA-Factory stop rule: it stops on the model's eos ids too, and render says so
    async for client, backend in _serve(demo_models, detected):
        backend.answer = [hello, im_end, world]
        assert set(await _render_stop(client, "detected")) == {"<|endoftext|>", "<|im_end|>"}
        assert await _answer(client, "detected", False) == "你"


async def test_ignore_eos_keeps_only_the_requests_own_stops(demo_models: DemoModels, detected: Path) -> None:
    im_end, endoftext = _ids(demo_models.base_dir, "<|im_end|>", "<|endoftext|>")
    hello, world = _words(demo_models.base_dir)
    async for client, backend in _serve(demo_models, detected):
        backend.answer = [hello, im_end, world, endoftext, hello]
        response = await client.post("/v1/chat/completions", json={"model": "qwen", "messages": HELLO,
                                                                   "ignore_eos": True})
        assert response.json()["choices"][0]["message"]["content"] == "你好你"
        assert backend.requests[-1].sampling.stop_token_ids == ()


async def test_the_native_backend_stops_only_on_the_given_ids_unless_asked(demo_models: DemoModels) -> None:
    from transformers import AutoTokenizer

    from backends.torch_native import TorchBackend

    tokenizer = AutoTokenizer.from_pretrained(str(demo_models.base_dir))
    prompt = tokenizer.encode("<|im_start|>user\n你好，你是谁？<|im_end|>\n<|im_start|>assistant\n")
    sampling = SamplingParams(max_tokens=300, temperature=0.0, top_p=1.0, top_k=0, seed=None, stop=(),
                              stop_token_ids=(), ignore_eos=False)
    for stop_on_model_eos, reasons in ((True, {"stop"}), (False, {"length"})):
        backend = await TorchBackend.load(demo_models.base_dir, device="cpu", dtype="float32",
                                          stop_on_model_eos=stop_on_model_eos)
        try:
            finished = set()
            async for delta in backend.generate(GenerationRequest(request_id="r", prompt_token_ids=tuple(prompt),
                                                                  prompt_text="", adapter=None, sampling=sampling)):
                if delta.finish_reason:
                    finished.add(delta.finish_reason)
            assert finished == reasons
        finally:
            await backend.aclose()


@pytest.mark.parametrize(("mode", "expected"), [("always", "ChatGPT? Yes, it's me."),
                                                 ("tokenizer", "ChatGPT ? Yes , it 's me ."),
                                                 ("never", "ChatGPT ? Yes , it 's me .")])
async def test_clean_up_is_the_same_streamed_or_not(demo_models: DemoModels, detected: Path, mode: str,
                                                     expected: str) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(demo_models.base_dir))
    assert tokenizer.clean_up_tokenization_spaces is False  # the demo's (Qwen's) setting: "tokenizer" keeps spaces
    async for client, backend in _serve(demo_models, detected, decode_clean_up=mode):
        backend.answer = tokenizer.encode("ChatGPT ? Yes , it 's me .", add_special_tokens=False)
        assert await _answer(client, "qwen", False) == expected
        assert await _answer(client, "qwen", True) == expected
