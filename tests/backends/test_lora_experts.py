"""LoRA on fused MoE experts: ``LoraBank`` computes what peft computes, per row, on every fused-experts architecture.

peft 0.21 cannot run a mixed batch over parameter-targeted LoRA (``adapter_names`` is refused there), so each row
of our mixed batch is compared with peft running that row's adapter alone (or the base, adapters disabled).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from backends import lora_experts
from backends.base import GenerationRequest, SamplingParams
from backends.lora import LoraBank, read_adapter
from backends.torch_native import TorchBackend
from gateway.adapter_files import BaseShapes, inspect_adapter
from gateway.errors import AdapterLoadError

VOCAB = 96
# Tiny configs: hidden 32, expert width 24 (gate_up 48 rows), 4 experts, top-2; every layer is MoE unless the
# architecture keeps dense first layers (deepseek_v3, glm4_moe: layer 0 dense).
ARCHS: dict[str, dict[str, Any]] = {
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, head_dim=16),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                      shared_expert_intermediate_size=40),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=24),
    "glm4_moe": dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, n_shared_experts=1,
                     first_k_dense_replace=1, n_group=1, topk_group=1, head_dim=16),
    "deepseek_v3": dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, n_shared_experts=1,
                        first_k_dense_replace=1, n_group=1, topk_group=1, q_lora_rank=16, kv_lora_rank=16,
                        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, num_key_value_heads=2),  # MLA: kv = q
    "ernie4_5_moe": dict(moe_num_experts=4, moe_k=2, moe_intermediate_size=24, moe_num_shared_experts=1,
                         moe_layer_start_index=0),
}
# LLaMA-Factory's `lora_target: all` names the projections; mixtral's experts are w1/w2/w3 (transformers 4 names).
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# deepseek_v3's MLA has no q/k/v_proj (LLaMA-Factory's `all` lists the linears the model has).
TARGETS = {"mixtral": ["q_proj", "v_proj", "w1", "w2", "w3"],
           "deepseek_v3": ["q_a_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


def build(arch: str, seed: int = 0) -> PreTrainedModel:
    options = {"intermediate_size": 40, "num_key_value_heads": 1, **ARCHS[arch]}
    config = AutoConfig.for_model(arch, vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  initializer_range=0.2, max_position_embeddings=128, eos_token_id=VOCAB - 1,
                                  pad_token_id=0, **options)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def peft_adapter(base_dir: Path, out: Path, seed: int, **lora: Any) -> Path:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    get_peft_model(model, LoraConfig(init_lora_weights=False, **lora)).save_pretrained(out)
    return out


@pytest.fixture(scope="module", params=list(ARCHS))
def arch_dirs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    arch = request.param
    root = tmp_path_factory.mktemp(arch)
    build(arch).save_pretrained(root / "base")
    targets = TARGETS.get(arch, ALL)
    dirs: dict[str, Any] = {"arch": arch, "base": root / "base"}
    if arch == "qwen2_moe":  # peft keeps gate/up/down as linear targets here: name the fused parameters directly
        extra: dict[str, Any] = {"target_parameters": ["gate_up_proj", "down_proj"]}
        targets = ["q_proj", "v_proj"]
    else:
        extra = {}
    dirs["a"] = peft_adapter(root / "base", root / "a", 1, r=4, lora_alpha=11, target_modules=targets, **extra)
    dirs["b"] = peft_adapter(root / "base", root / "b", 2, r=8, lora_alpha=8, use_rslora=True,
                             target_modules=targets[-3:], **extra)
    return dirs


def _logits(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids, attention_mask=mask).logits


def _peft(dirs: dict[str, Any], name: str) -> PeftModel:
    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(dirs["base"]), dirs[name]).eval()


def test_the_adapters_adapt_fused_experts(arch_dirs: dict[str, Any]) -> None:
    for name in ("a", "b"):
        weights = read_adapter(name, str(arch_dirs[name]))
        assert {key.rsplit(".", 1)[1] for key in weights.experts} == {"gate_up_proj", "down_proj"}


def test_rows_match_peft_alone_and_in_a_mixed_batch(arch_dirs: dict[str, Any]) -> None:
    ids = torch.randint(1, VOCAB - 1, (4, 7), generator=torch.Generator().manual_seed(3))
    rows: list[str | None] = ["a", None, "b", "a"]
    model = AutoModelForCausalLM.from_pretrained(arch_dirs["base"]).eval()
    base = _logits(model, ids)
    bank = LoraBank(model)
    for name in ("a", "b"):
        bank.install(read_adapter(name, str(arch_dirs[name])))
    bank.select(rows)
    mixed = _logits(model, ids)
    for name in ("a", "b"):
        reference = _peft(arch_dirs, name)
        expected = _logits(reference, ids)
        picked = [i for i, row in enumerate(rows) if row == name]
        gap = (mixed[picked] - expected[picked]).abs().max()
        assert torch.allclose(mixed[picked], expected[picked], atol=1e-5), gap
        assert not torch.allclose(expected[picked], base[picked], atol=1e-3)  # the adapter does something
        bank.select([name] * len(rows))
        assert torch.allclose(_logits(model, ids), expected, atol=1e-5)  # the adapter alone, whole batch
    assert torch.allclose(mixed[1], base[1], atol=1e-5)
    bank.select([None] * len(rows))
    assert torch.equal(_logits(model, ids), base)  # all on the base: the experts' own forward
    bank.remove("a")
    bank.select([None, None, "b", None])
    after = _logits(model, ids)
    assert torch.allclose(after[[0, 1, 3]], base[[0, 1, 3]], atol=1e-5)
    assert torch.allclose(after[2], mixed[2], atol=1e-5)


async def test_engine_greedy_tokens_equal_peft_generate(arch_dirs: dict[str, Any]) -> None:
    prompts: list[tuple[list[int], str | None]] = [([5, 6, 7, 8, 9], "a"), ([10, 11, 12], None),
                                                   ([13, 14, 15, 16, 17, 18], "b"), ([20, 21, 22], "a")]
    backend = await TorchBackend.load(arch_dirs["base"], device="cpu", dtype="float32", pad_token_id=0)
    try:
        for name in ("a", "b"):
            await backend.load_adapter(name, str(arch_dirs[name]))

        async def one(index: int, prompt: list[int], adapter: str | None, delay: float) -> list[int]:
            await asyncio.sleep(delay)  # later rows join a running batch
            request = GenerationRequest(request_id=f"r{index}", prompt_token_ids=tuple(prompt), prompt_text="",
                                        adapter=adapter,
                                        sampling=SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
            return [t async for d in backend.generate(request) for t in d.token_ids]

        got = await asyncio.gather(*(one(i, p, a, 0.05 * i) for i, (p, a) in enumerate(prompts)))
    finally:
        await backend.aclose()
    references = {name: _peft(arch_dirs, name) for name in ("a", "b")}
    plain = AutoModelForCausalLM.from_pretrained(arch_dirs["base"]).eval()
    for (prompt, adapter), tokens in zip(prompts, got, strict=True):
        model = references[adapter] if adapter else plain
        model.generation_config.eos_token_id = None  # the engine ignores EOS; min_new_tokens would mask it instead
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                                 do_sample=False, pad_token_id=0)
        assert tokens == out[0, len(prompt):].tolist(), (prompt, adapter)


# --- transformers-4 per-expert layout ---------------------------------------------------------------------------

PER_EXPERT_NAMES = {"mixtral": ("block_sparse_moe", "w1", "w3", "w2"), "qwen3_moe": ("mlp", "gate_proj", "up_proj",
                                                                                     "down_proj")}


def _per_expert_adapter(model: PreTrainedModel, arch: str, folder: Path, rank: int, alpha: float) -> dict[str, Any]:
    """A transformers-4-style adapter folder with one random LoRA per expert projection; returns the tensors."""
    block, gate, up, down = PER_EXPERT_NAMES[arch]
    generator = torch.Generator().manual_seed(7)
    tensors = {}
    for index, layer in enumerate(model.model.layers):
        experts = layer.mlp.experts
        count, fused, hidden = experts.gate_up_proj.shape
        shapes = {gate: (fused // 2, hidden), up: (fused // 2, hidden), down: (hidden, fused // 2)}
        for expert in range(count):
            for proj, (out_features, in_features) in shapes.items():
                key = f"base_model.model.model.layers.{index}.{block}.experts.{expert}.{proj}"
                tensors[f"{key}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator) * 0.3
                tensors[f"{key}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator) * 0.3
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": [gate, up, down],
              "task_type": "CAUSAL_LM"}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return tensors


def _merged_reference(model: PreTrainedModel, arch: str, tensors: dict[str, Any], scaling: float) -> None:
    """Independent reference: add each expert's ``scaling * B @ A`` into the fused weights, in place."""
    block, gate, up, down = PER_EXPERT_NAMES[arch]
    with torch.no_grad():
        for index, layer in enumerate(model.model.layers):
            experts = layer.mlp.experts
            width = experts.gate_up_proj.shape[1] // 2
            for expert in range(experts.gate_up_proj.shape[0]):
                def delta(proj: str, index: int = index, expert: int = expert) -> torch.Tensor:
                    key = f"base_model.model.model.layers.{index}.{block}.experts.{expert}.{proj}"
                    return scaling * tensors[f"{key}.lora_B.weight"] @ tensors[f"{key}.lora_A.weight"]

                experts.gate_up_proj[expert, :width] += delta(gate)
                experts.gate_up_proj[expert, width:] += delta(up)
                experts.down_proj[expert] += delta(down)


