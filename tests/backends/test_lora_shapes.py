"""Every linear layer LLaMA-Factory's ``lora_target: all`` picks is served exactly, whatever the shape of its input.

qwen2_moe's shared expert sees the tokens flattened (``[rows * seq, in]``), DeepSeek-V3 MLA's ``kv_b_proj`` the
cached latent as ``[rows, 1, kv_len, in]``. Per architecture: our ``LoraBank`` equals peft (float32, ~1e-5) alone
and per row in a mixed batch, and the engine's greedy tokens, rows joining late, equal peft's ``generate``. Layers
whose input rows cannot be attributed (tokens routed to an expert, regrouped, or the batch not outermost) are
refused at install with the module's name and the reason, and nothing changes.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest
import torch
import transformers as tf
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file

from backends.base import GenerationRequest, SamplingParams
from backends.lora import LoraBank, read_adapter
from backends.torch_native import TorchBackend
from gateway.adapter_files import BaseShapes, inspect_adapter
from gateway.errors import AdapterLoadError

VOCAB = 96
_COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=VOCAB - 1, initializer_range=0.1,
               max_position_embeddings=128)


def _config(kind: str) -> tf.PretrainedConfig:
    """A tiny random model of ``kind`` (seconds to build; layer 0 of deepseek_v3 has the dense MLP)."""
    if kind == "qwen2_moe":
        return tf.Qwen2MoeConfig(**_COMMON, moe_intermediate_size=16, shared_expert_intermediate_size=24,
                                 num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1)
    if kind == "deepseek_v3":  # MLA expands its latent into one key per head: as many kv heads as heads
        return tf.DeepseekV3Config(**{**_COMMON, "num_key_value_heads": 4}, moe_intermediate_size=16,
                                   n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
                                   first_k_dense_replace=1, n_shared_experts=1,
                                   q_lora_rank=16, kv_lora_rank=12, qk_rope_head_dim=4, qk_nope_head_dim=4,
                                   v_head_dim=8)
    if kind in ("gemma2", "gemma3"):
        config_class = tf.Gemma2Config if kind == "gemma2" else tf.Gemma3TextConfig
        return config_class(**_COMMON, head_dim=8, sliding_window=4)
    return {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config, "glm4": tf.Glm4Config, "phi3": tf.Phi3Config}[kind](
        **_COMMON)


def _all_linear_targets(model: torch.nn.Module) -> list[str]:
    """The layers LLaMA-Factory's ``find_all_linear_modules`` picks: every ``*Linear*`` module but the lm_head.

    Returned as full paths (given to peft as one regex) rather than LLaMA-Factory's leaf names, so that peft does not
    also put LoRA on the fused routed experts (``gate_proj`` -> ``experts.gate_up_proj``: another mechanism).
    """
    return [name for name, module in model.named_modules()
            if "Linear" in type(module).__name__ and "Embedding" not in type(module).__name__ and "lm_head" not in name]


KINDS = ["llama", "qwen2", "qwen2_moe", "deepseek_v3", "glm4", "phi3", "gemma2", "gemma3"]


def _peft_view(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` as peft should see it: with deepseek_v3's ``model_type`` masked.

    peft 0.21 on transformers 5 retargets every ``*gate_proj/up_proj/down_proj`` of a deepseek_v3 model onto its fused
    routed experts (its v4 -> v5 config conversion), shared experts and the dense MLP included, both when it trains
    and when it loads. Masked, peft writes and reads these layers as named, as LLaMA-Factory on transformers 4 wrote
    them; the model computes the same.
    """
    if model.config.model_type == "deepseek_v3":
        model.config.model_type = "deepseek_v3_as_named"
    return model


def _build(kind: str, root: Path) -> dict[str, Path]:
    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(_config(kind)).save_pretrained(root / "base")
    dirs = {"base": root / "base"}
    targets = _all_linear_targets(tf.AutoModelForCausalLM.from_pretrained(root / "base"))
    for index, (name, rank, chosen) in enumerate([("all", 8, targets), ("some", 4, targets[::2])]):
        torch.manual_seed(10 + index)
        model = _peft_view(tf.AutoModelForCausalLM.from_pretrained(root / "base"))
        lora = LoraConfig(r=rank, lora_alpha=2 * rank + 1, target_modules="|".join(map(re.escape, chosen)),
                          init_lora_weights=False)
        peft_model = get_peft_model(model, lora)
        assert not peft_model.peft_config["default"].target_parameters  # no fused-expert LoRA slipped in
        peft_model.save_pretrained(root / name)
        dirs[name] = root / name
    return dirs


