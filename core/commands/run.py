"""``flowforge run``: the same as ``python -m core.run``."""

from __future__ import annotations

import argparse

from core.run import add_run_arguments, main as run_main

NAME = "run"
HELP = "train and evaluate an experiment file"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_arguments(parser)


def main(args: argparse.Namespace) -> int:
    argv = [args.file, *sum((["--set", o] for o in args.overrides), [])]
    if args.out:
        argv += ["--out", args.out]
    if args.resume:
        argv.append("--resume")
    if args.overwrite:
        argv.append("--overwrite")
    if args.smoke:
        argv.append("--smoke")
    return run_main(argv)
