"""Adapter folder checks, from files alone: roots, pickle weights, shapes against the base."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import Qwen2Config, Qwen2ForCausalLM

from backends.lora import read_adapter
from gateway.adapter_files import BaseShapes, confine, inspect_adapter
from gateway.errors import AdapterLoadError


def _model(hidden: int) -> Qwen2ForCausalLM:
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden,
                                        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("files")
    torch.manual_seed(0)
    base = _model(32)
    base.save_pretrained(root / "base")
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(_model(32), lora).save_pretrained(root / "roots" / "one" / "good")
    get_peft_model(_model(48), lora).save_pretrained(root / "bigger")
    good = root / "roots" / "one" / "good"
    pickled = root / "roots" / "one" / "pickled"
    pickled.mkdir()
    shutil.copy(good / "adapter_config.json", pickled)
    torch.save(load_file(good / "adapter_model.safetensors"), pickled / "adapter_model.bin")
    lying = root / "roots" / "one" / "lying"
    shutil.copytree(good, lying)
    config = json.loads((lying / "adapter_config.json").read_text())
    (lying / "adapter_config.json").write_text(json.dumps({**config, "r": 16}))
    extra = root / "roots" / "one" / "extra-module"
    shutil.copytree(good, extra)
    (extra / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["q_proj", "w_gate"]}))
    (root / "roots" / "one" / "out").symlink_to(root / "bigger", target_is_directory=True)
    return {"root": root / "roots" / "one", "base": root / "base", "good": good, "pickled": pickled,
            "lying": lying, "extra": extra, "bigger": root / "bigger"}


def test_confine_keeps_paths_inside_the_roots(folders: dict[str, Path]) -> None:
    root = folders["root"]
    assert confine("good", [root]) == folders["good"].resolve()
    assert confine(folders["good"], [root]) == folders["good"].resolve()
    assert confine(folders["bigger"], []) == folders["bigger"].resolve()  # no roots: any folder
    for path in ["../one/good", "good/../good", "out", str(folders["bigger"]), "missing"]:
        with pytest.raises(AdapterLoadError):
            confine(path, [root])


def test_inspect_reports_and_refuses(folders: dict[str, Path]) -> None:
    shapes = BaseShapes.read(folders["base"])
    assert shapes is not None and shapes.linear["model.layers.0.self_attn.q_proj"] == (32, 32)
    info = inspect_adapter(folders["good"], shapes)
    assert (info.rank, info.target_modules, info.safetensors) == (4, ("q_proj", "v_proj"), True)
    assert info.size_bytes == (folders["good"] / "adapter_model.safetensors").stat().st_size
    with pytest.raises(AdapterLoadError, match="allow-unsafe-adapters"):
        inspect_adapter(folders["pickled"], shapes)
    assert not inspect_adapter(folders["pickled"], shapes, allow_unsafe=True).safetensors
    with pytest.raises(AdapterLoadError, match="does not fit the served base"):
        inspect_adapter(folders["bigger"], shapes)
    with pytest.raises(AdapterLoadError, match="r=16"):
        inspect_adapter(folders["lying"], shapes)
    with pytest.raises(AdapterLoadError, match="w_gate"):
        inspect_adapter(folders["extra"], shapes)


def test_pickle_weights_load_when_allowed(folders: dict[str, Path]) -> None:
    from_pickle = read_adapter("p", str(folders["pickled"]))
    from_safetensors = read_adapter("s", str(folders["good"]))
    assert from_pickle.factors.keys() == from_safetensors.factors.keys()
    for module, (a, b) in from_safetensors.factors.items():
        assert torch.equal(from_pickle.factors[module][0], a) and torch.equal(from_pickle.factors[module][1], b)
