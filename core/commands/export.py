"""``flowforge export RUN --out FOLDER``: a run's model as safetensors + config (see `core.pretrained`);
``--diffusers FOLDER``: as a diffusers model folder (a DiT as ``DiTTransformer2DModel``)."""

from __future__ import annotations

import argparse

NAME = "export"
HELP = "write a run's model as model.safetensors + config.toml (loadable with from_pretrained), or for diffusers"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run directory")
    parser.add_argument("--out", help="folder to write (model.safetensors, config.toml, pretrained.json)")
    parser.add_argument("--diffusers", metavar="FOLDER",
                        help="also (or only) write a diffusers model folder (e.g. DiTTransformer2DModel for a DiT)")
    parser.add_argument("--raw", action="store_true", help="export the raw weights instead of the EMA")


def main(args: argparse.Namespace) -> int:
    from core.pretrained import save_diffusers, save_pretrained
    from registry import ConfigError

    if not args.out and not args.diffusers:
        raise ConfigError("give --out FOLDER and/or --diffusers FOLDER")
    if args.out:
        folder = save_pretrained(args.run, args.out, ema=not args.raw)
        print(f"wrote {folder} (model.safetensors, config.toml, pretrained.json)")
    if args.diffusers:
        folder = save_diffusers(args.run, args.diffusers, ema=not args.raw)
        print(f"wrote {folder} (diffusers: config.json, diffusion_pytorch_model.safetensors)")
    return 0
