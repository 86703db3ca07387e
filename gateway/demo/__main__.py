"""``python -m gateway.demo [--root DIR] [--force]``: build (or reuse) the demo and print its paths as JSON."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from gateway.demo.build import build_demo


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway.demo", description=__doc__)
    parser.add_argument("--root", type=Path, default=None, help="build folder (default: the user cache)")
    parser.add_argument("--force", action="store_true", help="rebuild even when a complete build exists")
    args = parser.parse_args(argv)
    demo = build_demo(args.root, force=args.force)
    print(json.dumps(demo.to_json(), indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
