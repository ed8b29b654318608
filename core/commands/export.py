"""``flowforge export RUN --out FOLDER``: a run's model as safetensors + config (see `core.pretrained`)."""

from __future__ import annotations

import argparse

NAME = "export"
HELP = "write a run's model as model.safetensors + config.toml (loadable with from_pretrained)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run directory")
    parser.add_argument("--out", required=True, help="folder to write")
    parser.add_argument("--raw", action="store_true", help="export the raw weights instead of the EMA")


def main(args: argparse.Namespace) -> int:
    from core.pretrained import save_pretrained

    folder = save_pretrained(args.run, args.out, ema=not args.raw)
    print(f"wrote {folder} (model.safetensors, config.toml, pretrained.json)")
    return 0
