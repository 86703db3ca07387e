"""Building the demo model zoo once into a cache folder, safely under concurrent builders.

Layout of a finished root::

    <root>/base/                 Hugging Face model folder (config, weights, tokenizer, chat template)
    <root>/adapters/<name>/      LLaMA-Factory LoRA run folder, one per adapter
    <root>/demo.json             marker, written last: the build is complete

A build runs in a temporary sibling folder and is renamed into place, under a file lock next to the root, so a
reader never sees a half-built root and two processes building at once both end with the same good cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import platformdirs

# Bump when the recipe changes in a way data.yaml does not show (code, architecture, file layout).
RECIPE_VERSION = 3
MARKER = "demo.json"


@dataclass(frozen=True)
class DemoModels:
    """Paths of a built demo: ``base_dir`` is a model folder, ``adapters`` maps adapter name to run folder."""

    root: Path
    base_dir: Path
    adapters: dict[str, Path] = field(default_factory=dict)
    # Which models' training data had tools ("base" and each adapter name): the demo's tool policies follow it.
    trained_with_tools: dict[str, bool] = field(default_factory=dict)
    build_seconds: float | None = None  # how long the build took; None when the cache was reused

    def to_json(self) -> dict[str, object]:
        """The paths as strings (what ``python -m gateway.demo`` prints)."""
        return {
            "root": str(self.root),
            "base": str(self.base_dir),
            "adapters": {name: str(path) for name, path in self.adapters.items()},
            "build_seconds": self.build_seconds,
        }


def _resource_digest() -> str:
    package = resources.files("gateway.demo")
    digest = hashlib.sha256()
    for name in ("data.yaml", "chat_template.jinja"):
        digest.update(package.joinpath(name).read_bytes())
    return digest.hexdigest()[:8]


def demo_version() -> str:
    """The cache key: the recipe version plus a digest of the data files, so edited data never reuses a stale cache."""
    return f"v{RECIPE_VERSION}-{_resource_digest()}"


def default_root() -> Path:
    """``<user cache>/lora-gateway/demo/<demo_version()>``."""
    return Path(platformdirs.user_cache_dir("lora-gateway")) / "demo" / demo_version()


def _read(root: Path) -> DemoModels | None:
    try:
        marker = json.loads((root / MARKER).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return DemoModels(
        root=root,
        base_dir=root / marker["base"],
        adapters={name: root / path for name, path in marker["adapters"].items()},
        trained_with_tools=dict(marker.get("trained_with_tools", {})),
    )


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock held while the block runs (released by the OS if the process dies)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
            import msvcrt

            handle.seek(0)
            while True:
                try:
                    msvcrt.locking(handle.fileno(), msvcrt.LK_LOCK, 1)
                    break
                except OSError:
                    continue
            try:
                yield
            finally:
                handle.seek(0)
                msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)
        else:
            import fcntl

            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def _deterministic_torch() -> Iterator[None]:
    """One thread and deterministic kernels for the build, restoring the caller's settings afterwards.

    One thread makes the weights independent of the machine's core count. The settings are process-wide: torch
    work in other threads during a build runs single-threaded too."""
    import torch

    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def _build_into(work: Path, final_root: Path) -> None:
    # Imported here: reusing a finished cache must not pay for importing torch and transformers.
    from transformers import AutoTokenizer

    from gateway.demo.data import corpus, encode_pair, load_data, render_pair
    from gateway.demo.model import base_config, new_model, save_base
    from gateway.demo.run_folder import save_run_folder, training_args
    from gateway.demo.tokenizer import ENDOFTEXT, IM_END, save_tokenizer, token_id, train_tokenizer
    from gateway.demo.training import train_full, train_lora

    data = load_data()
    base_dir = work / "base"
    chat_template = resources.files("gateway.demo").joinpath("chat_template.jinja").read_text(encoding="utf-8")
    raw_tokenizer = train_tokenizer(corpus(data))
    token_ids = {token: token_id(raw_tokenizer, token) for token in (ENDOFTEXT, IM_END)}
    config = base_config(eos_token_id=token_ids[IM_END], pad_token_id=token_ids[ENDOFTEXT])
    config.save_pretrained(base_dir)  # first: AutoTokenizer picks Qwen2Tokenizer from the model type
    save_tokenizer(raw_tokenizer, base_dir, chat_template)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    pad_id = token_ids[ENDOFTEXT]

    base = data.base
    base_pairs = [encode_pair(tokenizer, render_pair(base.template, sample)) for sample in base.samples]
    model = new_model(config, base.recipe.seed)
    train_full(model, base_pairs, base.recipe, pad_id)
    save_base(model, base_dir, token_ids=token_ids)

    for adapter in data.adapters:
        pairs = [encode_pair(tokenizer, render_pair(adapter.template, sample)) for sample in adapter.samples]
        peft_model, log = train_lora(model, pairs, adapter.recipe, pad_id)
        args = training_args(
            name=adapter.name,
            template=adapter.template,
            base_dir=final_root / "base",
            recipe=adapter.recipe,
            samples=len(pairs),
            enable_thinking=True if adapter.template == "qwen3" else None,
        )
        save_run_folder(
            peft_model,
            work / "adapters" / adapter.name,
            tokenizer_dir=base_dir,
            args=args,
            log=log,
            recipe=adapter.recipe,
            samples=len(pairs),
        )
        # peft sets base_model_name_or_path from the in-memory model; point it at the final base folder.
        for config_path in (work / "adapters" / adapter.name).rglob("adapter_config.json"):
            adapter_config = json.loads(config_path.read_text(encoding="utf-8"))
            adapter_config["base_model_name_or_path"] = str(final_root / "base")
            config_path.write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    marker = {
        "version": final_root.name,
        "base": "base",
        "adapters": {adapter.name: f"adapters/{adapter.name}" for adapter in data.adapters},
        "trained_with_tools": {("base" if dataset is data.base else dataset.name): any(s.tools for s in dataset.samples)
                               for dataset in data.datasets},
    }
    (work / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")


def build_demo(root: Path | None = None, *, force: bool = False) -> DemoModels:
    """Build the demo base model and adapters into ``root`` (default: the user cache, keyed by ``demo_version()``)
    and return their paths. A complete build is reused unless ``force``; the build is deterministic."""
    root = Path(root) if root is not None else default_root()
    if not force and (ready := _read(root)) is not None:
        return ready
    with _file_lock(root.parent / f".{root.name}.lock"):
        if not force and (ready := _read(root)) is not None:
            return ready  # another process finished it while we waited
        start = time.perf_counter()
        # Left by a build that was killed (only the lock holder builds, so none of these is in use).
        for leftover in (*root.parent.glob(f".{root.name}.building-*"), *root.parent.glob(f".{root.name}.stale-*")):
            shutil.rmtree(leftover, ignore_errors=True)
        work = Path(tempfile.mkdtemp(prefix=f".{root.name}.building-", dir=root.parent))
        try:
            with _deterministic_torch():
                _build_into(work, root)
            if root.exists():
                stale = root.parent / f".{root.name}.stale-{os.getpid()}"
                os.replace(root, stale)
                os.replace(work, root)
                shutil.rmtree(stale, ignore_errors=True)
            else:
                os.replace(work, root)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        built = _read(root)
        if built is None:
            raise RuntimeError(f"demo build finished but {root / MARKER} is unreadable")
        return DemoModels(built.root, built.base_dir, built.adapters, built.trained_with_tools,
                          build_seconds=time.perf_counter() - start)
