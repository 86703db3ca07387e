"""What is in a LoRA folder, and whether it may be served on our base — decided from files, before any model is touched.

    shapes = BaseShapes.read(base_dir)                  # linear weight shapes from the base's safetensors headers
    info = inspect_adapter(folder, shapes, base_names=("Qwen2.5-7B-Instruct",), allow_unsafe=False)
    info.rank, info.target_modules, info.size_bytes

``inspect_adapter`` raises ``AdapterLoadError`` (422) with a sentence when the folder is not a LoRA adapter, holds
only pickle weights (unless ``allow_unsafe``), or does not fit the base: an unknown target module, a weight whose
shape differs from the base layer it adapts, or a rank that disagrees with its own config. The recorded
``base_model_name_or_path`` is compared leniently (a different folder with the same last name is fine; a mismatch
is only logged): architecture and shapes are what decide.

``confine(path, roots)`` resolves a user-given path to a real folder inside one of ``roots`` (no ``..``, no symlink
leading out), or raises ``AdapterLoadError``.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from safetensors import safe_open

from gateway.errors import AdapterLoadError

log = logging.getLogger(__name__)

SAFE_WEIGHTS = "adapter_model.safetensors"
PICKLE_WEIGHTS = "adapter_model.bin"
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<part>A|B)(?:\.[^.]+)?\.weight$")
# LoRA on fused MoE experts (peft's parameter wrappers ``…experts[.base_layer]``, or transformers-4 per-expert
# ``…experts.N.proj`` on a base stored fused): its 3-D shapes are checked by the backend against the loaded model
_EXPERTS_LORA = re.compile(r"\.experts(?:\.base_layer)*$|\.experts\.\d+\.[^.]+$")
_EXPERT_PROJECTIONS = frozenset({"gate_proj", "up_proj", "down_proj", "w1", "w2", "w3"})


@dataclass(frozen=True)
class AdapterInfo:
    """The facts about an adapter folder the gateway reports and checks."""

    path: Path  # the real (resolved) folder
    rank: int
    target_modules: tuple[str, ...]
    size_bytes: int  # weights file size
    base_model: str | None  # base_model_name_or_path as recorded
    safetensors: bool


@dataclass(frozen=True)
class BaseShapes:
    """``module path -> (out_features, in_features)`` of every 2-D ``*.weight`` of the base model.

    Each path is there under the checkpoint's name and under the name transformers loads it as, where that differs
    (EXAONE 3's ``transformer.h.0.attn.attention.q_proj`` is ``model.layers.0.self_attn.q_proj`` once loaded):
    adapters trained before transformers 5 carry the first, adapters trained with it the second.
    ``tensors``: every tensor name of the checkpoint, to say what the base has where no linear layer is.
    ``fused_experts``: the base stores MoE experts fused (``…experts.gate_up_proj``, transformers 5).
    """

    linear: dict[str, tuple[int, int]]
    tensors: frozenset[str] = frozenset()
    fused_experts: bool = False

    @classmethod
    def read(cls, base_dir: Path | None) -> BaseShapes | None:
        """Shapes from the base's ``*.safetensors`` headers (no tensor is read); ``None`` if it has none."""
        if base_dir is None or not base_dir.is_dir():
            return None
        files = sorted(base_dir.glob("*.safetensors"))
        if not files:
            return None
        linear: dict[str, tuple[int, int]] = {}
        tensors: set[str] = set()
        for file in files:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    tensors.add(key)
                    if key.endswith(".weight"):
                        shape = handle.get_slice(key).get_shape()
                        if len(shape) == 2:
                            linear[key[: -len(".weight")]] = (int(shape[0]), int(shape[1]))
        from backends.lora_names import checkpoint_renamings, rename_module  # transformers: imported when needed

        renamings = checkpoint_renamings(_model_type(base_dir))
        if renamings:
            for path, shape in list(linear.items()):
                linear.setdefault(rename_module(path, renamings), shape)
        return cls(linear, frozenset(tensors), any(t.endswith(".experts.gate_up_proj") for t in tensors))

    def describe_target(self, target: str) -> str:
        """``target`` (a ``target_modules`` entry no linear layer matches) and what the base has of that name."""
        modules = sorted({name.rsplit(".", 1)[0] for name in self.tensors if "." in name})
        named = [m for m in modules if m == target or m.endswith(f".{target}")]
        if not named:
            return f"{target}, which no layer of the served base is called"
        return (f"{target}, which the served base has ({len(named)}, e.g. {named[0]}) but not as linear layers; only "
                "LoRA on linear layers is served")

    def describe(self, module: str) -> str:
        """What the base has at ``module``, which is not one of its linear layers (a phrase)."""
        inside = sorted(name for name in self.tensors if name.startswith(f"{module}."))
        if not inside:
            return "which the served base does not have"
        shown = ", ".join(name.removeprefix(f"{module}.") for name in inside[:3])
        more = f" and {len(inside) - 3} more" if len(inside) > 3 else ""
        count = f"{len(inside)} tensor{'s' if len(inside) > 1 else ''}"
        return (f"which the served base has, but not as one linear layer: it holds {count} there ({shown}{more}); "
                "only LoRA on linear layers is served")

    def module_names(self) -> set[str]:
        return {path.rsplit(".", 1)[-1] for path in self.linear}

    def has_module(self, target: str) -> bool:
        """Whether a peft ``target_modules`` entry names a linear layer here: as peft matches it, the whole path or
        its last dotted parts (``q_proj``, ``self_attn.q_proj``, ``model.layers.0.self_attn.q_proj``)."""
        return any(path == target or path.endswith(f".{target}") for path in self.linear)


def _model_type(base_dir: Path) -> str | None:
    try:
        config = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    return model_type if isinstance(model_type, str) else None


def confine(path: str | Path, roots: Sequence[Path]) -> Path:
    """The real folder ``path`` names, which must lie inside one of ``roots`` when any are given.

    A relative ``path`` is taken relative to each root in turn. ``..`` components are refused outright; symlinks
    are resolved before the containment check, so a link pointing out of a root is refused too, and so is a folder
    holding a file linked out of the roots (the weights would be read from there). With roots, a path that is
    missing and one that lies outside get the same answer, which says nothing about what exists outside.
    """
    text = str(path)
    if "\x00" in text:
        raise AdapterLoadError("adapter path must not contain a NUL character", param="path")
    given = Path(path)
    if ".." in PurePosixPath(given.as_posix()).parts:
        raise AdapterLoadError(f"adapter path {text!r} must not contain '..'", param="path")
    if not roots:
        candidates = [given]
    elif given.is_absolute():
        candidates = [given]
    else:
        candidates = [root / given for root in roots]
    real_roots = [root.resolve() for root in roots]
    for candidate in candidates:
        try:
            real = candidate.resolve(strict=True)
        except (OSError, RuntimeError):
            continue
        if real_roots and not _inside(real, real_roots):
            continue
        if not real.is_dir():
            raise AdapterLoadError(f"adapter path {text!r} is not a folder", param="path")
        if real_roots:
            _refuse_links_out(real, text, real_roots)
        return real
    if roots:
        raise AdapterLoadError(f"adapter path {text!r} is outside the configured adapter roots or does not exist",
                               param="path")
    raise AdapterLoadError(f"adapter path {text!r} does not exist", param="path")


def _inside(real: Path, real_roots: Sequence[Path]) -> bool:
    return any(real.is_relative_to(root) for root in real_roots)


def _refuse_links_out(folder: Path, given: str, real_roots: Sequence[Path]) -> None:
    """Every file of the folder (weights, config, tokenizer, template files) must resolve inside the roots."""
    for entry in folder.iterdir():
        if entry.is_symlink() and not _inside(entry.resolve(), real_roots):
            raise AdapterLoadError(f"adapter path {given!r}: {entry.name} links outside the configured adapter "
                                   f"roots", param="path")


def is_adapter_folder(folder: Path) -> bool:
    return (folder / "adapter_config.json").is_file()


def inspect_adapter(folder: Path, shapes: BaseShapes | None, *, base_names: Iterable[str] = (),
                    allow_unsafe: bool = False) -> AdapterInfo:
    """Check ``folder`` against the base (see the module docstring); raises ``AdapterLoadError``."""
    config = _read_config(folder)
    safe = (folder / SAFE_WEIGHTS).is_file()
    if not safe:
        if (folder / PICKLE_WEIGHTS).is_file():
            if not allow_unsafe:
                raise AdapterLoadError(
                    f"{folder} holds only {PICKLE_WEIGHTS} (pickle, which can run code when loaded); convert it to "
                    f"safetensors or start the gateway with --allow-unsafe-adapters", code="unsafe_adapter")
        else:
            raise AdapterLoadError(f"{folder} has no {SAFE_WEIGHTS}")
    weights = folder / (SAFE_WEIGHTS if safe else PICKLE_WEIGHTS)
    rank = config.get("r")
    if not isinstance(rank, int) or rank < 1:
        raise AdapterLoadError(f"{folder}/adapter_config.json: 'r' must be a positive integer, not {rank!r}")
    targets = config.get("target_modules") or ()
    target_modules = (targets,) if isinstance(targets, str) else tuple(sorted(targets))
    base_model = config.get("base_model_name_or_path")
    base_model = base_model if isinstance(base_model, str) else None
    _note_base_name(folder, base_model, base_names)
    if shapes is not None:
        if not isinstance(targets, str):  # a string is a regex in peft: checked through the weights below
            missing = sorted(t for t in target_modules if not shapes.has_module(t)
                             and not (shapes.fused_experts and t in _EXPERT_PROJECTIONS))
            if missing:
                raise AdapterLoadError(f"{folder}/adapter_config.json: target_modules names "
                                       f"{'; '.join(shapes.describe_target(t) for t in missing)}")
        if safe:
            _check_shapes(folder, weights, shapes, rank, bool(config.get("rank_pattern")))
    return AdapterInfo(path=folder, rank=rank, target_modules=target_modules, size_bytes=weights.stat().st_size,
                       base_model=base_model, safetensors=safe)


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / "adapter_config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdapterLoadError(f"{folder} is not a LoRA adapter: it has no adapter_config.json") from None
    except (OSError, ValueError) as exc:
        raise AdapterLoadError(f"{path} cannot be read: {exc}") from exc
    if not isinstance(config, dict):
        raise AdapterLoadError(f"{path} must hold a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterLoadError(f"{folder} is a {config.get('peft_type')} adapter; only LoRA is served")
    return config


def _note_base_name(folder: Path, recorded: object, base_names: Iterable[str]) -> None:
    names = {n for n in base_names if n}
    if not isinstance(recorded, str) or not recorded or not names:
        return
    recorded_last = PurePosixPath(recorded.rstrip("/")).name
    if recorded in names or recorded_last in {PurePosixPath(n.rstrip("/")).name for n in names}:
        return
    log.warning("adapter %s was trained on %r, served on %s: serving it because its shapes fit", folder, recorded,
                ", ".join(sorted(names)))


def _check_shapes(folder: Path, weights: Path, shapes: BaseShapes, rank: int, has_rank_pattern: bool) -> None:
    ranks: dict[str, dict[str, tuple[int, ...]]] = {}
    with safe_open(str(weights), framework="pt") as handle:
        for key in handle.keys():
            match = _LORA_KEY.match(key)
            if match:
                shape = tuple(int(d) for d in handle.get_slice(key).get_shape())
                ranks.setdefault(match["module"], {})[match["part"]] = shape
    if not ranks:
        raise AdapterLoadError(f"{folder}/{weights.name} holds no LoRA weights")
    for module, parts in sorted(ranks.items()):
        base = shapes.linear.get(module)
        if base is None and _EXPERTS_LORA.search(module):
            continue
        if base is None:
            raise AdapterLoadError(f"{folder} adapts {module}, {shapes.describe(module)}")
        a, b = parts.get("A"), parts.get("B")
        if a is None or b is None or len(a) != 2 or len(b) != 2:
            raise AdapterLoadError(f"{folder}: {module} needs a 2-D lora_A and lora_B")
        out_features, in_features = base
        if a[1] != in_features or b[0] != out_features or a[0] != b[1]:
            raise AdapterLoadError(
                f"{folder} does not fit the served base: {module} is {out_features}x{in_features} there, the adapter "
                f"has lora_A {a[0]}x{a[1]} and lora_B {b[0]}x{b[1]} (trained on another model size?)")
        if a[0] != rank and not has_rank_pattern:
            raise AdapterLoadError(f"{folder}: {module} has rank {a[0]} but adapter_config.json says r={rank}")
