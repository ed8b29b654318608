"""Importers of UNet checkpoints: guided-diffusion's ADM (``adm``) and Meta flow_matching's image example
(``flow_matching``), as flowforge runs (``flowforge import adm|flow_matching CKPT --out RUN_DIR``).

`plugins.unet.model.UNet` holds guided-diffusion's ``UNetModel`` parameters under the same names, so the
key mapping is the identity except for:

* ``label_emb.weight``: guided-diffusion's table has ``num_classes`` rows; flowforge's has the null label
  ``num_classes`` as an extra row, added as zeros (an ADM model is never asked for it: it samples
  conditionally, without classifier-free guidance). flow_matching's table already has that row
  (``padding_idx = num_classes``, zeros).
* ``*.qkv`` of the attention blocks with the legacy order (``use_new_attention_order = False``, the
  128x128 and 256x256 models): guided-diffusion's ``QKVAttentionLegacy`` reads the 3C output channels
  as ``[head h: q | k | v]`` (channel ``h 3c + j c + i``), flowforge (``QKVAttention``) as
  ``[q: heads | k: heads | v: heads]`` (channel ``j H c + h c + i``); the rows of the weight and the bias
  are permuted accordingly, which leaves the attention unchanged (both scale q and k by c^(-1/4)).

Time: ADM's network sees the integer step ``k`` (``rescale_timesteps = False``, what the released models
use), flowforge's ddpm plugin hands it ``t = 1 - (k + 1) / T``: ``time_input = "integer_step"``.
flow_matching's network sees ``t`` in [0, 1] itself: ``time_scale = 1``.

Not representable (a `registry.ConfigError` says so): guided-diffusion's 512x512 model (channel_mult
``0.5, 1, ...``: fractional widths), ``num_heads_upsample`` different from ``num_heads``,
``rescale_timesteps``, and flow_matching's discrete (``DiscreteUNetModel``) checkpoints.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Literal

import attrs
import torch
from torch import Tensor

from registry import ConfigError

#: guided-diffusion's create_model: channel_mult by image size (512's 0.5 is not representable)
ADM_CHANNEL_MULT = {256: [1, 1, 2, 2, 4, 4], 128: [1, 1, 2, 3, 4], 64: [1, 2, 3, 4]}
#: flow_matching examples/image MODEL_CONFIGS (continuous) as flowforge UNet options
FM_ARCHS: dict[str, dict[str, Any]] = {
    "cifar10": {"preset": "cifar10"},
    "imagenet": {"preset": "imagenet64", "learn_sigma": False},  # ADM 64's network with 3 output channels
}
#: flow_matching's --ode_method -> flowforge's ode solver method
FM_METHODS = {"euler": "euler", "midpoint": "midpoint", "heun2": "heun"}


def tensors_of(state: Any, what: str) -> dict[str, Tensor]:
    """`state` as a state dict of tensors; ConfigError otherwise."""
    if not isinstance(state, Mapping) or not state:
        raise ConfigError(f"expected {what}, got {type(state).__name__}")
    bad = [str(k) for k, v in state.items() if not isinstance(v, Tensor)]
    if bad:
        raise ConfigError(f"expected {what}: entries {bad[:5]} are not tensors")
    missing = [k for k in ("input_blocks.0.0.weight", "time_embed.0.weight", "out.2.weight") if k not in state]
    if missing:
        raise ConfigError(f"not a UNet state dict ({what}): missing {', '.join(missing)} "
                          f"(keys: {', '.join(list(map(str, state))[:6])}, ...)")
    return dict(state)


def new_attention_order(sd: dict[str, Tensor], heads_of) -> dict[str, Tensor]:
    """`sd` with every ``*.qkv`` weight and bias permuted from the legacy to the new order (module docstring);
    ``heads_of(channels)`` gives a block's head count."""
    out = dict(sd)
    for key in [k for k in sd if k.endswith(".qkv.weight")]:
        channels = sd[key].shape[1]
        heads = heads_of(channels)
        c = channels // heads
        j, h, i = torch.meshgrid(torch.arange(3), torch.arange(heads), torch.arange(c), indexing="ij")
        legacy = (h * 3 * c + j * c + i).reshape(-1)  # row of the new channel j H c + h c + i in the legacy layout
        for name in (key, key[: -len("weight")] + "bias"):
            out[name] = sd[name][legacy].clone()
    return out


