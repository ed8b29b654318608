"""``flowforge encode EXPERIMENT.toml``: write the latent cache of an experiment's ``[data]`` once.

The experiment's ``[data]`` must be ``plugin = "latent"`` with a ``cache`` folder. Each process
writes the missing shards ``k = rank, rank + world_size, ...`` (``--rank`` / ``--world-size``,
default the ``RANK`` / ``WORLD_SIZE`` that torchrun sets), so one or many processes give the same
cache, and finished shards are skipped (a resumed encode writes only what is missing).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import registry
from registry import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="the experiment file ([data] plugin = \"latent\" with a cache)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of the file (repeatable)")
    parser.add_argument("--rank", type=int, default=int(os.environ.get("RANK", 0)), help="this process (default $RANK)")
    parser.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", 1)),
                        help="how many processes share the work (default $WORLD_SIZE)")


def main(args: argparse.Namespace) -> int:
    from core.runs import load_config  # core.config.load, through the API plugins may use

    from . import cache
    from .data import cache_meta, observation_source

    if not 0 <= args.rank < args.world_size:
        raise ConfigError(f"--rank {args.rank} is outside 0 .. --world-size {args.world_size} - 1")
    exp = load_config(args.file, args.overrides)
    data = exp.components["data"]
    if data["plugin"] != "latent" or not data.get("cache"):
        raise ConfigError("flowforge encode needs [data] plugin = \"latent\" with a cache folder", ("data",),
                          exp.file)
    if "autoencoder" not in exp.components:
        raise ConfigError("flowforge encode needs an [autoencoder] section", (), exp.file)
    try:
        autoencoder = registry.build("autoencoder", exp.components["autoencoder"])
    except ConfigError as exc:
        raise exc.within("autoencoder", file=exp.file) from None
    try:
        _, config = registry.configure("data", data)
        source = observation_source(config)
        meta = cache_meta(config, source, autoencoder)
        written, skipped = cache.encode(Path(config.cache), source, autoencoder, meta, args.rank, args.world_size)
    except ConfigError as exc:
        raise exc.within("data", file=exp.file) from None
    print(f"{config.cache}: rank {args.rank} of {args.world_size}: wrote {written} shard(s), skipped {skipped} "
          f"finished; {len(cache.missing(Path(config.cache), meta))} of {meta['num_shards']} still missing")
    return 0
