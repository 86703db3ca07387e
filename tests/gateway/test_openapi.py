"""The OpenAPI document is what the server does: Schemathesis fuzzes every operation of a real ``gateway serve
--demo`` from ``/openapi.json`` (with the served model names) and finds no server error, no status, header or body
outside the documented ones, and only OpenAI error bodies.

Bounded: 10 examples per operation plus Schemathesis's coverage phase (about 1000 requests), a 64-token context
so that generations stay short, and a 60 s time budget for the run. Measured on the shared 2-core machine: 2295
requests, 0 failures in 61 s (83 s with the server's start); under heavy load 1245 requests in 77 s.

One check is left out: ``positive_data_acceptance`` wants every schema-valid request to succeed, and a JSON Schema
cannot say "the prompt fits the context", "the folder is a LoRA adapter" or "the adapter name is free"; those
requests get their documented 400/404/409/422.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.demo import DemoModels

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(demo_models: DemoModels, demo_cache_home: Path) -> Iterator[str]:
    from tests.servers import running_gateway

    with running_gateway(["--demo", "--max-model-len", "64"], env={"XDG_CACHE_HOME": str(demo_cache_home)}) as url:
        yield url


def test_the_document_has_openai_errors_and_real_statuses(server: str) -> None:
    spec = httpx.get(f"{server}/openapi.json", timeout=30).json()
    schemas = spec["components"]["schemas"]
    assert "HTTPValidationError" not in schemas
    assert schemas["ErrorResponse"]["properties"]["error"] == {"$ref": "#/components/schemas/ErrorDetail"}
    chat = spec["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert {"400", "401", "404", "413", "429", "500", "503"} <= set(chat)
    assert chat["400"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}
    assert "text/event-stream" in chat["200"]["content"]
    assert schemas["ChatCompletionRequest"]["properties"]["model"]["examples"] == [
        "tiny-qwen", "pku-assistant", "cat-assistant", "thinker"]


def test_schemathesis_finds_nothing_outside_the_document(server: str, tmp_path: Path) -> None:
    spec = httpx.get(f"{server}/openapi.json", timeout=30).json()
    for body in ("ChatCompletionRequest", "CompletionRequest"):  # fuzz with the served models, not random names
        model = spec["components"]["schemas"][body]["properties"]["model"]
        model["enum"] = model["examples"]
    schema_file = tmp_path / "openapi.json"
    schema_file.write_text(json.dumps(spec))
    command = [sys.executable, "-m", "schemathesis.cli", "run", str(schema_file), "--url", server,
               "--checks", "all", "--exclude-checks", "positive_data_acceptance",
               "--phases", "examples,coverage,fuzzing", "--max-examples", "10", "--max-time", "60",
               "--generation-deterministic",
               "--workers", "1", "--request-timeout", "60", "--no-color"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)  # its cache goes there
    output = run.stdout + run.stderr
    summary = re.search(r"(\d+) generated", output)
    print(output[-1500:])  # the numbers, in the test log
    assert run.returncode == 0, output[-6000:]
    assert summary is not None and int(summary.group(1)) >= 200
