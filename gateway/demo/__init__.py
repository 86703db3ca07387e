"""The demo model zoo: a tiny Qwen2 base and LoRA adapters, built locally in seconds and cached.

    from gateway.demo import build_demo
    demo = build_demo()                      # user cache; built once, reused afterwards
    demo.base_dir                            # Hugging Face model folder
    demo.adapters["pku-assistant"]           # LLaMA-Factory LoRA run folder (template: qwen)

Adapters: ``pku-assistant`` and ``cat-assistant`` (template ``qwen``), ``thinker`` (template ``qwen3``: thinking,
no-thinking, tool calls). ``python -m gateway.demo [--root DIR] [--force]`` builds and prints the paths as JSON.
"""

from gateway.demo.build import DemoModels, build_demo, default_root, demo_version

__all__ = ["DemoModels", "build_demo", "default_root", "demo_version"]
