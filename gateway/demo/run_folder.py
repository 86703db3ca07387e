"""Writing an adapter the way LLaMA-Factory leaves a LoRA run folder (``saves/<model>/lora/<run>/``).

The folder holds the adapter files directly (``adapter_config.json``, ``adapter_model.safetensors``), a copy of the
tokenizer, ``training_args.yaml`` (the key the gateway reads: ``template``), ``trainer_log.jsonl``, the results
files, and one ``checkpoint-<steps>/`` with the adapter and tokenizer files but no ``training_args.yaml``.
"""

from __future__ import annotations

import datetime
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from peft import PeftModel

from gateway.demo.training import LogEntry, Recipe

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "chat_template.jinja")


def training_args(
    *, name: str, template: str, base_dir: Path, recipe: Recipe, samples: int, enable_thinking: bool | None
) -> dict[str, Any]:
    """The arguments LLaMA-Factory records for an SFT LoRA run (its web UI writes them sorted, as here)."""
    args: dict[str, Any] = {
        "bf16": False,
        "cutoff_len": 2048,
        "dataset": f"demo_{name.replace('-', '_')}",
        "dataset_dir": "data",
        "ddp_timeout": 180000000,
        "do_train": True,
        "finetuning_type": "lora",
        "gradient_accumulation_steps": 1,
        "include_num_input_tokens_seen": True,
        "learning_rate": recipe.learning_rate,
        "logging_steps": 10,
        "lora_alpha": recipe.lora_alpha,
        "lora_dropout": 0,
        "lora_rank": recipe.lora_rank,
        "lora_target": ",".join(recipe.lora_target),
        "lr_scheduler_type": "constant",
        "max_grad_norm": 1.0,
        "max_steps": recipe.steps,
        "model_name_or_path": str(base_dir),
        "optim": "adamw_torch",
        "output_dir": f"saves/demo-base/lora/{name}",
        "packing": False,
        "per_device_train_batch_size": samples,
        "plot_loss": False,
        "preprocessing_num_workers": 1,
        "report_to": "none",
        "save_steps": recipe.steps,
        "seed": recipe.seed,
        "stage": "sft",
        "template": template,
        "trust_remote_code": True,
        "warmup_steps": 0,
    }
    if enable_thinking is not None:
        args["enable_thinking"] = enable_thinking
    return args


def _clock(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(seconds)))


def _trainer_log(log: Sequence[LogEntry], recipe: Recipe) -> str:
    lines = []
    for entry in log:
        remaining = entry.elapsed_s / entry.step * (recipe.steps - entry.step)
        record = {
            "current_steps": entry.step,
            "total_steps": recipe.steps,
            "loss": entry.loss,
            "lr": recipe.learning_rate,
            "epoch": float(entry.step),
            "percentage": round(100 * entry.step / recipe.steps, 2),
            "elapsed_time": _clock(entry.elapsed_s),
            "remaining_time": _clock(remaining),
        }
        lines.append(json.dumps(record) + "\n")
    return "".join(lines)


def _results(log: Sequence[LogEntry], recipe: Recipe, samples: int) -> dict[str, Any]:
    runtime = log[-1].elapsed_s if log else 0.0
    return {
        "epoch": float(recipe.steps),
        "total_flos": 0.0,
        "train_loss": sum(e.loss for e in log) / max(len(log), 1),
        "train_runtime": round(runtime, 4),
        "train_samples_per_second": round(samples * recipe.steps / runtime, 3) if runtime else 0.0,
        "train_steps_per_second": round(recipe.steps / runtime, 3) if runtime else 0.0,
    }


def _save_adapter(model: PeftModel, directory: Path, tokenizer_dir: Path) -> None:
    # Saved under the name "default": peft writes any other adapter name into a sub-folder.
    model.save_pretrained(str(directory), safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copyfile(tokenizer_dir / name, directory / name)


def save_run_folder(
    model: PeftModel,
    directory: Path,
    *,
    tokenizer_dir: Path,
    args: dict[str, Any],
    log: Sequence[LogEntry],
    recipe: Recipe,
    samples: int,
) -> None:
    """Write the run folder for the trained ``model`` (a peft model whose adapter is named ``default``)."""
    _save_adapter(model, directory, tokenizer_dir)
    checkpoint = directory / f"checkpoint-{recipe.steps}"
    _save_adapter(model, checkpoint, tokenizer_dir)
    state = {"global_step": recipe.steps, "max_steps": recipe.steps, "log_history": [vars(e) for e in log]}
    (checkpoint / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
    (directory / "training_args.yaml").write_text(yaml.safe_dump(args, allow_unicode=True), encoding="utf-8")
    (directory / "trainer_log.jsonl").write_text(_trainer_log(log, recipe), encoding="utf-8")
    results = json.dumps(_results(log, recipe, samples), indent=2) + "\n"
    (directory / "all_results.json").write_text(results, encoding="utf-8")
    (directory / "train_results.json").write_text(results, encoding="utf-8")
