"""Adapter names and files under ``--adapter-root``, through a real server: one spelling-independent id per run
folder (one resident copy), no weights read through a link out of the root, errors that say nothing about what
exists outside the roots, and residency bounded by default."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.demo import DemoModels
from gateway.settings import DEFAULT_MAX_ADAPTERS_WITH_ROOTS, Settings
from tests.gateway.test_api_errors import assert_error

WHO = [{"role": "user", "content": "你好，你是谁？"}]


@pytest.fixture(scope="module")
def places(demo_models: DemoModels, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root, outside = tmp_path_factory.mktemp("names-root"), tmp_path_factory.mktemp("names-outside")
    pku = demo_models.adapters["pku-assistant"]
    shutil.copytree(pku, root / "run")
    shutil.copytree(pku, outside / "pku")
    linked = root / "linked-weights"  # a real folder inside the root whose weights file points outside
    linked.mkdir()
    shutil.copy(pku / "adapter_config.json", linked)
    (linked / "adapter_model.safetensors").symlink_to(outside / "pku" / "adapter_model.safetensors")
    return {"root": root, "outside": outside}


@pytest.fixture(scope="module")
def server(places: dict[str, Path], demo_cache_home: Path) -> Iterator[str]:
    from tests.servers import running_gateway

    with running_gateway(["--demo", "--adapter-root", str(places["root"])],
                         env={"XDG_CACHE_HOME": str(demo_cache_home)}) as url:
        yield url


def chat(server: str, model: str) -> httpx.Response:
    return httpx.post(f"{server}/v1/chat/completions", timeout=60,
                      json={"model": model, "messages": WHO, "temperature": 0, "max_tokens": 16})


def load(server: str, name: str, path: str) -> httpx.Response:
    return httpx.post(f"{server}/v1/adapters", json={"name": name, "path": path}, timeout=30)


def adapters(server: str) -> list[dict[str, Any]]:
    return httpx.get(f"{server}/v1/adapters", timeout=30).json()["data"]  # type: ignore[no-any-return]


def test_spellings_of_one_run_folder_are_one_adapter(server: str, places: dict[str, Path]) -> None:
    for spelling in ("run", "run/.", "./run", "run//", "./run/./", "run/"):
        response = chat(server, spelling)
        assert response.status_code == 200, (spelling, response.text)
        assert "北大" in response.json()["choices"][0]["message"]["content"]
    same_folder = [a for a in adapters(server) if a["path"] == str((places["root"] / "run").resolve())]
    assert [(a["id"], a["state"], a["loads"]) for a in same_folder] == [("run", "loaded", 1)]


def test_a_weights_file_linked_out_of_the_root_is_refused(server: str) -> None:
    assert_error(chat(server, "linked-weights"), 404, "model")  # not served, like a link out of the root
    error = assert_error(load(server, "sneaky", "linked-weights"), 422, "path")
    assert "links outside" in str(error["message"])
    assert "linked-weights" not in {a["id"] for a in adapters(server)}


def test_errors_do_not_tell_whether_a_path_outside_the_roots_exists(server: str, places: dict[str, Path]) -> None:
    existing, missing = str(places["outside"] / "pku"), str(places["outside"] / "no-such-folder")
    answers = [load(server, "probe", path) for path in (existing, missing)]
    assert answers[0].status_code == answers[1].status_code == 422
    messages = [a.json()["error"]["message"].replace(path, "PATH")
                for a, path in zip(answers, (existing, missing), strict=True)]
    assert messages[0] == messages[1]


def test_a_nul_byte_in_a_name_or_path_is_a_clear_error(server: str) -> None:
    assert_error(chat(server, "run\u0000"), 404, "model")
    assert_error(load(server, "nul", "run\u0000/x"), 422, "path")


def test_adapter_roots_bound_residency_by_default(tmp_path: Path) -> None:
    assert Settings.load(model=str(tmp_path)).adapter_limit() is None  # a fixed set: no default bound
    rooted = Settings.load(model=str(tmp_path), adapter_roots=(str(tmp_path),))
    assert rooted.adapter_limit() == DEFAULT_MAX_ADAPTERS_WITH_ROOTS
    assert Settings.load(model=str(tmp_path), adapter_roots=(str(tmp_path),), max_adapters=3).adapter_limit() == 3
