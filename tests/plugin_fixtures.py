"""A plugin module used by the tests (loaded in-process with registry.temporary_plugin, and in spawned
worker processes through FLOWFORGE_PLUGIN_MODULES=tests.plugin_fixtures).

Components:
  objective "regression": || model(x, 1/2) - scale * x ||^2, no random draws (data-parallel equivalence);
  objective "flaky": velocity_mse that raises KeyboardInterrupt / returns NaN at a chosen step;
  objective "rank_noise": velocity_mse that also records this rank's first random draw of each step.
"""

from __future__ import annotations

import os
from pathlib import Path

import attrs
import torch

import registry
from registry import hookimpl

FLOWFORGE_API = 1


@attrs.define
class RegressionConfig:
    """Options.

    Attributes:
        scale: target = scale * x.
    """

    scale: float = 2.0


class Regression:
    """A deterministic objective: mean || model(x, 1/2) - scale x ||^2."""

    def __init__(self, config: RegressionConfig):
        self.config = config

    def loss(self, models, batch, step):
        x = batch["x"]
        pred = models["model"](x, torch.full((x.shape[0],), 0.5, device=x.device))
        return (pred - self.config.scale * x).pow(2).mean(), {"scale": self.config.scale}

    def sampling_model(self, model):
        return model

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


@attrs.define
class FlakyConfig:
    """Options.

    Attributes:
        interrupt_at: step at which to raise KeyboardInterrupt (-1: never), once per marker file.
        interrupt_rank: the rank that raises (-1: every rank).
        nan_at: step whose loss is NaN (-1: never).
        marker: a file created when the interruption happened (so a resumed run does not repeat it).
        record: a folder where each rank appends its first random draw of every step.
    """

    interrupt_at: int = -1
    interrupt_rank: int = -1
    nan_at: int = -1
    marker: str = ""
    record: str = ""


class Flaky:
    """velocity_mse with injected failures."""

    def __init__(self, config: FlakyConfig, spec, path):
        self.config = config
        self.inner = registry.build("objective", {"plugin": "velocity_mse"}, spec=spec, path=path)
        self.rank = int(os.environ.get("RANK", "0"))

    def loss(self, models, batch, step):
        c = self.config
        if step == c.interrupt_at and c.interrupt_rank in (-1, self.rank):
            marker = Path(c.marker) if c.marker else None
            if marker is None or not marker.exists():
                if marker is not None:
                    marker.write_text("interrupted")
                raise KeyboardInterrupt
        if c.record:
            probe = torch.get_rng_state()
            value = torch.rand(()).item()
            torch.set_rng_state(probe)
            with open(Path(c.record) / f"rank{self.rank}.txt", "a") as fh:
                fh.write(f"{step} {value!r}\n")
        loss, logs = self.inner.loss(models, batch, step)
        if step == c.nan_at:
            loss = loss * float("nan")
        return loss, logs

    def sampling_model(self, model):
        return model

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


class ConstantMetric:
    """A model metric that never changes (for early-stopping tests)."""

    higher_is_better = False

    def evaluate(self, model, data, generator):
        return {"value": 1.0}


@hookimpl
def flowforge_register(register):
    register("objective", "regression", Regression, RegressionConfig)
    register("metric", "constant", ConstantMetric, None)
    register("objective", "flaky", Flaky, FlakyConfig)


def metric_entry(accelerator, samples, reference):
    """Launcher entry: energy distance with each rank contributing its contiguous share (uneven sizes)."""
    rank, world = accelerator.process_index, accelerator.num_processes
    metric = registry.build("metric", {"plugin": "energy_distance"})
    bounds = [round(i * len(samples) / world) + (1 if i and world > 1 else 0) for i in range(world + 1)]
    bounds[-1] = len(samples)
    lo, hi = bounds[rank], bounds[rank + 1]
    metric.update(reference[lo:hi], real=True)
    metric.update(samples[lo:hi], real=False)
    return {"value": float(metric.compute()), "rank_count": hi - lo}


def ranks_entry(accelerator, out_dir):
    """Launcher entry: every rank writes its rank and world size (launcher conformance)."""
    Path(out_dir, f"rank{accelerator.process_index}").write_text(str(accelerator.num_processes))
    return accelerator.process_index


def dying_rank_entry(accelerator, signum):
    """Launcher entry: rank 1 is killed by `signum` (as the out-of-memory killer would) while rank 0 waits in a
    collective; the launcher must name rank 1, not report rank 0's broken connection."""
    import os

    import torch.distributed as dist

    if accelerator.process_index == 1:
        os.kill(os.getpid(), signum)
    dist.barrier()
    return 0
