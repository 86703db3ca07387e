"""Acceptance with a client nobody here wrote: lm-evaluation-harness against a real ``gateway serve --demo``.

* ``local-completions`` (loglikelihood: token-id prompts, ``logprobs`` + ``echo`` on ``/v1/completions``) must give
  the same loglikelihoods as lm-eval's own in-process ``hf`` model on the same demo model and adapter (``peft=``),
  within 1e-4 in float32.
* ``local-chat-completions`` (generate_until over ``/v1/chat/completions``) must reproduce the adapter's answers.

lm-eval lives in its own venv (``.ci/lmeval-venv.sh``); these tests are marked ``lmeval`` and run as their own CI
step. The tasks are local YAML files over JSON-lines data next to this file (no hub).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.lmeval

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
TOL = 1e-4


@pytest.fixture(scope="module")
def lmeval_python() -> str:
    """The lm-eval venv's python (created on first use by the CI script)."""
    result = subprocess.run(["bash", str(ROOT / ".ci" / "lmeval-venv.sh")], capture_output=True, text=True,
                            check=True)
    return result.stdout.strip().splitlines()[-1]


def run_lmeval(python: str, tmp: Path, task: str, model: str, model_args: dict[str, Any], *extra: str,
               ) -> list[dict[str, Any]]:
    """Run ``lm_eval`` on one local task; returns its logged samples."""
    args = ",".join(f"{k}={v}" for k, v in model_args.items())
    out = tmp / f"{task}-{model}-{abs(hash(args))}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OPENAI_API_KEY": "unused"}
    command = [python, "-m", "lm_eval", "--model", model, "--model_args", args, "--tasks", task,
               "--include_path", str(HERE), "--output_path", str(out), "--log_samples", "--batch_size", "1",
               "--device", "cpu", *extra]
    done = subprocess.run(command, cwd=HERE, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    files = sorted(out.rglob(f"samples_{task}_*.jsonl"))
    assert files, f"lm-eval wrote no samples under {out}"
    return [json.loads(line) for line in files[-1].read_text().splitlines() if line.strip()]


def loglikelihoods(samples: list[dict[str, Any]]) -> dict[tuple[int, int], tuple[float, bool]]:
    """(doc id, choice index) -> (loglikelihood of that choice, whether it is the greedy continuation)."""
    out = {}
    for sample in samples:
        for index, (value, greedy) in enumerate(sample["filtered_resps"]):
            out[(sample["doc_id"], index)] = (float(value), str(greedy) == "True")
    return out


@pytest.fixture(scope="module")
def base_dir(demo_models: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo base with its embedding cut to the tokenizer's 653 tokens (the config says 1024).

    lm-eval's ``hf`` model does exactly this cut (``resize_token_embeddings(len(tokenizer))``) whenever it is given
    ``peft=``, which changes every softmax; serving the cut model makes both sides run the same weights.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("lmeval-base") / "demo-base"
    tokenizer = AutoTokenizer.from_pretrained(demo_models.base_dir)
    model = AutoModelForCausalLM.from_pretrained(demo_models.base_dir)
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def served(base_dir: Path, demo_models: Any) -> Iterator[str]:
    from tests.servers import running_gateway

    adapter = demo_models.adapters["pku-assistant"]
    with running_gateway(["--model", str(base_dir), "--adapter", f"pku-assistant={adapter}", "--dtype", "float32",
                          "--template", "qwen"]) as url:
        yield url


@pytest.mark.parametrize("model", ["demo-base", "pku-assistant"])
def test_loglikelihoods_equal_lmevals_own_hf_backend(lmeval_python: str, served: str, base_dir: Path,
                                                     demo_models: Any, tmp_path: Path, model: str) -> None:
    api = run_lmeval(lmeval_python, tmp_path, "gateway_demo_choice", "local-completions", {
        "model": model, "base_url": f"{served}/v1/completions", "tokenizer_backend": "huggingface",
        "tokenizer": base_dir, "tokenized_requests": True, "max_retries": 1,
    })
    hf_args: dict[str, Any] = {"pretrained": base_dir, "dtype": "float32"}
    if model != "demo-base":
        hf_args["peft"] = str(demo_models.adapters[model])
    reference = run_lmeval(lmeval_python, tmp_path, "gateway_demo_choice", "hf", hf_args)
    ours, theirs = loglikelihoods(api), loglikelihoods(reference)
    assert ours.keys() == theirs.keys() and len(ours) >= 10
    worst = max(abs(ours[k][0] - theirs[k][0]) for k in ours)
    assert worst < TOL, f"largest loglikelihood difference {worst}"
    # lm-eval's greedy flag (from our top_logprobs) agrees with its own model's.
    assert {k: v[1] for k, v in ours.items()} == {k: v[1] for k, v in theirs.items()}
    # Not trivially equal: the choices' numbers differ.
    assert len({round(v[0], 3) for v in ours.values()}) > len(ours) // 2


def test_chat_generation_reproduces_the_adapter(lmeval_python: str, served: str, tmp_path: Path) -> None:
    samples = run_lmeval(lmeval_python, tmp_path, "gateway_demo_answer", "local-chat-completions", {
        "model": "pku-assistant", "base_url": f"{served}/v1/chat/completions", "max_retries": 1,
    }, "--apply_chat_template")
    assert len(samples) == 2
    assert all(s["exact_match"] == 1.0 for s in samples), [s["resps"] for s in samples]
