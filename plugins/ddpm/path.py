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

from .diffusion import GaussianDiffusion, named_betas, time_to_step
from .spacing import rescale_zero_terminal_snr


@attrs.define
class DiffusionConfig:
    """Options of the gaussian_diffusion path (guided-diffusion's create_gaussian_diffusion).

    Attributes:
        schedule: "linear" (1e-4 .. 0.02, scaled by 1000/steps) or "cosine" (offset 0.008, betas clipped at 0.999).
        steps: number of diffusion steps T (guided-diffusion's diffusion_steps).
        prediction: what the model predicts: "epsilon", "x_start" (predict_xstart) or "v" (v-prediction).
        variance: "fixed_large" (guided-diffusion's default), "fixed_small" (sigma_small), "learned_range"
            (learn_sigma; the backbone outputs twice the channels) or "learned" (raw log-variance).
        zero_terminal_snr: rescale the betas so that the last step has zero SNR (Lin et al. 2024,
            Algorithm 1: sqrt(abar) shifted and scaled, abar_0 kept); needs prediction "v" or "x_start".
    """

    schedule: Literal["linear", "cosine"] = "linear"
    steps: int = 1000
    prediction: Literal["epsilon", "x_start", "v"] = "epsilon"
    variance: Literal["fixed_small", "fixed_large", "learned", "learned_range"] = "fixed_large"
    zero_terminal_snr: bool = False

    def __attrs_post_init__(self) -> None:
        if self.zero_terminal_snr and self.prediction == "epsilon":
            raise ConfigError("zero_terminal_snr: an epsilon model cannot give the data at zero SNR (x_T is pure "
                              "noise); use prediction = \"v\" (Lin et al.) or \"x_start\"", ("zero_terminal_snr",))
        if self.steps < 1:
            raise ConfigError(f"expected a positive number of diffusion steps, got {self.steps}", ("steps",))
        if self.schedule == "linear" and self.steps <= 20:
            raise ConfigError(f"the linear schedule needs more than 20 steps (its last beta is 20 / steps), "
                              f"got {self.steps}; use the cosine schedule for fewer", ("steps",))

    def diffusion(self) -> GaussianDiffusion:
        """The process these options describe."""
        betas = named_betas(self.schedule, self.steps)
        if self.zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        return GaussianDiffusion(betas, self.prediction, self.variance)

    def diffusion_options(self) -> dict[str, Any]:
        """These options as a plain mapping (subclasses add their own fields)."""
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

    def velocity_field(self, field: Any) -> Any:
        """The probability-flow velocity of a model of this process (`plugins.ddpm.flow`), for ODE solvers."""
        from .flow import ProbabilityFlow

        return ProbabilityFlow(field, self.diffusion)


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