@pytest.fixture(scope="module", params=KINDS)
def kind_dirs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, Path]]:
    return request.param, _build(request.param, tmp_path_factory.mktemp(request.param))


def _logits(model: torch.nn.Module, ids: torch.Tensor, **kwargs: object) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids, **kwargs).logits


def _reference(dirs: dict[str, Path]) -> PeftModel:
    model = PeftModel.from_pretrained(_peft_view(tf.AutoModelForCausalLM.from_pretrained(dirs["base"])), dirs["all"],
                                      adapter_name="all")
    model.load_adapter(str(dirs["some"]), adapter_name="some")
    return model.eval()


def test_every_linear_layer_matches_peft_alone_and_per_row(kind_dirs: tuple[str, dict[str, Path]]) -> None:
    kind, dirs = kind_dirs
    ids = torch.randint(3, VOCAB - 1, (4, 7), generator=torch.Generator().manual_seed(1))
    rows: list[str | None] = ["all", None, "some", "all"]
    reference = _reference(dirs)
    # Each row alone through peft: peft's own mixed batches (``adapter_names``) fail on 2-D inputs (qwen2_moe).
    expected = torch.cat([_peft_logits(reference, ids[i : i + 1], name) for i, name in enumerate(rows)])

    model = tf.AutoModelForCausalLM.from_pretrained(dirs["base"]).eval()
    base = _logits(model, ids)
    bank = LoraBank(model)
    for name in ("all", "some"):
        bank.install(read_adapter(name, str(dirs[name])))
    wrapped = {path for path, module in model.named_modules() if type(module).__name__ == "LoraLinear"}
    assert len(wrapped) == len(read_adapter("all", str(dirs["all"])).factors)  # every target is served
    bank.select(rows)
    got = _logits(model, ids)
    assert torch.allclose(got, expected, atol=1e-5), (kind, (got - expected).abs().max())
    assert torch.allclose(got[1], base[1], atol=1e-6)
    assert not torch.allclose(got[0], base[0], atol=1e-3)  # the adapter does something
    for name in ("all", "some"):
        bank.select([name])
        alone = _logits(model, ids[:1])
        assert torch.allclose(alone, _peft_logits(reference, ids[:1], name), atol=1e-5), (kind, name)


def _peft_logits(reference: PeftModel, ids: torch.Tensor, adapter: str | None) -> torch.Tensor:
    if adapter is None:
        with reference.disable_adapter():
            return _logits(reference, ids)
    reference.set_adapter(adapter)
    return _logits(reference, ids)


def _request(prompt: list[int], adapter: str | None) -> GenerationRequest:
    return GenerationRequest(request_id="t", prompt_token_ids=tuple(prompt), prompt_text="", adapter=adapter,
                             sampling=SamplingParams(max_tokens=8, temperature=0.0))


async def _tokens(backend: TorchBackend, request: GenerationRequest, delay: float) -> list[int]:
    await asyncio.sleep(delay)
    out: list[int] = []
    async for delta in backend.generate(request):
        out.extend(delta.token_ids)
    return out


def _peft_generate(reference: PeftModel, prompt: list[int], adapter: str | None) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        if adapter is None:
            with reference.disable_adapter():
                out = reference.generate(input_ids=ids, max_new_tokens=8, do_sample=False)
        else:
            reference.set_adapter(adapter)
            out = reference.generate(input_ids=ids, max_new_tokens=8, do_sample=False)
    tokens = out[0, len(prompt):].tolist()
    return tokens[: tokens.index(VOCAB - 1)] if VOCAB - 1 in tokens else tokens  # the engine does not send the eos


PROMPTS: list[tuple[list[int], str | None]] = [([5, 6, 7, 8, 9], "all"), ([10, 11, 12], None),
                                               ([13, 14, 15, 16, 17, 18, 19], "some"), ([20, 21], "all")]


JOIN_DELAYS = [0.0, 0.0, 0.01, 0.03]


