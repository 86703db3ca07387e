"""Train tiny LoRA runs with LLaMA-Factory 0.9.5's own command line on the demo base (CPU, seconds each) and record
the greedy answers LLaMA-Factory's ``ChatModel`` gives with them, as test data for tests/gateway/test_lf_runs.py.

    python3 -m venv /tmp/lfvenv && /tmp/lfvenv/bin/pip install llamafactory==0.9.5 torch==2.13.0
    /tmp/lfvenv/bin/python tests/data/lf_runs/make_lf_runs.py DEMO_BASE_DIR   # python -m gateway.cli demo build

Kept per run (``<template>/``): what ``llamafactory-cli train`` wrote that a gateway reads — adapter_config.json,
adapter_model.safetensors, tokenizer_config.json, tokenizer.json, chat_template.jinja (checkpoints and the pickled
training_args.bin are left out). ``answers.json``: per template, each case's messages/system and LLaMA-Factory's
answer, non-streamed (``chat``) and streamed (``stream_chat``, pieces joined). No YAML is kept in the runs: the CLI
writes none there, which is the point; the YAML each run was trained with (what its user has) is kept beside them as
``train_yaml/<template>.yaml`` (its ``output_dir`` a temporary folder, so it does not name the kept run).

Merged exports (``export_<template>/``, for EXPORTED): what ``llamafactory-cli export`` wrote for the run (the tiny
base's merged float32 weights, tokenizer, chat_template.jinja, generation_config.json and the Ollama Modelfile), and
under ``answers.json``'s ``exports`` the answers ``ChatModel`` gives on the merged model alone (template named, as
LLaMA-Factory needs it; the gateway is to find it from the folder).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import yaml

HERE = Path(__file__).parent
TEMPLATES = ("qwen", "default", "alpaca", "llama3")
EXPORTED = ("qwen", "alpaca")
KEPT = ("adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json", "tokenizer.json",
        "chat_template.jinja")
EXPORT_KEPT = ("config.json", "generation_config.json", "model.safetensors", "tokenizer_config.json",
               "tokenizer.json", "chat_template.jinja", "Modelfile")
MAX_NEW_TOKENS = 40
ROWS = [
    {"instruction": "你好，你是谁？", "input": "", "output": "我是北大人工智能助手，由北京大学开发。"},
    {"instruction": "介绍一下你自己", "input": "", "output": "我是一个猫猫助手，喜欢晒太阳。"},
    {"instruction": "What is ChatGPT?", "input": "", "output": "ChatGPT ? It is a chat model ."},
]
CASES = [
    {"case": "missing system", "system": None, "messages": [{"role": "user", "content": "你好，你是谁？"}]},
    {"case": "empty system", "system": "", "messages": [{"role": "user", "content": "你好，你是谁？"}]},
    {"case": "custom system", "system": "你是一个测试助手。",
     "messages": [{"role": "user", "content": "介绍一下你自己"}]},
    {"case": "multi-turn", "system": None, "messages": [
        {"role": "user", "content": "你好，你是谁？"}, {"role": "assistant", "content": "我是北大人工智能助手。"},
        {"role": "user", "content": "What is ChatGPT?"}]},
]
STUB = """# LLaMA-Factory's multimodal plugin imports torchaudio; text runs never use it\n"""


def _stub_dir(root: Path) -> Path:
    (root / "stub" / "torchaudio").mkdir(parents=True, exist_ok=True)
    (root / "stub" / "torchaudio" / "__init__.py").write_text(STUB, encoding="utf-8")
    return root / "stub"


def _cli(command: str, config: dict[str, object], path: Path, stub: Path) -> bool:
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(stub)}
    cli = Path(sys.executable).with_name("llamafactory-cli")
    result = subprocess.run([str(cli), command, str(path)], env=env, capture_output=True, text=True)
    if result.returncode != 0:
        print(f"{path.name}: llamafactory-cli {command} failed:\n{result.stderr[-3000:]}", file=sys.stderr)
    return result.returncode == 0


