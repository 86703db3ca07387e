"""Recognising the Jinja LLaMA-Factory 0.9.5 generates from its text templates (tests/data/lf_jinja, written by
LLaMA-Factory itself: make_lf_jinja.py there), so that a CLI run folder is served with the template it trained with,
and /v1/models says that this is what decided."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from gateway.templates import SlotTemplate, resolve_template, template_names
from gateway.templates.lf_jinja import recognise, recognise_modelfile

DATA = Path(__file__).parents[1] / "data" / "lf_jinja"
INDEX = json.loads((DATA / "index.json").read_text(encoding="utf-8"))
CHAT = [{"role": "system", "content": ""}, {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "Hi!"}, {"role": "user", "content": "Weather?"}]


def test_the_data_covers_every_shipped_template() -> None:
    assert set(INDEX) == set(template_names()) and len(INDEX) == 73
    # LLaMA-Factory writes no Jinja for templates with token slots; every other one has its file
    assert {n for n, v in INDEX.items() if v["jinja"] is None} == {"chatglm3", "yuan"}


@pytest.mark.parametrize("name", sorted(n for n, v in INDEX.items() if v["jinja"] is not None))
def test_each_generated_jinja_is_recognised_as_its_template(name: str) -> None:
    entry = INDEX[name]
    found = recognise((DATA / entry["jinja"]).read_text(encoding="utf-8"), entry["bos_token"], entry["eos_token"])
    assert found is not None
    if not found.ties:
        assert found.name == name
        return
    # Several templates translate to this very Jinja; the one chosen renders every chat the same way
    assert name in (found.name, *found.ties)
    chosen, right = SlotTemplate.named(found.name), SlotTemplate.named(name)
    eos = entry["eos_token"]
    assert chosen.render(CHAT, eos_token=eos).prompt == right.render(CHAT, eos_token=eos).prompt


def test_a_hand_edited_jinja_is_not_taken_for_a_template() -> None:
    entry = INDEX["default"]
    text = (DATA / entry["jinja"]).read_text(encoding="utf-8").replace("Human: ", "User: ")
    assert recognise(text, entry["bos_token"], entry["eos_token"]) is None


@pytest.mark.parametrize("name", ["default", "alpaca", "llama3", "mistral", "vicuna", "qwen"])
def test_a_run_folder_with_lf_jinja_resolves_to_the_template_and_says_why(tmp_path: Path, name: str) -> None:
    entry = INDEX[name]
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(DATA / entry["jinja"], run / "chat_template.jinja")
    (run / "tokenizer_config.json").write_text(json.dumps({"eos_token": entry["eos_token"],
                                                           "bos_token": entry["bos_token"]}), encoding="utf-8")
    resolved = resolve_template(adapter_dir=run)
    assert isinstance(resolved.template, SlotTemplate) and resolved.template.name == name
    assert resolved.source.startswith(f"LLaMA-Factory's Jinja for template {name}")
    # the template's own semantics: an empty system message is replaced by its default system
    spec = resolved.template.spec
    if spec.default_system:
        assert spec.default_system in resolved.template.render(CHAT, eos_token=entry["eos_token"]).prompt


def _run_with_lf_jinja(folder: Path, name: str) -> Path:
    entry = INDEX[name]
    folder.mkdir(parents=True)
    shutil.copy(DATA / entry["jinja"], folder / "chat_template.jinja")
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": entry["eos_token"]}), encoding="utf-8")
    return folder


def test_the_users_training_yaml_decides_over_the_jinja(tmp_path: Path) -> None:
    """A run of template vicuna whose saved Jinja reads as alpaca's would be served as alpaca; the user's YAML wins:
    given with --adapter-config, inside the run folder, or beside it naming the run as its output_dir."""
    run = _run_with_lf_jinja(tmp_path / "saves" / "run1", "alpaca")
    assert resolve_template(adapter_dir=run).template.name == "alpaca"
    given = tmp_path / "elsewhere.yaml"
    given.write_text("template: vicuna\noutput_dir: somewhere/else\n", encoding="utf-8")
    resolved = resolve_template(adapter_dir=run, training_config=given)
    assert resolved.template.name == "vicuna" and str(given) in resolved.source
    beside = tmp_path / "saves" / "train.yaml"
    beside.write_text("template: llama3\noutput_dir: saves/other-run\n", encoding="utf-8")
    assert resolve_template(adapter_dir=run).template.name == "alpaca"  # another run's config is not this one's
    beside.write_text("template: llama3\noutput_dir: saves/run1\n", encoding="utf-8")
    (run / "checkpoint-3").mkdir()
    resolved = resolve_template(adapter_dir=run / "checkpoint-3")
    assert resolved.template.name == "llama3" and resolved.source == f"the training config {beside}"
    (run / "my_sft.yaml").write_text("template: mistral\n", encoding="utf-8")
    assert resolve_template(adapter_dir=run).template.name == "mistral"


@pytest.mark.parametrize("name", sorted(n for n, v in INDEX.items() if v["jinja"] is not None))
def test_each_exported_modelfile_is_recognised_as_its_template(name: str) -> None:
    entry = INDEX[name]
    found = recognise_modelfile((DATA / f"{name}.Modelfile").read_text(encoding="utf-8"), entry["bos_token"],
                                entry["eos_token"])
    assert found is not None and name in (found.name, *found.ties)
    if not found.ties:
        assert found.name == name


def test_a_merged_export_is_served_with_its_modelfiles_template(tmp_path: Path) -> None:
    """An export dir: LLaMA-Factory's Modelfile decides over the Jinja beside it (qwen keeps Qwen's own Jinja)."""
    export = tmp_path / "export"
    export.mkdir()
    shutil.copy(DATA / "qwen.Modelfile", export / "Modelfile")
    (export / "chat_template.jinja").write_text("{{ messages[0]['content'] }}", encoding="utf-8")
    (export / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}), encoding="utf-8")
    resolved = resolve_template(base_dir=export)
    assert resolved.template.name == "qwen"
    assert resolved.source.startswith("LLaMA-Factory's Modelfile for template qwen")
    (export / "Modelfile").write_text((DATA / "qwen.Modelfile").read_text().replace("Alibaba", "ACME"))
    assert resolve_template(base_dir=export).template.name.startswith("jinja:")  # an edited file is not LLaMA-Factory's
