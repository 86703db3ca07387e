"""A tiny Qwen2 + LoRA adapter that vLLM's CPU backend can run, built in a few seconds for the real-vLLM test.

vLLM's CPU attention supports head sizes 32, 64, 80, ... (not the demo model's 16), so this model has 2 heads of
32 over hidden size 64. It reuses the demo's locally trained tokenizer. The adapter (r=8 on q/v projections) is
trained until greedy decoding answers ``QUESTION`` with ``ANSWER`` exactly.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
QUESTION = "你是谁？"
ANSWER = "我是北大的助手。"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "chat_template.jinja")


@dataclass(frozen=True)
class TinyVLLMModel:
    base_dir: Path
    adapter_dir: Path
    prompt_text: str
    prompt_ids: tuple[int, ...]
    answer_ids: tuple[int, ...]  # the trained answer, ``<|im_end|>`` included
    im_end_id: int


def prompt_text(question: str = QUESTION) -> str:
    """The LLaMA-Factory ``qwen`` rendering of one user turn."""
    return f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


def build(root: Path, tokenizer_dir: Path, max_steps: int = 600) -> TinyVLLMModel:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    base_dir, adapter_dir = root / "base", root / "adapter"
    base_dir.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, base_dir / name)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=131072,
        tie_word_embeddings=True,
        initializer_range=0.2,
        bos_token_id=None,
        eos_token_id=im_end,
        pad_token_id=eot,
        torch_dtype="float32",
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(torch.float32)
    model.generation_config.eos_token_id = [im_end, eot]
    model.generation_config.pad_token_id = eot
    model.save_pretrained(base_dir, safe_serialization=True)

    text = prompt_text()
    prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(ANSWER, add_special_tokens=False)["input_ids"] + [im_end]
    lora = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    ids = torch.tensor([prompt_ids + answer_ids])
    labels = torch.tensor([[-100] * len(prompt_ids) + answer_ids])
    optimizer = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    lora.train()
    for _ in range(max_steps):
        loss = lora(input_ids=ids, labels=labels).loss
        if loss.item() < 0.05:
            break
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    lora.eval()
    lora.save_pretrained(adapter_dir)
    (root / "train.json").write_text(json.dumps({"final_loss": loss.item()}))
    return TinyVLLMModel(base_dir, adapter_dir, text, tuple(prompt_ids), tuple(answer_ids), im_end)