@pytest.mark.parametrize("arch", list(PER_EXPERT_NAMES))
def test_per_expert_layout_equals_the_deltas_merged_into_the_fused_weights(arch: str, tmp_path: Path) -> None:
    model = build(arch)
    tensors = _per_expert_adapter(model, arch, tmp_path / "old", rank=4, alpha=6)
    merged = build(arch)
    _merged_reference(merged, arch, tensors, scaling=6 / 4)
    ids = torch.randint(1, VOCAB - 1, (3, 6), generator=torch.Generator().manual_seed(4))
    base = _logits(model, ids)
    expected = _logits(merged, ids)
    bank = LoraBank(model)
    bank.install(read_adapter("old", str(tmp_path / "old")))
    bank.select(["old", None, "old"])
    got = _logits(model, ids)
    assert torch.allclose(got[[0, 2]], expected[[0, 2]], atol=1e-5), (got[[0, 2]] - expected[[0, 2]]).abs().max()
    assert torch.allclose(got[1], base[1], atol=1e-5)
    assert not torch.allclose(expected[0], base[0], atol=1e-3)


def test_experts_of_another_model_size_are_refused_and_nothing_changes(tmp_path: Path) -> None:
    build("qwen3_moe").save_pretrained(tmp_path / "base")
    peft_adapter(tmp_path / "base", tmp_path / "a", 1, r=4, lora_alpha=8, target_modules=ALL)
    other = build("qwen3_moe")
    other.config.moe_intermediate_size = 32
    bigger = AutoModelForCausalLM.from_config(other.config, dtype=torch.float32)
    bigger.save_pretrained(tmp_path / "bigger")
    peft_adapter(tmp_path / "bigger", tmp_path / "x", 1, r=4, lora_alpha=8, target_modules=ALL)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    bank = LoraBank(model)
    bank.install(read_adapter("a", str(tmp_path / "a")))
    before = [type(m).__name__ for m in model.modules()]
    with pytest.raises(AdapterLoadError, match="experts.gate_up_proj"):
        bank.install(read_adapter("x", str(tmp_path / "x")))
    assert bank.names == ["a"]
    assert [type(m).__name__ for m in model.modules()] == before


