"""Automatic weight inheritance in training: the ``clip_l0`` backbone, the ``tinyclip_l0`` objective
and the prune command.

* ``clip_l0``: a `CLIP` (every ``clip`` option, ``inherit_from`` included) carrying `CLIPMasks`
  (`plugins.tinyclip.l0`); ``encode_image`` / ``encode_text`` run the masked model
  (`plugins.tinyclip.prune.masked_vision` / ``masked_text``) with sampled masks in training and the
  deterministic ones in evaluation. The masks and multipliers form one optimizer group with the fixed
  learning rate ``mask_lr`` and no weight decay (`core.optim` ``optimizer_groups``).
* ``tinyclip_l0``: ``tinyclip_distill``'s loss plus the sparsity penalty at the step; the multipliers
  are ascended (their gradient is reversed). Logs ``expected_sparsity`` and ``target_sparsity``.
  The step's masks are one sample keyed by the global batch's first example seed (`step_seed`), so
  every rank draws the same masks; DistributedDataParallel averages the mask and multiplier gradients
  (each rank adds the same penalty), and ``log_alpha`` is clamped after every optimizer step: 1 and N
  processes with one global batch take the same steps.
* ``python -m plugins.tinyclip.autoinherit RUN OUT``: the run's masked model (EMA weights unless
  ``--weights model``), pruned with its deterministic masks to a dense `CLIP`
  (`plugins.tinyclip.prune.prune`) and written as a run directory ``OUT`` that ``teacher`` and
  ``inherit_from`` accept; prints the ``[backbone]`` options that rebuild it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping

import attrs
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from core.interfaces import DataSpec
from registry import ConfigError

from .l0 import CLIPMasks, SparsitySchedule
from .losses import TinyCLIPDistill, _world, unwrap
from .model import CLIP, CLIPConfig
from .model import make_clip as build_clip
from .prune import full_masks, masked_text, masked_vision, prune


@attrs.define
class MaskedCLIPConfig(CLIPConfig):
    """Options of ``clip_l0``: every option of ``clip`` and

    Attributes:
        target_sparsity: the share of attention and MLP weights to remove.
        start_sparsity: the target at step 0.
        sparsity_warmup: steps over which the target rises linearly to target_sparsity (0: at once).
        mask_lr: fixed learning rate of the masks and multipliers (no weight decay).
        lambda_init: initial value of both Lagrange multipliers.
    """

    target_sparsity: float = 0.5
    start_sparsity: float = 0.0
    sparsity_warmup: int = 0
    mask_lr: float = 0.01
    lambda_init: float = 10.0

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        for key in ("target_sparsity", "start_sparsity"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ConfigError(f"expected a fraction in [0, 1), got {getattr(self, key)!r}", (key,))
        if self.sparsity_warmup < 0 or self.mask_lr <= 0:
            raise ConfigError("sparsity_warmup must be >= 0 and mask_lr > 0", ("mask_lr",))


class MaskedCLIP(CLIP):
    """A `CLIP` whose towers run under learnable L0 masks (module docstring)."""

    def attach_masks(self, schedule: SparsitySchedule, lambda_init: float, mask_lr: float) -> MaskedCLIP:
        self.masks = CLIPMasks(self, schedule, lambda_init)
        self.mask_lr = mask_lr
        return self

    def encode_image(self, image: Tensor) -> Tensor:
        return F.normalize(masked_vision(self.visual, image, full_masks(self.visual, self.masks.tower("visual"))), dim=-1)

    def encode_text(self, tokens: Tensor) -> Tensor:
        return F.normalize(masked_text(self.text, tokens, full_masks(self.text, self.masks.tower("text"))), dim=-1)

    def optimizer_groups(self) -> list[tuple[str, dict]]:
        return [(r"^masks\.", {"lr": self.mask_lr, "weight_decay": 0.0})]

    def after_optimizer_step(self) -> None:
        """Clamp every ``log_alpha`` to ``[log 0.01, log 100]`` (the trainer calls it after each update)."""
        self.masks.constrain()

    @torch.no_grad()
    def pruned(self) -> CLIP:
        """The dense `CLIP` of the deterministic masks."""
        was_training = self.masks.training
        self.masks.eval()
        try:
            return prune(self, self.masks())
        finally:
            self.masks.train(was_training)


def make_clip_l0(config: MaskedCLIPConfig, spec: DataSpec) -> MaskedCLIP:
    """Backbone factory for ``clip_l0``: ``clip`` (with its inheritance), then the masks."""
    plain = build_clip(CLIPConfig(**{f.name: getattr(config, f.name) for f in attrs.fields(CLIPConfig)}), spec)
    model = MaskedCLIP(plain.dims, config.logit_scale_init, config.gradient_checkpointing)
    model.load_state_dict(plain.state_dict())
    model.logit_scale.requires_grad_(plain.logit_scale.requires_grad)
    schedule = SparsitySchedule(config.target_sparsity, config.start_sparsity, config.sparsity_warmup)
    return model.attach_masks(schedule, config.lambda_init, config.mask_lr)


def step_seed(batch) -> Tensor | None:
    """``(1,)`` int64: the seed of the global batch's first example (``batch["seeds"][0]`` of rank 0,
    broadcast), the same on every rank and for any process count; None without ``"seeds"``."""
    seeds = batch.get("seeds")
    if seeds is None:
        return None
    seed = seeds[:1].clone()
    if _world()[1] > 1:
        dist.broadcast(seed, 0)
    return seed


class L0Distill(TinyCLIPDistill):
    """``tinyclip_l0``: see the module docstring (options: those of ``tinyclip_distill``)."""

    def loss(self, models: Mapping[str, nn.Module], batch, step: int) -> tuple[Tensor, dict[str, float]]:
        model = unwrap(models["model"])
        if not isinstance(model, MaskedCLIP):
            raise ConfigError("the tinyclip_l0 objective needs the clip_l0 backbone", ("objective",))
        model.masks.noise_seed = step_seed(batch)  # kept for the backward pass (cached accumulation's replay)
        loss, logs = super().loss(models, batch, step)
        penalty, expected, target = model.masks.penalty(step, ascend_lambdas=True)
        return loss + penalty, {**logs, "l0_penalty": float(penalty.detach()), "expected_sparsity": expected,
                                "target_sparsity": target}



def make_tinyclip_l0(config, spec: DataSpec, teacher: nn.Module | None = None) -> L0Distill:
    """Objective factory for ``plugin = "tinyclip_l0"`` (options: those of ``tinyclip_distill``)."""
    return L0Distill(config, spec, teacher)


def prune_run(run_dir: str, out: str, ema: bool = True) -> CLIP:
    """Prune the masked model of the ``clip_l0`` run in `run_dir` and write it to `out` (module docstring)."""
    from core.runs import load_run

    from .prune import save_student

    model = load_run(run_dir, ema=ema, device="cpu").model
    if not isinstance(model, MaskedCLIP):
        raise ConfigError(f"{run_dir} did not train a clip_l0 backbone (nothing to prune)")
    student = model.pruned()
    save_student(student, out)
    return student


def main(argv: list[str] | None = None) -> int:
    from .prune import backbone_options

    parser = argparse.ArgumentParser(prog="python -m plugins.tinyclip.autoinherit",
                                     description="prune a clip_l0 run to a dense CLIP student")
    parser.add_argument("run_dir")
    parser.add_argument("out")
    parser.add_argument("--weights", choices=("ema", "model"), default="ema")
    args = parser.parse_args(argv)
    try:
        student = prune_run(args.run_dir, args.out, ema=args.weights == "ema")
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    count = sum(p.numel() for p in student.parameters())
    print(f"wrote {args.out} ({count} parameters); [backbone] options (with inherit_from = {args.out!r}):")
    print(json.dumps(backbone_options(student), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
