"""``LoraBank`` computes what peft computes, per row, for adapters of different ranks and target modules."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import Qwen2Config, Qwen2ForCausalLM

from backends.lora import LoraBank, read_adapter
from gateway.errors import AdapterLoadError

ADAPTERS = {"a": (8, ["q_proj", "v_proj"]), "b": (4, ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"])}


def _config(hidden: int = 64) -> Qwen2Config:
    return Qwen2Config(vocab_size=128, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora")
    torch.manual_seed(0)
    Qwen2ForCausalLM(_config()).save_pretrained(root / "base")
    out = {"base": root / "base"}
    for index, (name, (rank, targets)) in enumerate(ADAPTERS.items()):
        torch.manual_seed(10 + index)
        model = Qwen2ForCausalLM.from_pretrained(root / "base")
        lora = LoraConfig(r=rank, lora_alpha=2 * rank + 3, target_modules=targets, init_lora_weights=False)
        get_peft_model(model, lora).save_pretrained(root / name)
        out[name] = root / name
    torch.manual_seed(5)
    small = Qwen2ForCausalLM(_config(hidden=32))
    get_peft_model(small, LoraConfig(r=8, target_modules=["q_proj"], init_lora_weights=False)).save_pretrained(
        root / "other-size")
    out["other-size"] = root / "other-size"
    return out


def _logits(model: torch.nn.Module, ids: torch.Tensor, **kwargs: object) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids, **kwargs).logits


def test_rows_match_peft_in_one_mixed_batch(dirs: dict[str, Path]) -> None:
    ids = torch.randint(0, 128, (4, 6), generator=torch.Generator().manual_seed(1))
    rows: list[str | None] = ["a", None, "b", "a"]

    reference = PeftModel.from_pretrained(Qwen2ForCausalLM.from_pretrained(dirs["base"]), dirs["a"], adapter_name="a")
    reference.load_adapter(str(dirs["b"]), adapter_name="b")
    expected = _logits(reference.eval(), ids, adapter_names=[r or "__base__" for r in rows])

    model = Qwen2ForCausalLM.from_pretrained(dirs["base"]).eval()
    base = _logits(model, ids)
    bank = LoraBank(model)
    for name in ("a", "b"):
        bank.install(read_adapter(name, str(dirs[name])))
    bank.select(rows)
    got = _logits(model, ids)

    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    assert not torch.allclose(got[0], base[0], atol=1e-3)  # the adapter does something
    bank.remove("a")
    bank.select([None, None, "b", None])
    after = _logits(model, ids)
    assert torch.allclose(after[[0, 1, 3]], base[[0, 1, 3]], atol=1e-6)
    assert torch.allclose(after[2], expected[2], atol=1e-5)
    bank.select([None, None, "b", None])
    assert torch.equal(_logits(model, ids), after)  # same rows again: factors gathered last time are reused
    bank.install(read_adapter("b", str(dirs["a"])))  # new weights under the same name (and slot)
    bank.select([None, None, "b", None])
    with_a = _logits(reference, ids, adapter_names=["__base__", "__base__", "a", "__base__"])
    assert torch.allclose(_logits(model, ids)[2], with_a[2], atol=1e-5)


def test_an_adapter_for_another_model_size_is_refused_and_nothing_changes(dirs: dict[str, Path]) -> None:
    model = Qwen2ForCausalLM.from_pretrained(dirs["base"]).eval()
    bank = LoraBank(model)
    bank.install(read_adapter("a", str(dirs["a"])))
    modules_before = [type(m).__name__ for m in model.modules()]
    with pytest.raises(AdapterLoadError, match=r"LoRA for model\.layers\.\d\.self_attn\.q_proj from 32 to 32 features "
                                               r"\(rank 8\), but the served model has an nn\.Linear from 64 to 64"):
        bank.install(read_adapter("x", str(dirs["other-size"])))
    assert bank.names == ["a"]
    assert [type(m).__name__ for m in model.modules()] == modules_before
