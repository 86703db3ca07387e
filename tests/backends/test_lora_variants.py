"""The LoRA variants LLaMA-Factory writes (peft 0.21 ``LoraConfig`` options): each is served equal to peft per row
in a mixed batch (float32, tiny random models built here), with greedy engine tokens equal to peft's ``generate``, or
refused at read / install with an ``AdapterLoadError`` that names the option."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from backends.base import GenerationRequest, SamplingParams
from backends.lora import LoraBank, read_adapter
from backends.torch_native import TorchBackend
from gateway.errors import AdapterLoadError

VOCAB = 160
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# name -> LoraConfig options (init_lora_weights=False everywhere: the adapter must do something)
VARIANTS: dict[str, dict[str, Any]] = {
    "plain": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]},
    "rslora": {"r": 16, "lora_alpha": 8, "use_rslora": True, "target_modules": TARGETS},
    "dora": {"r": 4, "lora_alpha": 8, "use_dora": True, "target_modules": TARGETS},
    "patterns": {"r": 8, "lora_alpha": 16, "target_modules": TARGETS,
                 "rank_pattern": {"q_proj": 2, "layers.1.mlp.down_proj": 6},
                 "alpha_pattern": {"v_proj": 40, "^model.layers.0.self_attn.o_proj": 3}},
    "lora-bias": {"r": 4, "lora_alpha": 8, "lora_bias": True, "target_modules": ["q_proj", "o_proj"]},
    "modules-to-save": {"r": 4, "target_modules": ["q_proj"], "modules_to_save": ["embed_tokens", "lm_head"]},
    "embed-only": {"r": 4, "target_modules": ["v_proj"], "modules_to_save": ["embed_tokens"]},
    "tied-copy": {"r": 4, "target_modules": ["v_proj"], "modules_to_save": ["embed_tokens"],
                  "ensure_weight_tying": True},  # on a tied base peft ties lm_head to the copy and saves both
    "embedding-lora": {"r": 4, "lora_alpha": 8, "target_modules": ["embed_tokens", "q_proj"]},
    "tied-embedding-lora": {"r": 4, "lora_alpha": 8, "target_modules": ["embed_tokens", "q_proj"],
                           "ensure_weight_tying": True},  # on a tied base: lm_head gets the tied LoRA as well
    "tokens": {"r": 4, "target_modules": ["q_proj"], "trainable_token_indices": [3, 5, 17]},  # a tied head shares
    "tokens-by-layer": {"r": 4, "target_modules": ["q_proj"],
                        "trainable_token_indices": {"embed_tokens": [3, 5], "lm_head": [5, 9]}},
    "head-lora": {"r": 4, "lora_alpha": 8, "target_modules": ["lm_head", "v_proj"]},
}


def _qwen2() -> Qwen2ForCausalLM:  # tied embeddings
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                        initializer_range=0.2, eos_token_id=VOCAB - 1))


def _llama() -> LlamaForCausalLM:  # untied embeddings
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False,
                                        initializer_range=0.2, eos_token_id=VOCAB - 1))


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Make what ``init_lora_weights=False`` leaves at the base's values differ from it (copies, DoRA magnitudes,
    LoRA-B biases)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "modules_to_save" in name or "lora_magnitude_vector" in name or "lora_B" in name and "bias" in name \
                    or "trainable_tokens_delta" in name:
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))


def _gemma3() -> Gemma3ForCausalLM:  # a scaled embedding (embed_scale in its forward), tied
    return Gemma3ForCausalLM(Gemma3TextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                              head_dim=16, initializer_range=0.2, eos_token_id=VOCAB - 1))


_MODELS = {"qwen2": _qwen2, "llama": _llama, "gemma3": _gemma3}


def _save(root: Path, kind: str, variants: list[str]) -> dict[str, Path]:
    torch.manual_seed(0)
    base_model = _MODELS[kind]()
    base_model.save_pretrained(root / "base")
    out = {"base": root / "base", "class": Path(type(base_model).__name__)}
    for index, name in enumerate(variants):
        torch.manual_seed(10 + index)
        base = type(base_model).from_pretrained(root / "base")
        peft_model = get_peft_model(base, LoraConfig(init_lora_weights=False, **VARIANTS[name]))
        _perturb(peft_model, index)
        peft_model.save_pretrained(root / name)
        out[name] = root / name
    return out


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def dirs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return _save(tmp_path_factory.mktemp(request.param), request.param, list(VARIANTS))


def _base(dirs: dict[str, Path]) -> torch.nn.Module:
    classes = {cls.__name__: cls for cls in (Qwen2ForCausalLM, LlamaForCausalLM, Gemma3ForCausalLM)}
    return classes[str(dirs["class"])].from_pretrained(dirs["base"]).eval()


def _peft_rows(dirs: dict[str, Path], rows: list[str | None], ids: torch.Tensor) -> torch.Tensor:
    """Each row's logits from peft with that row's adapter alone (peft refuses ``adapter_names`` with DoRA)."""
    out = []
    for row, adapter in enumerate(rows):
        with torch.inference_mode():
            if adapter is None:
                out.append(_base(dirs)(input_ids=ids[row : row + 1]).logits[0])
            else:
                reference = PeftModel.from_pretrained(_base(dirs), dirs[adapter]).eval()
                out.append(reference(input_ids=ids[row : row + 1]).logits[0])
    return torch.stack(out)


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "plain"])
def test_each_row_of_a_mixed_batch_equals_peft(dirs: dict[str, Path], variant: str) -> None:
    ids = torch.randint(0, VOCAB, (4, 7), generator=torch.Generator().manual_seed(3))
    ids[:, 1:4] = torch.tensor([3, 5, 17])  # the trainable tokens' ids
    rows: list[str | None] = [variant, None, "plain", variant]
    expected = _peft_rows(dirs, rows, ids)

    model = _base(dirs)
    with torch.inference_mode():
        base = model(input_ids=ids).logits
    bank = LoraBank(model)
    for name in ("plain", variant):
        bank.install(read_adapter(name, str(dirs[name])))
    bank.select(rows)
    with torch.inference_mode():
        got = model(input_ids=ids).logits
    # float32 rounding grows with the logits' size (random adapters make some of them ~100): 1e-5 of the largest
    tolerance = 1e-5 * float(expected.abs().max().clamp(min=1))
    assert (got - expected).abs().max() <= tolerance, ((got - expected).abs().amax(dim=(1, 2)), tolerance)
    assert not torch.allclose(got[0], base[0], atol=1e-3)  # the variant does something
    bank.select([None, None, "plain", None])  # a batch without the variant's rows: base rows are the base
    with torch.inference_mode():
        without = model(input_ids=ids).logits
    assert torch.allclose(without[[0, 1, 3]], base[[0, 1, 3]], atol=1e-6)
    bank.remove(variant)
    bank.select([None, "plain", None, None])
    with torch.inference_mode():
        after = model(input_ids=ids).logits
    assert torch.allclose(after[[0, 2, 3]], base[[0, 2, 3]], atol=1e-6)


def test_a_scaled_embedding_scales_embedding_lora_and_trainable_tokens_as_peft(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    names = ["embedding-lora", "tokens", "embed-only", "plain"]
    dirs = _save(tmp_path_factory.mktemp("gemma3"), "gemma3", names)
    ids = torch.randint(0, VOCAB, (5, 6), generator=torch.Generator().manual_seed(5))
    ids[:, 1:4] = torch.tensor([3, 5, 17])
    rows: list[str | None] = ["embedding-lora", "tokens", None, "embed-only", "plain"]
    expected = _peft_rows(dirs, rows, ids)
    model = _base(dirs)
    bank = LoraBank(model)
    for name in names:
        bank.install(read_adapter(name, str(dirs[name])))
    bank.select(rows)
    with torch.inference_mode():
        got = model(input_ids=ids).logits
    assert (got - expected).abs().max() <= 1e-5 * float(expected.abs().max().clamp(min=1))


@pytest.mark.parametrize("order", [["head-lora", "modules-to-save"], ["modules-to-save", "head-lora"]])
def test_lora_on_the_head_and_own_heads_share_a_batch(dirs: dict[str, Path], order: list[str]) -> None:
    ids = torch.randint(0, VOCAB, (4, 5), generator=torch.Generator().manual_seed(6))
    rows: list[str | None] = ["modules-to-save", "head-lora", None, "head-lora"]
    expected = _peft_rows(dirs, rows, ids)
    model = _base(dirs)
    bank = LoraBank(model)
    for name in order:
        bank.install(read_adapter(name, str(dirs[name])))
    for _ in range(2):  # the second pass may reuse gathered factors
        bank.select(rows)
        with torch.inference_mode():
            got = model(input_ids=ids).logits
        assert (got - expected).abs().max() <= 1e-5 * float(expected.abs().max().clamp(min=1))


def test_rslora_scaling_is_alpha_over_the_square_root_of_r(dirs: dict[str, Path]) -> None:
    weights = read_adapter("rslora", str(dirs["rslora"]))
    from safetensors.torch import load_file
    saved = load_file(str(dirs["rslora"] / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    assert torch.allclose(weights.factors["model.layers.0.self_attn.q_proj"][1], saved[key] * 8 / 16**0.5)


def test_patterns_give_each_module_its_rank_and_alpha(dirs: dict[str, Path]) -> None:
    weights = read_adapter("patterns", str(dirs["patterns"]))
    assert weights.factors["model.layers.0.self_attn.q_proj"][0].shape[0] == 2
    assert weights.factors["model.layers.1.mlp.down_proj"][0].shape[0] == 6
    assert weights.factors["model.layers.0.mlp.down_proj"][0].shape[0] == 8


async def _tokens(backend: TorchBackend, prompt: list[int], adapter: str | None, max_tokens: int) -> list[int]:
    request = GenerationRequest("t", tuple(prompt), "", adapter, SamplingParams(max_tokens=max_tokens,
                                                                                 temperature=0.0))
    return [token async for delta in backend.generate(request) for token in delta.token_ids]


async def test_engine_greedy_tokens_equal_peft_generate_in_one_mixed_batch(dirs: dict[str, Path]) -> None:
    """Every variant and a base row, 15 requests at once on an engine of 8 rows: the rest join as rows finish."""
    generator = torch.Generator().manual_seed(9)
    prompts: dict[str | None, list[int]] = {
        adapter: [3, 5, 17, *torch.randint(0, VOCAB, (2 + index % 4,), generator=generator).tolist()]
        for index, adapter in enumerate([None, *VARIANTS])}
    expected = {}
    for adapter, prompt in prompts.items():
        model = _base(dirs) if adapter is None else PeftModel.from_pretrained(_base(dirs), dirs[adapter]).eval()
        with torch.inference_mode():
            out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=6 + len(prompt) % 5,
                                 do_sample=False, eos_token_id=None, pad_token_id=0)
        expected[adapter] = out[0, len(prompt) :].tolist()
    backend = await TorchBackend.load(dirs["base"], device="cpu", dtype="float32", pad_token_id=0,
                                      stop_on_model_eos=False, max_batch_size=8)
    try:
        for name in VARIANTS:
            await backend.load_adapter(name, str(dirs[name]))
        got = await asyncio.gather(*(_tokens(backend, p, a, 6 + len(p) % 5) for a, p in prompts.items()))
    finally:
        await backend.aclose()
    assert dict(zip(prompts, got, strict=True)) == expected


def _edited(source: Path, target: Path, **changes: Any) -> Path:
    shutil.copytree(source, target)
    config = json.loads((target / "adapter_config.json").read_text(encoding="utf-8"))
    (target / "adapter_config.json").write_text(json.dumps({**config, **changes}), encoding="utf-8")
    return target


@pytest.mark.parametrize(("changes", "named"), [
    ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa'"),
    ({"init_lora_weights": "pissa_niter_4"}, "rewrites the base weights"),
    ({"init_lora_weights": "olora"}, "init_lora_weights='olora'"),
    ({"init_lora_weights": "loftq"}, "init_lora_weights='loftq'"),
    ({"init_lora_weights": "corda"}, "init_lora_weights='corda'"),
    ({"layer_replication": [[0, 2], [1, 2]]}, "layer_replication"),
    ({"alora_invocation_tokens": [5, 6]}, "alora_invocation_tokens"),
    ({"use_qalora": True}, "use_qalora"),
    ({"bias": "all"}, "bias='all'"),
    ({"use_dora": True}, "lora_magnitude_vector"),  # a flag without the magnitudes it needs
    ({"rank_pattern": {"q_proj": 4}}, "rank 8 in the weights but 4"),
])
def test_what_cannot_be_served_is_refused_with_the_option_named(
        dirs: dict[str, Path], tmp_path: Path, changes: dict[str, Any], named: str) -> None:
    folder = _edited(dirs["plain"], tmp_path / "edited", **changes)
    with pytest.raises(AdapterLoadError, match="") as refused:
        read_adapter("x", str(folder))
    assert named in refused.value.message


@pytest.mark.parametrize("changes", [
    {"init_lora_weights": "eva"}, {"init_lora_weights": "gaussian"}, {"init_lora_weights": "orthogonal"},
    {"init_lora_weights": True}, {"fan_in_fan_out": True}, {"lora_dropout": 0.3}, {"velora_config": {"rank": 4}},
])
def test_options_that_leave_the_inference_math_alone_are_served_as_plain_lora(
        dirs: dict[str, Path], tmp_path: Path, changes: dict[str, Any]) -> None:
    plain = read_adapter("plain", str(dirs["plain"]))
    edited = read_adapter("x", str(_edited(dirs["plain"], tmp_path / "edited", **changes)))
    assert edited.factors.keys() == plain.factors.keys()
    assert all(torch.equal(edited.factors[k][1], plain.factors[k][1]) for k in plain.factors)


def test_fan_in_fan_out_on_linear_layers_is_what_peft_serves(dirs: dict[str, Path], tmp_path: Path) -> None:
    folder = _edited(dirs["plain"], tmp_path / "fan", fan_in_fan_out=True)  # peft ignores it on nn.Linear
    ids = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(8))
    with torch.inference_mode():
        expected = PeftModel.from_pretrained(_base(dirs), folder).eval()(input_ids=ids).logits
    model = _base(dirs)
    bank = LoraBank(model)
    bank.install(read_adapter("fan", str(folder)))
    bank.select(["fan"])
    with torch.inference_mode():
        assert torch.allclose(model(input_ids=ids).logits, expected, atol=1e-5)


def test_dora_on_an_embedding_is_refused(dirs: dict[str, Path], tmp_path: Path) -> None:
    peft_model = get_peft_model(_base(dirs), LoraConfig(target_modules=["embed_tokens", "q_proj"], use_dora=True,
                                                        init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "dora-embedding")
    with pytest.raises(AdapterLoadError, match="use_dora on an embedding"):
        read_adapter("x", str(tmp_path / "dora-embedding"))


def test_a_resized_vocabulary_is_refused_at_install_and_nothing_changes(dirs: dict[str, Path],
                                                                         tmp_path: Path) -> None:
    grown = _base(dirs)
    grown.resize_token_embeddings(VOCAB + 8)
    peft_model = get_peft_model(grown, LoraConfig(target_modules=["q_proj"], modules_to_save=["embed_tokens",
                                                                                               "lm_head"]))
    peft_model.save_pretrained(tmp_path / "grown")
    model = _base(dirs)
    bank = LoraBank(model)
    bank.install(read_adapter("plain", str(dirs["plain"])))
    before = [type(m).__name__ for m in model.modules()]
    with pytest.raises(AdapterLoadError, match="resized"):
        bank.install(read_adapter("grown", str(tmp_path / "grown")))
    assert bank.names == ["plain"] and [type(m).__name__ for m in model.modules()] == before


def test_modules_to_save_other_than_the_embeddings_is_refused_at_install(dirs: dict[str, Path],
                                                                         tmp_path: Path) -> None:
    peft_model = get_peft_model(_base(dirs), LoraConfig(target_modules=["q_proj"], modules_to_save=["norm"]))
    peft_model.save_pretrained(tmp_path / "norm")
    bank = LoraBank(_base(dirs))
    with pytest.raises(AdapterLoadError, match="modules_to_save model.*only the input embedding and the output head"):
        bank.install(read_adapter("norm", str(tmp_path / "norm")))
    assert bank.names == []


def test_a_pissa_adapter_converted_to_plain_lora_is_served_on_the_unmodified_base(dirs: dict[str, Path],
                                                                                    tmp_path: Path) -> None:
    torch.manual_seed(7)
    pissa = get_peft_model(_base(dirs), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                   init_lora_weights="pissa"))
    pissa.save_pretrained(tmp_path / "initial")
    with torch.no_grad():  # "training"
        for name, parameter in pissa.named_parameters():
            if "lora_" in name:
                parameter.add_(0.05 * torch.randn_like(parameter))
    pissa.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    assert json.loads((tmp_path / "converted" / "adapter_config.json").read_text())["init_lora_weights"] is True
    ids = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        trained = pissa(input_ids=ids).logits  # on peft's residual base
    model = _base(dirs)
    bank = LoraBank(model)
    bank.install(read_adapter("pissa", str(tmp_path / "converted")))
    bank.select(["pissa"])
    with torch.inference_mode():
        got = model(input_ids=ids).logits
    assert (got - trained).abs().max() < 1e-4
    with pytest.raises(AdapterLoadError, match="pissa"):  # the unconverted one needs the residual base
        read_adapter("raw", str(_edited(tmp_path / "converted", tmp_path / "raw", init_lora_weights="pissa")))
