"""EXAONE 3 adapters in either naming: EXAONE's own (``transformer.h.N.attn.attention.q_proj``, trained before
transformers 5) and transformers 5's (EXAONE is loaded as ``LlamaForCausalLM``): both pass the gateway's file check,
install, equal peft in float32, and give peft's greedy tokens in the engine."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import torch
import transformers as tf
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from backends.lora import LoraBank, read_adapter
from backends.torch_native import TorchBackend
from gateway.adapter_files import BaseShapes, inspect_adapter
from tests.backends.test_lora_shapes import (
    _COMMON,
    JOIN_DELAYS,
    PROMPTS,
    VOCAB,
    _logits,
    _peft_generate,
    _request,
    _tokens,
)

# EXAONE's own modelling code names (LGAI's modeling_exaone.py, what LLaMA-Factory on transformers 4 trained on),
# written out here independently of transformers' conversion table, which the code under test uses.
_EXAONE_NAMES = [("model.layers.", "transformer.h."), (".self_attn.o_proj", ".attn.attention.out_proj"),
                 (".self_attn.", ".attn.attention."), (".mlp.gate_proj", ".mlp.c_fc_0"),
                 (".mlp.up_proj", ".mlp.c_fc_1"), (".mlp.down_proj", ".mlp.c_proj")]
_EXAONE_LEAVES = {"o_proj": "out_proj", "gate_proj": "c_fc_0", "up_proj": "c_fc_1", "down_proj": "c_proj"}


def _exaone_target(name: str) -> str:
    for old, new in _EXAONE_NAMES:
        name = name.replace(old, new)
    return _EXAONE_LEAVES.get(name, name)


def _exaone_named(folder: Path, target: Path) -> Path:
    """The adapter in ``folder`` as it would be saved from EXAONE's original layout: same numbers, EXAONE's names."""
    target.mkdir()
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    renamed = {}
    for key, tensor in tensors.items():
        renamed[_exaone_target(key)] = tensor
    save_file(renamed, str(target / "adapter_model.safetensors"))
    config = json.loads((folder / "adapter_config.json").read_text())
    config["target_modules"] = sorted(_exaone_target(name) for name in config["target_modules"])
    (target / "adapter_config.json").write_text(json.dumps(config))
    return target


@pytest.fixture(scope="module")
def exaone_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("exaone")
    torch.manual_seed(0)
    config = tf.ExaoneConfig(**_COMMON)
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(root / "base")  # written in EXAONE's names
    torch.manual_seed(3)
    model = tf.AutoModelForCausalLM.from_pretrained(root / "base")
    lora = LoraConfig(r=4, lora_alpha=9, target_modules="all-linear", init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(root / "v5")  # peft on transformers 5: the loaded (Llama) names
    return {"base": root / "base", "v5": root / "v5", "exaone": _exaone_named(root / "v5", root / "exaone")}


def test_exaone_adapters_in_either_naming_equal_peft(exaone_dirs: dict[str, Path]) -> None:
    assert "transformer.h.0.attn.attention.q_proj.weight" in load_file(
        str(exaone_dirs["base"] / "model.safetensors"))
    assert any(".attn.attention.out_proj." in key for key in load_file(
        str(exaone_dirs["exaone"] / "adapter_model.safetensors")))
    ids = torch.randint(3, VOCAB - 1, (3, 6), generator=torch.Generator().manual_seed(4))
    reference = PeftModel.from_pretrained(tf.AutoModelForCausalLM.from_pretrained(exaone_dirs["base"]),
                                          exaone_dirs["v5"]).eval()
    expected = _logits(reference, ids)
    model = tf.AutoModelForCausalLM.from_pretrained(exaone_dirs["base"]).eval()
    assert type(model).__name__ == "LlamaForCausalLM"
    base = _logits(model, ids)
    bank = LoraBank(model)
    bank.install(read_adapter("exaone", str(exaone_dirs["exaone"])))
    bank.install(read_adapter("v5", str(exaone_dirs["v5"])))
    for name in ("exaone", "v5"):
        bank.select([name, None, name])
        got = _logits(model, ids)
        assert torch.allclose(got[[0, 2]], expected[[0, 2]], atol=1e-5), (name, (got - expected).abs().max())
        assert torch.allclose(got[1], base[1], atol=1e-6)


def test_exaone_adapters_in_either_naming_pass_the_gateways_file_check(exaone_dirs: dict[str, Path]) -> None:
    shapes = BaseShapes.read(exaone_dirs["base"])
    assert shapes is not None
    for name in ("exaone", "v5"):
        info = inspect_adapter(exaone_dirs[name], shapes)
        assert info.rank == 4


async def test_exaone_engine_greedy_tokens_equal_peft_generate(exaone_dirs: dict[str, Path]) -> None:
    reference = PeftModel.from_pretrained(tf.AutoModelForCausalLM.from_pretrained(exaone_dirs["base"]),
                                          exaone_dirs["v5"], adapter_name="v5").eval()
    prompts = [(p, None if a is None else "exaone") for p, a in PROMPTS]
    expected = [_peft_generate(reference, p, None if a is None else "v5") for p, a in prompts]
    backend = await TorchBackend.load(exaone_dirs["base"], device="cpu", dtype="float32", pad_token_id=0)
    try:
        await backend.load_adapter("exaone", str(exaone_dirs["exaone"]))
        got = await asyncio.gather(*(_tokens(backend, _request(p, a), delay)
                                     for delay, (p, a) in zip(JOIN_DELAYS, prompts, strict=True)))
    finally:
        await backend.aclose()
    assert got == expected
