"""Training loops of the demo: full fine-tuning of the base and LoRA adapters on top of it.

Both are plain full-batch AdamW loops over a handful of encoded pairs (prompt tokens masked with -100), seeded and
run with deterministic algorithms, so the same data gives the same weights on every build.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel

from gateway.demo.data import EncodedPair, Recipe

IGNORE_INDEX = -100


@dataclass(frozen=True)
class LogEntry:
    step: int
    loss: float
    elapsed_s: float


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor


def make_batch(pairs: Sequence[EncodedPair], pad_id: int) -> Batch:
    """Right-padded batch; padding and prompt positions are excluded from the loss."""
    width = max(len(p.prompt_ids) + len(p.response_ids) for p in pairs)
    input_ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(pairs), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    for row, pair in enumerate(pairs):
        ids = [*pair.prompt_ids, *pair.response_ids]
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, len(pair.prompt_ids) : len(ids)] = torch.tensor(pair.response_ids)
        mask[row, : len(ids)] = 1
    return Batch(input_ids, mask, labels)


def _train(model: torch.nn.Module, batch: Batch, recipe: Recipe, log_every: int = 10) -> list[LogEntry]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=recipe.learning_rate, weight_decay=0.0)
    model.train()
    log: list[LogEntry] = []
    start = time.perf_counter()
    for step in range(1, recipe.steps + 1):
        loss = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % log_every == 0 or step == recipe.steps:
            log.append(LogEntry(step, round(loss.item(), 4), time.perf_counter() - start))
    model.eval()
    return log


def train_full(model: PreTrainedModel, pairs: Sequence[EncodedPair], recipe: Recipe, pad_id: int) -> list[LogEntry]:
    """Fine-tune every weight of ``model`` in place."""
    torch.manual_seed(recipe.seed)
    return _train(model, make_batch(pairs, pad_id), recipe)


def lora_config(recipe: Recipe) -> LoraConfig:
    """The peft config for ``recipe``: no dropout, so training is a deterministic function of the seed."""
    return LoraConfig(
        r=recipe.lora_rank,
        lora_alpha=recipe.lora_alpha,
        lora_dropout=0.0,
        target_modules=list(recipe.lora_target),
        task_type="CAUSAL_LM",
    )


def train_lora(
    base: PreTrainedModel, pairs: Sequence[EncodedPair], recipe: Recipe, pad_id: int
) -> tuple[PeftModel, list[LogEntry]]:
    """A LoRA adapter (named ``default``) trained on a copy of ``base``; ``base`` itself is left untouched."""
    torch.manual_seed(recipe.seed)
    model = get_peft_model(copy.deepcopy(base), lora_config(recipe))
    return model, _train(model, make_batch(pairs, pad_id), recipe)
