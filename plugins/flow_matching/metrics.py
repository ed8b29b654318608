"""``few_step``: a sample metric of the model under a given solver, e.g. one-step generation.

The experiment's own ``[solver]`` decides the samples every sample metric sees;
this ModelMetric draws its own samples with another solver (by default one
euler step: ``x_1 = x_0 + u(x_0, 0)``, one model evaluation; ``solver = {plugin = ...}`` names any
solver plugin instead, e.g. ``{plugin = "meanflow", steps = 2}``) and scores them
with any sample metric plugin against held-out data, so one summary can
report, say, 40-step and 1-step quality side by side.

Returns ``{<distance>: value, "nfe": evaluations per sample}`` (a dict-valued
distance is flattened to ``<distance>/<key>``).
"""

from __future__ import annotations

from typing import Any, Literal

import attrs
import torch
from torch import nn

from core.guidance import guided
from core.interfaces import DataSource, DataSpec, Field, space_of
from core.nn import evaluating
from registry import ConfigError

from .likelihood import build_scheduler, check_matches_run, velocity_field
from .path import AffinePath
from .solver import ODEConfig, ODESolver


@attrs.define
class FewStepConfig:
    """Options of the few_step metric.

    Attributes:
        method: ODE method of the sampler (euler, midpoint, heun, rk4, dopri5, dopri8).
        steps: number of solver steps (1 with euler: one-step generation).
        distance: the sample metric: a metric plugin name or a table {plugin = ..., ...}.
        num_samples: generated (and held-out) examples compared.
        batch_size: examples generated per solver call.
        scheduler: the scheduler the model was trained with (name or table). Inside a run leave it unset:
            the metric samples the run's own objective's field on its path; a contradicting value is refused.
            Unset outside a run: cond_ot.
        prediction: what the model predicts: velocity, epsilon or x1 (unset: the run's objective's; velocity
            outside a run). A value that contradicts the run's objective is refused.
        guidance_scale: classifier-free guidance scale w (0: none) for class-conditional models.
        sampling_eps: how far from the singular end an epsilon / x1 model is evaluated.
        name: the key of this metric in summaries (default: the plugin name).
        solver: a solver table {plugin = ..., ...} sampled instead of the ode solver of method and steps
            (e.g. {plugin = "meanflow", steps = 2}); empty: the ode solver.
    """

    method: Literal["euler", "midpoint", "heun", "rk4", "dopri5", "dopri8"] = "euler"
    steps: int = 1
    distance: str | dict[str, Any] = "energy_distance"
    num_samples: int = 2000
    batch_size: int = 1000
    scheduler: str | dict[str, Any] | None = None
    prediction: Literal["velocity", "epsilon", "x1"] | None = None
    guidance_scale: float = 0.0
    sampling_eps: float = 1e-3
    name: str = ""
    solver: dict[str, Any] = attrs.Factory(dict)

    def __attrs_post_init__(self) -> None:
        if self.solver and "plugin" not in self.solver:
            raise ConfigError("a solver table names its plugin, e.g. {plugin = \"meanflow\", steps = 2}",
                              ("solver",))
        for key in ("steps", "num_samples", "batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"expected a positive integer, got {getattr(self, key)}", (key,))


class FewStepMetric:
    """See the module docstring."""

    higher_is_better = False

    def __init__(self, config: FewStepConfig, spec: DataSpec | None = None, data: DataSource | None = None,
                 objective: Any = None):
        import registry

        self.config, self.spec = config, spec
        self.objective = objective if hasattr(objective, "sampling_model") else None
        if self.objective is not None:
            check_matches_run(config, self.objective, "few_step")
            self.path = self.objective.path
        else:
            self.path = AffinePath(build_scheduler(config.scheduler or "cond_ot"))
        self.solver = ODESolver(ODEConfig(method=config.method, steps=config.steps))
        if config.solver:
            try:
                self.solver = registry.build("solver", dict(config.solver), spec=spec, path=self.path,
                                             scheduler=getattr(self.path, "scheduler", None))
            except ConfigError as exc:
                raise exc.within("solver") from None
        mapping = {"plugin": config.distance} if isinstance(config.distance, str) else dict(config.distance)
        self.distance_name = mapping.get("plugin", "distance")
        try:
            self.distance = registry.build("metric", mapping, spec=spec, data=data)
        except ConfigError as exc:
            raise exc.within("distance") from None
        if not hasattr(self.distance, "update") or hasattr(self.distance, "evaluate"):
            raise ConfigError(f"distance {self.distance_name!r} is not a sample metric", ("distance",))

    def field(self, net: nn.Module) -> Field:
        """The velocity field sampled: the run's objective's sampling field, or the configured conversion."""
        if self.objective is not None:
            return self.objective.sampling_model(net)
        return velocity_field(net, self.path, self.config.prediction or "velocity", self.config.sampling_eps)

    @torch.no_grad()
    def generate(self, model: nn.Module, spec: DataSpec, generator: torch.Generator) -> tuple[torch.Tensor, int]:
        """``(num_samples, ...)`` samples of `model` (CPU, float32) under this metric's solver and its nfe."""
        c = self.config
        with evaluating(model) as device:
            labels = (torch.randint(spec.num_classes, (c.num_samples,), generator=generator)
                      if spec.num_classes > 0 else None)
            field = self.field(guided(model, c.guidance_scale, spec.num_classes))
            xs, nfe = [], 0
            for start in range(0, c.num_samples, c.batch_size):
                stop = min(c.num_samples, start + c.batch_size)
                x0 = self.path.sample_source((stop - start, *spec.shape), generator=generator).to(device)
                y = labels[start:stop].to(device) if labels is not None else None
                out = self.solver.sample(field, x0, y=y)
                xs.append(out.x.float().cpu())
                nfe = out.nfe
        return torch.cat(xs), nfe

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: DataSource, generator: torch.Generator) -> dict[str, float]:
        c = self.config
        fake, nfe = self.generate(model, data.spec, generator)
        reference = data.reference(c.num_samples, generator)
        m = self.distance
        if space_of(m) == "observations":  # e.g. a latent run's decoded FID: real images vs decoded samples
            real, fake = data.observations(reference), data.observations({"x": fake})
        else:
            real = reference["x"]
        m.reset()
        m.update(real, real=True)
        m.update(fake, real=False)
        value = m.compute()
        m.reset()
        out: dict[str, float] = {"nfe": float(nfe)}
        if isinstance(value, dict):
            out.update({f"{self.distance_name}/{k}": float(v) for k, v in value.items()})
        else:
            out[self.distance_name] = float(value)
        return out


def make_few_step(config: FewStepConfig, spec: DataSpec | None = None, data: DataSource | None = None,
                  objective: Any = None) -> FewStepMetric:
    """Metric factory for ``plugin = "few_step"``; inside a run it receives the run's `objective`."""
    return FewStepMetric(config, spec, data, objective)