def image_data(side: int, classes: int, note: str) -> dict[str, Any]:
    return {"plugin": "shape_only", "shape": [3, side, side], "num_classes": classes, "value_range": [-1.0, 1.0],
            "note": note}


# --------------------------------------------------------------------------- guided-diffusion (ADM)
@attrs.define
class ADMImportConfig:
    """Options of the adm importer: guided-diffusion's model and diffusion flags (its MODEL_FLAGS,
    DIFFUSION_FLAGS and --timestep_respacing), e.g. ``--image-size 64 --num-channels 192 --num-res-blocks 3
    --attention-resolutions 32,16,8 --num-head-channels 64 --resblock-updown true --class-cond true
    --learn-sigma true --noise-schedule cosine --use-new-attention-order true``.

    Attributes:
        image_size: --image_size (pixels; required).
        num_channels: --num_channels (model_channels).
        num_res_blocks: --num_res_blocks.
        channel_mult: --channel_mult (empty: guided-diffusion's choice for the image size).
        attention_resolutions: --attention_resolutions, in pixels (flowforge stores image_size / r).
        num_heads: --num_heads.
        num_heads_upsample: --num_heads_upsample (-1: num_heads; another value is not representable).
        num_head_channels: --num_head_channels (-1: use num_heads).
        dropout: --dropout.
        class_cond: --class_cond (the file must hold label_emb).
        use_scale_shift_norm: --use_scale_shift_norm.
        resblock_updown: --resblock_updown.
        use_new_attention_order: --use_new_attention_order (False: the qkv rows are permuted on import).
        learn_sigma: --learn_sigma.
        use_fp16: --use_fp16 (accepted and ignored: the files hold float32 weights; flowforge samples in fp32).
        use_checkpoint: --use_checkpoint (accepted and ignored: gradient checkpointing, training only).
        diffusion_steps: --diffusion_steps.
        noise_schedule: --noise_schedule.
        predict_xstart: --predict_xstart.
        timestep_respacing: --timestep_respacing of sampling ("250" as in the README's SAMPLE_FLAGS).
        clip_denoised: image_sample.py's --clip_denoised.
    """

    image_size: int = 0
    num_channels: int = 128
    num_res_blocks: int = 2
    channel_mult: list[int] = attrs.Factory(list)
    attention_resolutions: list[int] = attrs.Factory(lambda: [16, 8])
    num_heads: int = 4
    num_heads_upsample: int = -1
    num_head_channels: int = -1
    dropout: float = 0.0
    class_cond: bool = False
    use_scale_shift_norm: bool = True
    resblock_updown: bool = False
    use_new_attention_order: bool = False
    learn_sigma: bool = False
    use_fp16: bool = False
    use_checkpoint: bool = False
    diffusion_steps: int = 1000
    noise_schedule: Literal["linear", "cosine"] = "linear"
    predict_xstart: bool = False
    timestep_respacing: str = "250"
    clip_denoised: bool = True

    def __attrs_post_init__(self) -> None:
        if self.image_size < 1:
            raise ConfigError("give guided-diffusion's --image-size (e.g. 64, 128, 256)", ("image_size",))
        if not self.channel_mult and self.image_size not in ADM_CHANNEL_MULT:
            why = " (its 0.5 multiplier is not representable)" if self.image_size == 512 else ""
            raise ConfigError(f"no channel_mult for image size {self.image_size}{why}: give --channel-mult "
                              f"(guided-diffusion's sizes: {sorted(ADM_CHANNEL_MULT)})", ("channel_mult",))
        if self.num_heads_upsample not in (-1, self.num_heads) and self.num_head_channels == -1:
            raise ConfigError("num_heads_upsample differs from num_heads: flowforge's UNet uses one head count",
                              ("num_heads_upsample",))
        bad = [r for r in self.attention_resolutions if r < 1 or self.image_size % r]
        if bad:
            raise ConfigError(f"attention resolutions {bad} do not divide the image size {self.image_size}",
                              ("attention_resolutions",))

    def backbone(self) -> dict[str, Any]:
        """flowforge's UNet options of these flags."""
        return {"plugin": "unet", "model_channels": self.num_channels,
                "channel_mult": self.channel_mult or ADM_CHANNEL_MULT[self.image_size],
                "num_res_blocks": self.num_res_blocks,
                "attention_resolutions": sorted(self.image_size // r for r in self.attention_resolutions),
                "dropout": self.dropout, "num_heads": self.num_heads, "num_head_channels": self.num_head_channels,
                "use_scale_shift_norm": self.use_scale_shift_norm, "resblock_updown": self.resblock_updown,
                "conv_resample": True, "learn_sigma": self.learn_sigma, "norm_groups": 32,
                "class_dropout_prob": 0.0, "time_input": "integer_step", "time_steps": self.diffusion_steps}

    def heads(self, channels: int) -> int:
        return self.num_heads if self.num_head_channels == -1 else channels // self.num_head_channels


def adm_experiment(config: ADMImportConfig, classes: int) -> dict[str, Any]:
    """The experiment of an imported ADM (guided-diffusion's create_gaussian_diffusion and image_sample.py)."""
    s = config.image_size
    return {
        "experiment": {"name": f"imported-adm-{s}{'-cond' if classes else ''}", "seed": 0},
        "data": image_data(s, classes, f"guided-diffusion ADM, {s}x{s} RGB images in [-1, 1]"),
        "backbone": config.backbone(),
        "path": {"plugin": "gaussian_diffusion", "schedule": config.noise_schedule, "steps": config.diffusion_steps,
                 "prediction": "x_start" if config.predict_xstart else "epsilon",
                 "variance": "learned_range" if config.learn_sigma else "fixed_large"},
        "objective": {"plugin": "ddpm", "loss_type": "mse"},
        "solver": {"plugin": "ddpm_ancestral", "respacing": config.timestep_respacing,
                   "clip_denoised": config.clip_denoised},
        "eval": {"guidance_scale": 0.0, "untrained": False, "floor": False},
    }


def make_adm(config: ADMImportConfig):
    """Importer factory: guided-diffusion's state dict (a released .pt or an ema_*.pt) -> a flowforge run."""

    def importer(state: Any) -> dict[str, Any]:
        sd = tensors_of(state, "a guided-diffusion UNet state dict")
        table = sd.get("label_emb.weight")
        if config.class_cond != (table is not None):
            raise ConfigError(f"--class-cond {str(config.class_cond).lower()}, but the file "
                              f"{'has no' if table is None else 'has a'} label_emb", ("class_cond",))
        classes = 0 if table is None else table.shape[0]
        if table is not None:
            sd["label_emb.weight"] = torch.cat([table, torch.zeros_like(table[:1])])
        if not config.use_new_attention_order:
            sd = new_attention_order(sd, config.heads)
        notes = ["the null label row of label_emb is zeros (ADM samples conditionally, without guidance)"] \
            if classes else []
        return {"experiment": adm_experiment(config, classes), "weights": sd, "notes": notes}

    return importer


# --------------------------------------------------------------------------- flow_matching examples/image
@attrs.define
class FlowMatchingImportConfig:
    """Options of the flow_matching importer (Meta's examples/image train.py checkpoints
    ``{"model", "optimizer", "lr_schedule", "epoch", "scaler", "args"}``); unset options come from the
    checkpoint's ``args``.

    Attributes:
        dataset: --dataset, the MODEL_CONFIGS entry ("cifar10" or "imagenet"; empty: from args).
        image_size: sample resolution (0: 32 for cifar10; imagenet: 64 when args.data_path names
            train_blurred_64, else 32: the load_model_checkpoint notebook's rule).
        weights: "auto" (the EMA shadow parameters when the model was wrapped in EMA), "ema" or "model".
        cfg_scale: classifier-free guidance w of (1 + w) cond - w uncond (nan: args.cfg_scale).
        ode_method: --ode_method ("" : from args): euler, midpoint or heun2.
        ode_options: --ode_options as JSON, {"step_size": s} or {"nfe": n} ("": from args).
        edm_schedule: --edm_schedule: the EDM time grid (0: no, 1: yes, -1: from args).
    """

    dataset: str = ""
    image_size: int = 0
    weights: Literal["auto", "ema", "model"] = "auto"
    cfg_scale: float = float("nan")
    ode_method: str = ""
    ode_options: str = ""
    edm_schedule: int = -1


def fm_args(state: Any) -> dict[str, Any]:
    """The checkpoint's training arguments (an argparse.Namespace or a dict) as a dict."""
    args = state.get("args") if isinstance(state, Mapping) else None
    return dict(vars(args)) if hasattr(args, "__dict__") else dict(args or {})


def fm_weights(model: Mapping[str, Tensor], weights: str) -> dict[str, Tensor]:
    """The UNet's tensors of ``checkpoint["model"]``: an EMA wrapper's ``model.*`` with its
    ``shadow_params.<i>`` (the i-th trainable parameter, i.e. the i-th ``model.*`` tensor: the UNet
    has no buffers) in their place unless `weights` is "model"; a bare UNet's as they are."""
    keys = [k for k in model if k.startswith("model.")]
    if not keys:
        if weights == "ema":
            raise ConfigError("weights = \"ema\", but the model was not wrapped in EMA (no shadow_params)")
        return dict(model)
    inner = {k[len("model."):]: model[k] for k in keys}
    if weights == "model":
        return inner
    shadow = [model[f"shadow_params.{i}"] for i in range(len(keys)) if f"shadow_params.{i}" in model]
    if len(shadow) != len(keys):
        raise ConfigError(f"the EMA wrapper holds {len(shadow)} shadow parameters for {len(keys)} tensors")
    return {name: s for name, s in zip(inner, shadow)}


def fm_solver(method: str, options: Mapping[str, Any], edm: bool) -> dict[str, Any]:
    """flowforge's ode solver for flow_matching's --ode_method / --ode_options / --edm_schedule
    (edm: the grid of experiments/recipe_cifar10_fm.toml: t0 = 1 / 81, sigma 0.002 .. 80, rho 7)."""
    if method not in FM_METHODS:
        raise ConfigError(f"ode_method {method!r} has no fixed-step counterpart here; one of {', '.join(FM_METHODS)}",
                          ("ode_method",))
    if edm:
        if "nfe" not in options:
            raise ConfigError("edm_schedule needs ode_options {\"nfe\": N}", ("ode_options",))
        return {"plugin": "ode", "method": FM_METHODS[method], "steps": int(options["nfe"]), "grid": "edm",
                "t0": 1.0 / 81.0, "sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0}
    if "step_size" not in options:
        raise ConfigError("ode_options needs a step_size without edm_schedule", ("ode_options",))
    return {"plugin": "ode", "method": FM_METHODS[method], "steps": round(1.0 / float(options["step_size"]))}


def make_flow_matching(config: FlowMatchingImportConfig):
    """Importer factory: a flow_matching examples/image checkpoint -> a flowforge run (flow matching, cond-OT)."""

    def importer(state: Any) -> dict[str, Any]:
        args = fm_args(state)
        if args.get("discrete_flow_matching"):
            raise ConfigError("a discrete flow matching checkpoint: this importer takes continuous ones")
        model = state.get("model") if isinstance(state, Mapping) and "model" in state else state
        if not isinstance(model, Mapping):
            raise ConfigError(f"expected a train.py checkpoint with a 'model' state dict, got {type(model).__name__}")
        sd = tensors_of(fm_weights(model, config.weights), "flow_matching's UNetModel state dict")
        dataset = config.dataset or args.get("dataset", "")
        if dataset not in FM_ARCHS:
            raise ConfigError(f"dataset {dataset!r}: give --dataset, one of {', '.join(FM_ARCHS)}", ("dataset",))
        side = config.image_size or (64 if dataset == "imagenet" and "train_blurred_64" in str(args.get("data_path", ""))
                                     else 32)
        table = sd.get("label_emb.weight")
        classes = 0 if table is None else table.shape[0] - 1
        cfg = args.get("cfg_scale", 0.0) if config.cfg_scale != config.cfg_scale else config.cfg_scale
        try:
            options = json.loads(config.ode_options or args.get("ode_options", '{"step_size": 0.01}'))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"ode_options is not JSON: {exc}", ("ode_options",)) from None
        edm = bool(args.get("edm_schedule", False)) if config.edm_schedule == -1 else bool(config.edm_schedule)
        experiment = {
            "experiment": {"name": f"imported-flow-matching-{dataset}-{side}", "seed": 0},
            "data": image_data(side, classes, f"flow_matching examples/image ({dataset}), RGB images in [-1, 1]"),
            "backbone": {"plugin": "unet", **FM_ARCHS[dataset], "time_scale": 1.0, "class_dropout_prob": 0.0},
            "scheduler": {"plugin": "cond_ot"}, "path": {"plugin": "affine"},
            "objective": {"plugin": "velocity_mse"},
            "solver": fm_solver(config.ode_method or args.get("ode_method", "midpoint"), options, edm),
            "eval": {"guidance_scale": float(cfg) if classes else 0.0, "untrained": False, "floor": False},
        }
        return {"experiment": experiment, "weights": sd, "notes": []}

    return importer
