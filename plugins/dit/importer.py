"""``flowforge import dit CHECKPOINT --out RUN_DIR``: facebookresearch/DiT checkpoints as flowforge runs.

Reads what DiT publishes and saves:

* the released files (``DiT-XL-2-256x256.pt``, ``DiT-XL-2-512x512.pt``): a plain state dict of the EMA
  network;
* ``train.py``'s checkpoints ``{"model", "ema", "opt", "args"}``: the ``ema`` weights (DiT's sample.py
  takes them too), or ``model`` with ``weights = "model"``; a ``module.`` (DDP) prefix is dropped.

`plugins.dit.model.DiT` holds DiT's ``models.py`` parameters under the same names, so the key mapping is
the identity; what the importer adds is the architecture, read off the tensor shapes::

    hidden D, in channels C, patch p   x_embedder.proj.weight     (D, C, p, p)
    latent side S = p sqrt(N)          pos_embed                  (1, N, D)
    depth                              blocks.<i>.*               i = 0 .. depth - 1
    learn_sigma (C_out = 2 C)          final_layer.linear.weight  (p^2 C_out, D)
    mlp_ratio                          blocks.0.mlp.fc1.weight    (mlp_ratio D, D)
    num_classes = rows - 1             y_embedder.embedding_table (num_classes + 1, D)

and the heads from ``preset`` (or the DiT size of that width, or ``num_heads``). It configures DiT's
diffusion (``create_diffusion``): linear betas 1e-4 .. 0.02 over 1000 steps, epsilon prediction, learned
range variances with ``learn_sigma`` (else fixed large), ``time_input = "integer_step"`` (the network
sees the integer step ``k``), and ``sample.py``'s sampler: 250 respaced ancestral steps without clipping,
with classifier-free guidance ``cfg_scale`` (flowforge's ``eval.guidance_scale = cfg_scale - 1``). The
data is a ``shape_only`` source of the latents ``(C, S, S)`` (DiT's ``image_size / 8``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any, Literal

import attrs
import torch
from torch import Tensor

from registry import ConfigError

from .model import ARCHS, PRESETS

#: keys every DiT state dict has
REQUIRED = ("x_embedder.proj.weight", "x_embedder.proj.bias", "pos_embed", "t_embedder.mlp.0.weight",
            "final_layer.linear.weight", "blocks.0.mlp.fc1.weight")
#: DiT's VAE latents: ``latent = image_size / 8``, scaled by 0.18215 (sample.py decodes ``x / 0.18215``)
VAE_FACTOR = 8


@attrs.define
class DiTImportConfig:
    """Options of the dit importer (``flowforge import dit CKPT --out RUN_DIR --OPTION VALUE``).

    Attributes:
        preset: a DiT preset (e.g. "DiT-XL/2") the checkpoint must match; it gives the head count.
        image_size: DiT's --image-size in pixels (latent side = image_size / 8); 0: read from pos_embed.
        num_classes: class count to check against the label table (0: read from it).
        num_heads: attention heads when neither preset nor the width names a DiT size (0: from those).
        weights: "auto" (a train.py checkpoint's ema, else the plain state dict), "ema" or "model".
        cfg_scale: DiT's classifier-free guidance scale s of the samples (eval.guidance_scale = s - 1;
            1.5 is the FID setting of sample_ddp.py, 4.0 sample.py's default for pictures).
        sampling_steps: respaced ancestral steps (sample.py's --num-sampling-steps).
        diffusion_steps: T of the training diffusion (DiT: 1000).
    """

    preset: str | None = None
    image_size: int = 0
    num_classes: int = 0
    num_heads: int = 0
    weights: Literal["auto", "ema", "model"] = "auto"
    cfg_scale: float = 1.5
    sampling_steps: int = 250
    diffusion_steps: int = 1000

    def __attrs_post_init__(self) -> None:
        if self.preset is not None and self.preset not in PRESETS:
            raise ConfigError(f"unknown DiT preset {self.preset!r}; presets: {', '.join(PRESETS)}", ("preset",))
        for key in ("image_size", "num_heads"):
            if getattr(self, key) < 0:
                raise ConfigError(f"expected a non-negative integer, got {getattr(self, key)}", (key,))
        if self.cfg_scale < 1.0:
            raise ConfigError(f"expected a guidance scale >= 1 (1: no guidance), got {self.cfg_scale}", ("cfg_scale",))
        for key in ("sampling_steps", "diffusion_steps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"expected a positive integer, got {getattr(self, key)}", (key,))


def state_dict_of(state: Any, weights: str = "auto") -> dict[str, Tensor]:
    """The network's tensors in `state` (a state dict or a train.py checkpoint); ConfigError otherwise."""
    if isinstance(state, Mapping) and weights != "auto":
        if not isinstance(state.get(weights), Mapping):
            raise ConfigError(f"the checkpoint has no {weights!r} entry (it has {sorted(map(str, state))[:8]})")
        state = state[weights]
    elif isinstance(state, Mapping) and isinstance(state.get("ema"), Mapping):
        state = state["ema"]
    elif isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):
        state = state["model"]
    if not isinstance(state, Mapping) or not state:
        raise ConfigError(f"expected a DiT state dict (or a dict with 'ema' / 'model'), got {type(state).__name__}")
    bad = [str(k) for k, v in state.items() if not isinstance(v, Tensor)]
    if bad:
        raise ConfigError(f"not a state dict: entries {bad[:5]} are not tensors")
    if all(str(k).startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    missing = [k for k in REQUIRED if k not in state]
    if missing:
        raise ConfigError(f"not a DiT state dict: missing {', '.join(missing)} (keys: {', '.join(list(state)[:6])}, ...)")
    return dict(state)


def architecture(sd: Mapping[str, Tensor]) -> dict[str, Any]:
    """DiT's architecture read off the tensor shapes (see the module docstring)."""
    hidden, channels, patch, _ = sd["x_embedder.proj.weight"].shape
    tokens = sd["pos_embed"].shape[1]
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise ConfigError(f"pos_embed has {tokens} tokens: not a square grid of patches")
    out = sd["final_layer.linear.weight"].shape[0] // (patch * patch)
    if out not in (channels, 2 * channels):
        raise ConfigError(f"final_layer.linear gives {out} channels per pixel for {channels} input channels")
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    table = sd.get("y_embedder.embedding_table.weight")
    return {"hidden_size": int(hidden), "depth": depth, "patch_size": int(patch), "channels": int(channels),
            "latent": grid * int(patch), "learn_sigma": out == 2 * channels,
            "mlp_ratio": sd["blocks.0.mlp.fc1.weight"].shape[0] / hidden,
            "frequency_embedding_size": int(sd["t_embedder.mlp.0.weight"].shape[1]),
            "table_rows": 0 if table is None else int(table.shape[0])}


def check(config: DiTImportConfig, arch: dict[str, Any]) -> tuple[int, int]:
    """(num_heads, num_classes) after checking the options against `arch`; ConfigError on a mismatch."""
    if config.preset is not None:
        want = PRESETS[config.preset]
        wrong = {k: (want[k], arch[k]) for k in ("hidden_size", "depth", "patch_size") if want[k] != arch[k]}
        if wrong:
            raise ConfigError(f"the checkpoint is not a {config.preset}: "
                              + ", ".join(f"{k} {a} in the preset, {b} in the file" for k, (a, b) in wrong.items()),
                              ("preset",))
    if config.image_size and config.image_size // VAE_FACTOR != arch["latent"]:
        raise ConfigError(f"--image-size {config.image_size} means {config.image_size // VAE_FACTOR}x"
                          f"{config.image_size // VAE_FACTOR} latents; the checkpoint's are {arch['latent']}x"
                          f"{arch['latent']}", ("image_size",))
    by_width = {a["hidden_size"]: a["num_heads"] for a in ARCHS.values()}
    heads = config.num_heads or (PRESETS[config.preset]["num_heads"] if config.preset else by_width.get(arch["hidden_size"], 0))
    if not heads or arch["hidden_size"] % heads:
        raise ConfigError(f"width {arch['hidden_size']} is no DiT size: give --num-heads (dividing it) or --preset",
                          ("num_heads",))
    classes = max(arch["table_rows"] - 1, 0)
    if config.num_classes > 0 and config.num_classes != classes:
        raise ConfigError(f"--num-classes {config.num_classes}, but the label table has {arch['table_rows']} rows "
                          f"({classes} classes and the null label)", ("num_classes",))
    return heads, classes


def experiment(config: DiTImportConfig, arch: dict[str, Any], heads: int, classes: int) -> dict[str, Any]:
    """The experiment mapping of the imported DiT (see the module docstring)."""
    size = next((k for k, a in ARCHS.items() if (a["hidden_size"], a["depth"]) == (arch["hidden_size"], arch["depth"])),
                f"{arch['hidden_size']}x{arch['depth']}")
    side, name = arch["latent"], config.preset or f"DiT-{size}/{arch['patch_size']}"
    backbone = {"plugin": "dit", "hidden_size": arch["hidden_size"], "depth": arch["depth"], "num_heads": heads,
                "patch_size": arch["patch_size"], "mlp_ratio": arch["mlp_ratio"], "learn_sigma": arch["learn_sigma"],
                "frequency_embedding_size": arch["frequency_embedding_size"], "class_dropout_prob": 0.0,
                "time_input": "integer_step", "time_steps": config.diffusion_steps}
    note = (f"{name} samples are SD-VAE latents (C, H, W) = ({arch['channels']}, {side}, {side}): decode x / 0.18215 "
            f"with the sd-vae-ft-ema decoder (DiT's sample.py) for {side * VAE_FACTOR}x{side * VAE_FACTOR} images")
    return {
        "experiment": {"name": f"imported-{name.lower().replace('/', '-')}-{side * VAE_FACTOR}", "seed": 0},
        "data": {"plugin": "shape_only", "shape": [arch["channels"], side, side], "num_classes": classes, "note": note},
        "backbone": backbone,
        "path": {"plugin": "gaussian_diffusion", "schedule": "linear", "steps": config.diffusion_steps,
                 "prediction": "epsilon", "variance": "learned_range" if arch["learn_sigma"] else "fixed_large"},
        "objective": {"plugin": "ddpm", "loss_type": "mse"},
        "solver": {"plugin": "ddpm_ancestral", "respacing": str(config.sampling_steps), "clip_denoised": False},
        "eval": {"guidance_scale": config.cfg_scale - 1.0 if classes else 0.0, "untrained": False, "floor": False},
    }


def make_dit(config: DiTImportConfig):
    """Importer factory: ``importer(state) -> {"experiment", "weights", "notes"}`` (`core.importing`)."""

    def importer(state: Any) -> dict[str, Any]:
        sd = state_dict_of(state, config.weights)
        arch = architecture(sd)
        heads, classes = check(config, arch)
        notes = [experiment(config, arch, heads, classes)["data"]["note"],
                 "DiT's forward_with_cfg guides only the first 3 latent channels; flowforge guides all 4"]
        if arch["table_rows"] == 0:
            notes.append("no label table: an unconditional DiT")
        return {"experiment": experiment(config, arch, heads, classes), "weights": sd, "notes": notes}

    return importer