def test_the_gateway_file_check_lets_expert_adapters_through(arch_dirs: dict[str, Any], tmp_path: Path) -> None:
    shapes = BaseShapes.read(arch_dirs["base"])  # transformers 5 saves the experts per expert again (2-D)
    assert shapes is not None
    assert inspect_adapter(arch_dirs["a"], shapes).rank == 4  # once refused: "adapts …mlp.experts, which the
    if arch_dirs["arch"] in PER_EXPERT_NAMES:                   # served base does not have"
        _per_expert_adapter(build(arch_dirs["arch"]), arch_dirs["arch"], tmp_path / "old", rank=4, alpha=4)
        assert inspect_adapter(tmp_path / "old", shapes).target_modules


def test_many_pairs_take_the_grouped_path_with_the_same_numbers(arch_dirs: dict[str, Any],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Prefill-sized batches run the LoRA one matmul per (expert, slot) group instead of gathered factors."""
    ids = torch.randint(1, VOCAB - 1, (3, 5), generator=torch.Generator().manual_seed(5))
    model = AutoModelForCausalLM.from_pretrained(arch_dirs["base"]).eval()
    bank = LoraBank(model)
    for name in ("a", "b"):
        bank.install(read_adapter(name, str(arch_dirs[name])))
    bank.select(["b", "a", None])
    gathered = _logits(model, ids)
    monkeypatch.setattr(lora_experts, "_GATHER_LIMIT", 0)
    bank.select(["b", "a", None])
    assert torch.allclose(_logits(model, ids), gathered, atol=1e-5)