async def test_engine_greedy_tokens_equal_peft_generate(kind_dirs: tuple[str, dict[str, Path]]) -> None:
    kind, dirs = kind_dirs
    reference = _reference(dirs)
    expected = [_peft_generate(reference, prompt, adapter) for prompt, adapter in PROMPTS]
    backend = await TorchBackend.load(dirs["base"], device="cpu", dtype="float32", pad_token_id=0)
    try:
        for name in ("all", "some"):
            await backend.load_adapter(name, str(dirs[name]))
        # The first two share a prefill; the others join the running batch between decode steps.
        got = await asyncio.gather(*(_tokens(backend, _request(p, a), delay)
                                     for delay, (p, a) in zip(JOIN_DELAYS, PROMPTS, strict=True)))
    finally:
        await backend.aclose()
    assert got == expected, kind


# --- layers whose input rows cannot be attributed --------------------------------------------------------------


class _RoutedMLP(torch.nn.Module):
    """A MoE block of per-expert ``nn.Linear`` (the transformers-4 / remote-code layout): each expert sees the tokens
    routed to it, gathered from every row."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.router = torch.nn.Linear(hidden, 2, bias=False)
        self.experts = torch.nn.ModuleList(torch.nn.Linear(hidden, hidden, bias=False) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        choice = self.router(flat).argmax(-1)
        out = torch.zeros_like(flat)
        for index, expert in enumerate(self.experts):
            picked = torch.where(choice == index)[0]
            out.index_add_(0, picked, expert(flat[picked]))
        return out.view_as(x)


class _SortedMLP(torch.nn.Module):
    """A layer fed the batch's tokens sorted by a score: every row's tokens, in an order that mixes the rows."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(hidden, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        order = flat.sum(-1).argsort()
        out = torch.empty_like(flat)
        out[order] = self.proj(flat[order])
        return out.view_as(x)


class _SeqFirstMLP(torch.nn.Module):
    """A layer that sees ``[seq, rows, in]``: every vector is one row's, but the rows are not outermost."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(hidden, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.transpose(0, 1).contiguous()).transpose(0, 1)


def _patched_llama(mlp: type[torch.nn.Module]) -> torch.nn.Module:
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(_config("llama")).eval()
    model.model.layers[1].mlp = mlp(32)
    return model


def _save_lora(model: torch.nn.Module, targets: list[str], folder: Path) -> Path:
    model_copy = get_peft_model(model, LoraConfig(r=4, target_modules=targets, init_lora_weights=False))
    model_copy.save_pretrained(folder)
    model_copy.unload()  # give the plain modules back
    return folder


@pytest.mark.parametrize(("mlp", "target", "why"), [
    (_RoutedMLP, "model.layers.1.mlp.experts.0", "one expert of a mixture-of-experts block"),
    (_SortedMLP, "model.layers.1.mlp.proj", "not grouped by batch row"),
    (_SeqFirstMLP, "model.layers.1.mlp.proj", "not grouped by batch row"),
])
def test_a_layer_whose_rows_cannot_be_told_apart_is_refused_at_install(
        mlp: type[torch.nn.Module], target: str, why: str, tmp_path: Path) -> None:
    model = _patched_llama(mlp)
    fine = _save_lora(model, ["model.layers.1.self_attn.q_proj"], tmp_path / "fine")
    bad = _save_lora(model, ["model.layers.1.self_attn.q_proj", target], tmp_path / "bad")
    bank = LoraBank(model)
    bank.install(read_adapter("fine", str(fine)))
    modules_before = [type(m).__name__ for m in model.modules()]
    with pytest.raises(AdapterLoadError, match=f"{target} cannot take a LoRA per request: .*{why}"):
        bank.install(read_adapter("bad", str(bad)))
    assert bank.names == ["fine"]
    assert [type(m).__name__ for m in model.modules()] == modules_before


def test_the_router_of_a_routed_block_is_fine(tmp_path: Path) -> None:
    """The router itself sees every row's tokens in order: it is served, and equals peft."""
    model = _patched_llama(_RoutedMLP)
    folder = _save_lora(model, ["model.layers.1.mlp.router", "model.layers.0.mlp.down_proj"], tmp_path / "router")
    ids = torch.randint(3, VOCAB - 1, (2, 5), generator=torch.Generator().manual_seed(2))
    reference = PeftModel.from_pretrained(model, folder).eval()
    expected = _logits(reference, ids)
    plain = reference.unload()
    bank = LoraBank(plain)
    bank.install(read_adapter("r", str(folder)))
    bank.select(["r", "r"])
    assert torch.allclose(_logits(plain, ids), expected, atol=1e-5)


