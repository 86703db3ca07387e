"""``gateway eval`` end to end on the demo: in-process and against a real server, LLaMA-Factory's files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from gateway.cli import app
from gateway.eval.metrics import mean_scores, similarity
from tests.gateway.eval.conftest import DATA, EvalRun, identity_args, run_eval

IDENTITY = json.loads((DATA / "identity.json").read_text(encoding="utf-8"))
METRIC_KEYS = {"predict_bleu-4", "predict_rouge-1", "predict_rouge-2", "predict_rouge-l"}


def _predictions(out: Path, model: str) -> list[dict[str, Any]]:
    lines = (out / model / "generated_predictions.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def _results(out: Path, model: str) -> dict[str, float]:
    results: dict[str, float] = json.loads((out / model / "predict_results.json").read_text(encoding="utf-8"))
    return results


def _check_identity_run(out: Path) -> None:
    for model in ("tiny-qwen", "pku-assistant"):
        rows = _predictions(out, model)
        assert len(rows) == 20 and all(set(r) == {"prompt", "predict", "label"} for r in rows)
        assert [r["label"] for r in rows] == [e["output"] for e in IDENTITY]
        for row, example in zip(rows, IDENTITY, strict=True):  # the prompt as the qwen template renders it
            assert row["prompt"].startswith("<|im_start|>system\n")
            assert row["prompt"].endswith(f"<|im_start|>user\n{example['instruction']}<|im_end|>\n"
                                          "<|im_start|>assistant\n")
        results = _results(out, model)
        assert METRIC_KEYS <= set(results) and results["predict_samples_per_second"] > 0
        # predict_results.json holds the mean of LLaMA-Factory's per-example scores of the written predictions.
        assert {k: results[k] for k in METRIC_KEYS} == mean_scores(similarity(r["predict"], r["label"]) for r in rows)
    base, pku = _results(out, "tiny-qwen"), _results(out, "pku-assistant")
    assert pku["predict_rouge-l"] > base["predict_rouge-l"]
    assert pku["predict_bleu-4"] > base["predict_bleu-4"]
    pku_rows, base_rows = _predictions(out, "pku-assistant"), _predictions(out, "tiny-qwen")
    for trained in (0, 10):  # the two questions of the adapter's training data: its exact answer, not the base's
        assert pku_rows[trained]["predict"] == pku_rows[trained]["label"]
        assert base_rows[trained]["predict"] != base_rows[trained]["label"]


def test_in_process_eval_ranks_the_adapter_above_the_base(identity_eval: EvalRun) -> None:
    _check_identity_run(identity_eval.out)
    assert (identity_eval.out / "report.html").is_file()
    table = identity_eval.stdout.splitlines()
    assert table[0].split() == ["model", "bleu-4", "rouge-1", "rouge-2", "rouge-l", "examples/s"]
    assert table[1].split()[0] == "tiny-qwen" and table[2].split()[0] == "pku-assistant"


def test_progress_bars_per_model(identity_eval: EvalRun) -> None:
    for model in ("tiny-qwen", "pku-assistant"):
        assert f"{model}: 100%" in identity_eval.stderr and "20/20" in identity_eval.stderr
    assert "ex/s" in identity_eval.stderr


def test_eval_against_a_running_server(demo_server: str, tmp_path: Path) -> None:
    result = run_eval([*identity_args(tmp_path), "--server", demo_server, "--no-progress"])
    assert result.returncode == 0, result.stderr
    _check_identity_run(tmp_path)
    assert "20/20" not in result.stderr  # --no-progress


def test_an_unknown_model_is_an_error_with_the_servers_message(demo_server: str, tmp_path: Path) -> None:
    result = run_eval(["--dataset", "identity", "--dataset-dir", str(DATA), "--models", "tiny-qwen,nope",
                       "--server", demo_server, "--out", str(tmp_path), "--no-progress"])
    assert result.returncode == 1
    assert "model 'nope'" in result.stderr and "404" in result.stderr and "Traceback" not in result.stderr


runner = CliRunner()


def test_serve_flags_with_server_are_a_usage_error() -> None:
    result = runner.invoke(app, ["eval", "--dataset", "x.json", "--models", "a", "--server", "http://127.0.0.1:9",
                                 "--demo", "--max-batch-size", "4"])
    assert result.exit_code == 2
    assert "--max-batch-size, --demo" in result.output or "--demo, --max-batch-size" in result.output


def test_host_and_port_do_not_apply_to_eval() -> None:
    result = runner.invoke(app, ["eval", "--dataset", "x.json", "--models", "a", "--demo", "--port", "9000"])
    assert result.exit_code == 2 and "--port" in result.output


def test_a_bad_dataset_is_a_usage_error_before_any_model_loads(tmp_path: Path) -> None:
    result = runner.invoke(app, ["eval", "--dataset", str(tmp_path / "none.json"), "--models", "a", "--demo"])
    assert result.exit_code == 2 and "no dataset file" in result.output
    result = runner.invoke(app, ["eval", "--dataset", "nope", "--dataset-dir", str(DATA), "--models", "a", "--demo"])
    assert result.exit_code == 2 and "not in" in result.output
    result = runner.invoke(app, ["eval", "--dataset", "identity", "--models", "a", "--demo"])
    assert result.exit_code == 2 and "no dataset file" in result.output


def test_the_api_key_is_sent_to_an_in_process_gateway_that_requires_it(demo_models: object, demo_cache_home: Path,
                                                                          tmp_path: Path) -> None:
    # --api-key makes the in-process gateway require the key; the run passes only if every request carries it.
    result = run_eval(["--dataset", "identity", "--dataset-dir", str(DATA), "--models", "pku-assistant",
                       "--max-samples", "1", "--max-tokens", "8", "--out", str(tmp_path), "--no-progress", "--demo",
                       "--api-key", "sekret"], env={"XDG_CACHE_HOME": str(demo_cache_home)})
    assert result.returncode == 0, result.stderr
    assert len(_predictions(tmp_path, "pku-assistant")) == 1