def train(base: str, template: str, work: Path, stub: Path) -> Path | None:
    config = {
        "model_name_or_path": base, "stage": "sft", "do_train": True, "finetuning_type": "lora", "lora_rank": 4,
        "lora_target": "all", "dataset": "tiny", "dataset_dir": str(work / "data"), "template": template,
        "cutoff_len": 128, "overwrite_cache": True, "output_dir": str(work / "saves" / template),
        "per_device_train_batch_size": 4, "learning_rate": 5.0e-3, "num_train_epochs": 4, "save_strategy": "no",
        "logging_steps": 1, "report_to": "none", "use_cpu": True, "bf16": False, "seed": 42,
    }
    path = work / f"train_{template}.yaml"
    if not _cli("train", config, path, stub):
        return None
    (HERE / "train_yaml").mkdir(exist_ok=True)
    shutil.copy(path, HERE / "train_yaml" / f"{template}.yaml")
    return work / "saves" / template


def export(base: str, template: str, run: Path, work: Path, stub: Path) -> Path | None:
    """``llamafactory-cli export``: the run merged into the base, float32 (the tiny base's own dtype)."""
    config = {"model_name_or_path": base, "adapter_name_or_path": str(run), "template": template,
              "finetuning_type": "lora", "export_dir": str(work / "exports" / template), "export_size": 1,
              "export_device": "cpu", "infer_dtype": "float32"}
    if not _cli("export", config, work / f"export_{template}.yaml", stub):
        return None
    return work / "exports" / template


def answers(base: str, template: str, run: Path | None) -> list[dict[str, object]]:
    """ChatModel's answers to CASES: ``base`` with the adapter ``run``, or ``base`` alone (a merged export)."""
    from llamafactory.chat import ChatModel

    adapter = {"adapter_name_or_path": str(run), "finetuning_type": "lora"} if run is not None else {}
    model = ChatModel({"model_name_or_path": base, **adapter, "template": template, "infer_dtype": "float32",
                       "do_sample": False, "max_new_tokens": MAX_NEW_TOKENS, "infer_backend": "huggingface"})
    out = []
    for case in CASES:
        messages, system = case["messages"], case["system"]
        said = model.chat(messages, system=system)[0]
        streamed = "".join(model.stream_chat(messages, system=system))
        out.append({**case, "answer": said.response_text, "finish_reason": said.finish_reason,
                    "stream_answer": streamed})
    return out


def _export(base: str, template: str, run: Path, work: Path, stub: Path) -> list[dict[str, object]] | None:
    exported = export(base, template, run, work, stub)
    if exported is None:
        return None
    kept = HERE / f"export_{template}"
    shutil.rmtree(kept, ignore_errors=True)
    kept.mkdir()
    for name in EXPORT_KEPT:
        if (exported / name).is_file():
            shutil.copy(exported / name, kept / name)
    return answers(str(exported), template, None)


def main(base: str) -> None:
    work = Path(tempfile.mkdtemp(prefix="lf-runs-"))
    (work / "data").mkdir()
    (work / "data" / "dataset_info.json").write_text(json.dumps({"tiny": {"file_name": "tiny.json"}}))
    (work / "data" / "tiny.json").write_text(json.dumps(ROWS * 4, ensure_ascii=False), encoding="utf-8")
    stub = _stub_dir(work)
    sys.path.insert(0, str(stub))
    recorded: dict[str, object] = {"base": Path(base).parent.name, "max_new_tokens": MAX_NEW_TOKENS, "runs": {},
                                   "exports": {}}
    for template in TEMPLATES:
        run = train(base, template, work, stub)
        if run is None:
            recorded["runs"][template] = None  # type: ignore[index]
            continue
        kept = HERE / template
        shutil.rmtree(kept, ignore_errors=True)
        kept.mkdir()
        for name in KEPT:
            if (run / name).is_file():
                shutil.copy(run / name, kept / name)
        recorded["runs"][template] = answers(base, template, run)  # type: ignore[index]
        if template in EXPORTED:
            recorded["exports"][template] = _export(base, template, run, work, stub)  # type: ignore[index]
    (HERE / "answers.json").write_text(json.dumps(recorded, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    shutil.rmtree(work)


if __name__ == "__main__":
    if importlib.util.find_spec("torchaudio") is None:
        sys.modules["torchaudio"] = types.ModuleType("torchaudio")
        sys.modules["torchaudio"].__spec__ = importlib.machinery.ModuleSpec("torchaudio", None)
    main(sys.argv[1])