# --- refusals say which module, what the served model has there, what the adapter wants ------------------------


def _hand_made_lora(folder: Path, factors: dict[str, tuple[int, int]], rank: int = 4) -> Path:
    """An adapter folder with LoRA factors for ``module -> (in, out)``, keyed as peft saves them."""
    folder.mkdir()
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for module, (fan_in, fan_out) in factors.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(rank, fan_in, generator=generator)
        tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(fan_out, rank, generator=generator)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    leaves = sorted({module.rsplit(".", 1)[-1] for module in factors})
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": rank,
                                                            "target_modules": leaves}))
    return folder


def test_a_transformers_4_router_lora_is_refused_naming_what_the_model_has(tmp_path: Path) -> None:
    """qwen2_moe's ``mlp.gate`` was an nn.Linear in transformers 4 (``lora_target: all`` took it); in transformers 5
    it is a router module that neither peft nor we can adapt."""
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(_config("qwen2_moe")).eval()
    folder = _hand_made_lora(tmp_path / "router", {"model.layers.0.mlp.gate": (32, 4),
                                                   "model.layers.0.self_attn.q_proj": (32, 32)})
    bank = LoraBank(model)
    with pytest.raises(AdapterLoadError, match=r"LoRA for model\.layers\.0\.mlp\.gate from 32 to 4 features .*"
                                               r"the served model has a Qwen2MoeTopKRouter there, not an nn\.Linear"):
        bank.install(read_adapter("router", str(folder)))
    assert bank.names == []
    assert not any(type(m).__name__ == "LoraLinear" for m in model.modules())


def test_the_gateway_says_what_the_base_has_where_it_is_not_a_linear_layer(tmp_path: Path) -> None:
    torch.manual_seed(0)
    tf.LlamaForCausalLM(_config("llama")).save_pretrained(tmp_path / "base")
    shapes = BaseShapes.read(tmp_path / "base")
    assert shapes is not None
    norm = _hand_made_lora(tmp_path / "norm", {"model.layers.0.input_layernorm": (32, 32)})
    with pytest.raises(AdapterLoadError, match=r"target_modules names input_layernorm, which the served base has "
                                               r"\(2, e\.g\. model\.layers\.0\.input_layernorm\) but not as linear"):
        inspect_adapter(norm, shapes)
    config = json.loads((norm / "adapter_config.json").read_text())
    (norm / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ".*input_layernorm"}))
    with pytest.raises(AdapterLoadError, match=r"adapts model\.layers\.0\.input_layernorm, which the served base "
                                               r"has, but not as one linear layer: it holds 1 tensor there \(weight\)"):
        inspect_adapter(norm, shapes)  # a regex target: checked through the weights
    absent = _hand_made_lora(tmp_path / "absent", {"model.layers.0.mlp.gate_proj": (32, 48),
                                                   "model.layers.9.mlp.gate_proj": (32, 48)})
    with pytest.raises(AdapterLoadError, match=r"adapts model\.layers\.9\.mlp\.gate_proj, which the served base "
                                               r"does not have"):
        inspect_adapter(absent, shapes)


async def test_a_refused_adapter_leaves_the_backend_serving(tmp_path: Path) -> None:
    """Through the native backend: the refusal comes from ``load_adapter`` and the base keeps generating."""
    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(_config("qwen2_moe")).save_pretrained(tmp_path / "base")
    folder = _hand_made_lora(tmp_path / "router", {"model.layers.1.mlp.gate": (32, 4)})
    backend = await TorchBackend.load(tmp_path / "base", device="cpu", dtype="float32", pad_token_id=0)
    try:
        before = await _tokens(backend, _request([5, 6, 7], None), 0.0)
        with pytest.raises(AdapterLoadError, match=r"model\.layers\.1\.mlp\.gate .*Qwen2MoeTopKRouter"):
            await backend.load_adapter("router", str(folder))
        assert await _tokens(backend, _request([5, 6, 7], None), 0.0) == before
    finally:
        await backend.aclose()
