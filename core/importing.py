"""Published checkpoints as flowforge run directories (``flowforge import FAMILY CHECKPOINT --out RUN_DIR``).

An *importer* is a component of kind ``importer`` (registered by the plugin of a model family),
built from its options and called on the checkpoint's contents::

    imported = importer(state)   # state: what the file holds, read as data
    imported = {"experiment": {...}, "weights": {name: Tensor}, "notes": [str, ...]}

``experiment`` is an experiment mapping (``[data]``, ``[backbone]``, ``[path]``, ... as an experiment
file writes them) and ``weights`` the backbone's state dict in flowforge's names. `import_checkpoint`

1. reads the file as data only: ``torch.load(weights_only=True)`` (``argparse.Namespace`` allowed, as
   training scripts save their arguments in it) or safetensors; a pickled object of any other class
   (code) is refused;
2. validates the experiment (`core.config.resolve`), builds its components and loads the weights
   strictly (every key, every shape), so a mismatch is a `registry.ConfigError` before anything is
   written;
3. writes ``config.toml`` (resolved), ``checkpoints/step-00000000.pt`` (``model`` = ``ema`` = the
   weights, ``step`` 0, as data) and ``imported.json`` (source file, importer options, notes) to a
   temporary sibling of ``RUN_DIR`` and renames it: ``RUN_DIR`` appears whole or not at all.

The result is what `core.runs.load_run` reads: ``flowforge sample RUN_DIR`` and ``flowforge eval`` work
on it. It holds no optimizer state: it is for sampling and evaluation (train from it with a new run).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

import registry
from registry import ConfigError

from . import checkpoint as ckpt
from .config import dumps, resolve
from .rundir import RunDir

KIND = "importer"
META = "imported.json"


def read_data(path: str | Path) -> Any:
    """The contents of a published checkpoint, read as data: a ``.safetensors`` file's tensors, or
    ``torch.load(weights_only=True)`` of anything else; ConfigError when missing or not data-only."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise ConfigError(f"{path} is not a readable safetensors file: {exc}") from None
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means the file is not plain data
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{path} is not a data-only checkpoint (read with weights_only=True: "
                          f"{first[:300]})") from None


def convert(family: str, options: Mapping[str, Any], state: Any) -> dict[str, Any]:
    """Run the importer `family` with `options` on `state`; checks the shape of what it returns."""
    try:
        importer = registry.build(KIND, {"plugin": family, **options})
    except ConfigError as exc:
        raise exc.within(KIND) from None
    out = importer(state)
    if not isinstance(out, Mapping) or not {"experiment", "weights"} <= set(out):
        raise ConfigError(f"importer {family!r} returned {type(out).__name__}, not a mapping with "
                          f"'experiment' and 'weights'")
    return dict(out)


def import_checkpoint(family: str, source: str | Path, out: str | Path, options: Mapping[str, Any] | None = None,
                      *, overwrite: bool = False) -> Path:
    """Write the run directory `out` from the published checkpoint `source` (see the module docstring)."""
    from .build import build_components
    from .checkpoint import mismatch_detail

    out = Path(out)
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} exists; choose another --out (or pass --overwrite)")
    options = dict(options or {})
    imported = convert(family, options, read_data(source))
    exp = resolve(imported["experiment"], file=f"(import {family})")
    weights = {k: v.detach().cpu().contiguous() for k, v in imported["weights"].items()}
    model = build_components(exp).model
    try:
        model.load_state_dict(weights, strict=True)
    except (KeyError, RuntimeError, ValueError) as exc:
        raise ConfigError(f"importer {family!r}: the weights of {source} do not fit the model it "
                          f"configured:{mismatch_detail(exc)}") from None
    with ckpt.folder_atomic(out, "import-tmp") as tmp:
        run_dir = RunDir(tmp)
        run_dir.config.write_text(dumps(exp))
        ckpt.save_atomic({"step": 0, "model": weights, "ema": weights}, ckpt.path_for(run_dir.checkpoints, 0))
        meta = {"family": family, "source": str(Path(source).resolve()), "options": options,
                "notes": list(imported.get("notes", []))}
        (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
        run_dir.write_env()
    return out
