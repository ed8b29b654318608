"""Load a trained CLIP (a teacher, or the previous stage of a progressive run) from disk.

``load_clip(source, spec)`` accepts:

* a flowforge **run directory** (``config.toml`` + ``checkpoints/``): the model is
  rebuilt with ``registry.build("backbone", config["backbone"], spec=spec)`` from
  that run's resolved config (its own ``inherit_from`` is ignored: the weights
  come from the checkpoint) and loaded with the newest checkpoint's EMA weights
  (or model weights, with ``weights="model"``, or when the run had no EMA);
* a flowforge **checkpoint file** ``RUN/checkpoints/step-N.pt`` (the config is
  read from ``RUN/config.toml``);
* a **Hugging Face CLIP directory** (``config.json`` + ``model.safetensors`` or
  ``pytorch_model.bin``), see `plugins.tinyclip.hf`;
* any other **file** (``.pt``, ``.pth``, ``.bin``, ``.safetensors``): an OpenAI CLIP, open_clip or
  TinyCLIP state dict, see `plugins.tinyclip.openclip`.

Every problem (missing path, a run without a checkpoint, a model that is not a
CLIP, weights that do not fit) is a `ConfigError`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal

import registry
from core.interfaces import DataSpec
from core.checkpoint import model_weights
from core.runs import newest_checkpoint
from registry import ConfigError

from .model import CLIP

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def _run_config(run: Path, key: str) -> dict:
    path = run / "config.toml"
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path} is not a readable run config ({exc})", (key,)) from None


def _from_checkpoint(run: Path, checkpoint: Path, spec: DataSpec, weights: str, key: str) -> CLIP:
    """The run's [backbone] alone, rebuilt for `spec` (the rest of its config.toml is not read)."""
    backbone = dict(_run_config(run, key).get("backbone") or {})
    if not backbone:
        raise ConfigError(f"{run / 'config.toml'} has no [backbone] section", (key,))
    backbone["inherit_from"] = ""  # the weights come from the checkpoint, not from the run's own ancestor
    try:
        model = registry.build("backbone", backbone, spec=spec)
    except ConfigError as exc:
        raise ConfigError(f"cannot rebuild the backbone of {run}: {exc}", (key,)) from None
    if not isinstance(model, CLIP):
        raise ConfigError(f"the run {run} did not train a CLIP model (backbone plugin {backbone.get('plugin')!r})", (key,))
    try:
        chosen = model_weights(checkpoint, ema=weights == "ema")[1]
    except ConfigError as exc:
        raise exc.within(key) from None
    try:
        model.load_state_dict(chosen)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"the weights in {checkpoint} do not fit the model rebuilt from {run}/config.toml for this "
                          f"data (same tokenizer and image size?): {str(exc).splitlines()[0][:300]}", (key,)) from None
    return model


def load_clip(source: str | Path, spec: DataSpec, weights: Literal["ema", "model"] = "ema",
              key: str = "teacher") -> CLIP:
    """A CLIP model with the weights at `source` (see the module docstring), on the CPU, in train mode.

    Args:
        source: a run directory, a checkpoint file, a Hugging Face CLIP directory or an OpenAI / open_clip /
            TinyCLIP weights file.
        spec: the data spec to rebuild a flowforge model with.
        weights: which weights of a flowforge checkpoint.
        key: the config key that named `source` (for error messages).
    """
    path = Path(source)
    if not path.exists():
        raise ConfigError(f"{source!r} does not exist (expected a run directory, a checkpoint file or a "
                          f"Hugging Face CLIP directory)", (key,))
    if path.is_file():
        run = path.parent.parent
        if not (run / "config.toml").is_file():  # not a flowforge checkpoint: an OpenAI / open_clip / TinyCLIP file
            from .openclip import load_openai_clip

            return load_openai_clip(path, key=key)
        return _from_checkpoint(run, path, spec, weights, key)
    if (path / "config.toml").is_file():
        try:
            latest = newest_checkpoint(path)
        except ConfigError as exc:
            raise ConfigError(f"the run {path} has no checkpoint yet (has it been trained?): {exc}", (key,)) from None
        return _from_checkpoint(path, latest, spec, weights, key)
    if (path / "config.json").is_file():
        from .hf import load_hf_clip

        return load_hf_clip(path, key=key)
    raise ConfigError(f"{path} is neither a flowforge run directory (config.toml) nor a Hugging Face CLIP "
                      f"directory (config.json)", (key,))
