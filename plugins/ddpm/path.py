"""The ``gaussian_diffusion`` path: DDPM's discrete forward process as a flowforge `Path`.

Its options (`DiffusionConfig`) are the single source of truth for the
process: the ``ddpm`` objective and the ``ddpm_ancestral`` / ``ddim`` solvers
read the schedule, the prediction type and the variance type from the path
they get from the runner. Step ``k`` is flowforge time ``t = 1 - (k + 1) / T``
(see `plugins.ddpm.diffusion`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import attrs
import torch
from torch import Tensor

from core import rng
from core.interfaces import DataSpec, Path, PathSample
from registry import ConfigError

from .diffusion import GaussianDiffusion, time_to_step


@attrs.define
class DiffusionConfig:
    """Options of the gaussian_diffusion path (guided-diffusion's create_gaussian_diffusion).

    Attributes:
        schedule: "linear" (1e-4 .. 0.02, scaled by 1000/steps) or "cosine" (offset 0.008, betas clipped at 0.999).
        steps: number of diffusion steps T (guided-diffusion's diffusion_steps).
        prediction: what the model predicts: "epsilon", "x_start" (predict_xstart) or "v" (v-prediction).
        variance: "fixed_large" (guided-diffusion's default), "fixed_small" (sigma_small), "learned_range"
            (learn_sigma; the backbone outputs twice the channels) or "learned" (raw log-variance).
    """

    schedule: Literal["linear", "cosine"] = "linear"
    steps: int = 1000
    prediction: Literal["epsilon", "x_start", "v"] = "epsilon"
    variance: Literal["fixed_small", "fixed_large", "learned", "learned_range"] = "fixed_large"

    def __attrs_post_init__(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"expected a positive number of diffusion steps, got {self.steps}", ("steps",))
        if self.schedule == "linear" and self.steps <= 20:
            raise ConfigError(f"the linear schedule needs more than 20 steps (its last beta is 20 / steps), "
                              f"got {self.steps}; use the cosine schedule for fewer", ("steps",))

    def diffusion(self) -> GaussianDiffusion:
        """The process these options describe."""
        return GaussianDiffusion.named(self.schedule, self.steps, self.prediction, self.variance)

    def diffusion_options(self) -> dict[str, Any]:
        """These four options as a plain mapping (subclasses add their own fields)."""
        return {f.name: getattr(self, f.name) for f in attrs.fields(DiffusionConfig)}


class GaussianDiffusionPath(Path):
    """``x_t = sqrt(abar_k) x_1 + sqrt(1 - abar_k) x_0`` at the step ``k`` of time ``t`` (snapped to the grid).

    ``x_0 ~ N(0, I)`` is the noise and ``x_1`` the data (flowforge's names); the
    target is what the configured prediction type regresses on.
    """

    def __init__(self, config: DiffusionConfig):
        self.config = config
        self.diffusion = config.diffusion()

    def sample(self, x_0: Tensor, x_1: Tensor, t: Tensor) -> PathSample:
        k = time_to_step(t, self.diffusion.num_timesteps).to(x_1.device)
        x_t = self.diffusion.q_sample(x_1, k, x_0)
        return PathSample(x_0=x_0, x_1=x_1, t=t, x_t=x_t, target=self.diffusion.target(x_1, x_0, k))

    def sample_source(self, shape: Sequence[int], generator: torch.Generator | None = None,
                      device: torch.device | str | None = None, *, dtype: torch.dtype | None = None,
                      draw: rng.ExampleRandom | None = None) -> Tensor:
        """``x_0 ~ N(0, I)`` ``(B, ...)`` (`core.rng.standard_normal`, stream ``"noise"``)."""
        return rng.standard_normal(shape, generator, device, dtype=dtype, draw=draw)


def make_gaussian_diffusion(config: DiffusionConfig, spec: DataSpec | None = None,
                            scheduler: Any = None) -> GaussianDiffusionPath:
    """Path factory: continuous data only; the process defines its own schedule (no [scheduler])."""
    if scheduler is not None:
        raise ConfigError("the gaussian_diffusion path defines its own noise schedule (options schedule, steps): "
                          "remove the [scheduler] section")
    if spec is not None and spec.kind != "continuous":
        raise ConfigError(f"the gaussian_diffusion path needs continuous data, got {spec.kind!r} data")
    return GaussianDiffusionPath(config)


def diffusion_of(path: Any, component: str) -> GaussianDiffusion:
    """The process of a ``gaussian_diffusion`` path; ConfigError naming `component` otherwise."""
    if not isinstance(path, GaussianDiffusionPath):
        got = "no [path] section" if path is None else f"a {type(path).__name__}"
        raise ConfigError(f"{component} needs [path] plugin = \"gaussian_diffusion\" (got {got})")
    return path.diffusion
