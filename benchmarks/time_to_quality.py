"""Time to quality: flowforge against a minimal loop of Meta's flow_matching example, on the digits.

    pip install --no-deps flow-matching      # Meta's library (pure Python over torch)
    python benchmarks/time_to_quality.py [--segments 6] [--segment-steps 250] [--json]

Both sides train the same velocity network (`experiments/rf_digits_unet.toml`'s UNet, built through the
registry with the same seed, so the same initial weights) on the same 8x8 digits in [-1, 1], unconditional,
batch 128, AdamW lr 1e-3 (betas 0.9/0.999, no weight decay), constant learning rate, no EMA, uniform
times, the conditional-OT path:

- flowforge: ``python -m core.run`` of that experiment with those overrides, trained in segments with
  ``--resume`` (resumed training is bitwise equal to an uninterrupted run: tests/e2e/test_signals.py);
  the time of a segment is its summary's ``loop_time_s`` (optimizer steps only, no start-up).
- Meta: the loop of flow_matching's examples (``AffineProbPath(CondOTScheduler())``, ``path.sample(t, x_0,
  x_1)``, the MSE of the model's output against ``dx_t``), written here in plain PyTorch, drawing shuffled
  minibatches of the same tensors; timed around its optimizer steps only.

After every segment each side's current weights generate 1000 digits with its own library's sampler
(flowforge's ``ode`` solver / Meta's ``ODESolver``, midpoint, 20 steps) and the same Frechet distance
(the project's digits feature network) is taken against the same 1000 held-out digits. The table gives,
per segment, each side's cumulative training time and distance; the summary gives the time each needs
to reach the distance Meta's loop ends at, and the distance each reaches in Meta's total time (linear
interpolation between segments). Everything runs in one process, the two sides interleaved per segment.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401  (puts the repo on sys.path)
from _common import emit, table

import torch

EXPERIMENT = _common.ROOT / "experiments" / "rf_digits_unet.toml"
SETTINGS = ["data={plugin='digits', conditional=false}", "objective.time_sampler='uniform'",
            "objective.label_dropout=0.0", "trainer.warmup_steps=0", "trainer.lr_schedule='constant'",
            "trainer.ema_decay=0.0", "trainer.lr=1e-3", "trainer.batch_size=128", "trainer.progress='off'",
            "metrics=[]", "eval.num_pictures=0", "eval.untrained=false", "eval.floor=false",
            "solver={plugin='ode', method='midpoint', steps=20}"]
SAMPLES, SOLVER_STEPS = 1000, 20


def flowforge_segment(out: Path, steps: int, segment: int) -> float:
    """Train the flowforge run in `out` up to `steps` optimizer steps; the segment's loop time."""
    from core.run import run

    summary = run(EXPERIMENT, [*SETTINGS, f"trainer.steps={steps}", f"trainer.checkpoint_every={segment}",
                               f"trainer.log_every={segment}"], out=out, resume=steps > segment,
                  overwrite=steps == segment)
    return float(summary["loop_time_s"])


def flowforge_samples(out: Path, seed: int) -> torch.Tensor:
    from core.generate import generate
    from core.runs import load_run

    loaded = load_run(out, ema=False, device="cpu")
    return generate(loaded.components, loaded.model, SAMPLES, torch.Generator().manual_seed(seed))[0]["x"]


class MetaLoop:
    """The flow_matching example's training step over the same network and data (see the module docstring)."""

    def __init__(self, seed: int = 0):
        from flow_matching.path import AffineProbPath
        from flow_matching.path.scheduler import CondOTScheduler

        import registry
        from core.config import read_toml
        from core.data import derive_seed

        self.data = registry.build("data", {"plugin": "digits", "conditional": False})
        torch.manual_seed(derive_seed(seed, "init"))  # the trainer's initialisation seed: the same weights
        self.model = registry.build("backbone", read_toml(EXPERIMENT)["backbone"], spec=self.data.spec)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0)
        self.path = AffineProbPath(scheduler=CondOTScheduler())
        self.x = self.data.train["x"]
        self.generator = torch.Generator().manual_seed(seed + 1)
        self.order, self.cursor = torch.randperm(len(self.x), generator=self.generator), 0

    def batch(self, size: int) -> torch.Tensor:
        if self.cursor + size > len(self.order):  # a new epoch: a new permutation
            self.order, self.cursor = torch.randperm(len(self.x), generator=self.generator), 0
        idx = self.order[self.cursor:self.cursor + size]
        self.cursor += size
        return self.x[idx]

    def train(self, steps: int, batch: int = 128) -> float:
        """`steps` optimizer steps; their wall time."""
        self.model.train()
        t0 = time.perf_counter()
        for _ in range(steps):
            x_1 = self.batch(batch)
            x_0 = torch.randn_like(x_1)
            t = torch.rand(x_1.shape[0])
            sample = self.path.sample(t=t, x_0=x_0, x_1=x_1)
            loss = torch.pow(self.model(sample.x_t, sample.t) - sample.dx_t, 2).mean()
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
        return time.perf_counter() - t0

    @torch.no_grad()
    def samples(self, seed: int) -> torch.Tensor:
        from flow_matching.solver import ODESolver

        self.model.eval()
        model = self.model

        class Velocity(torch.nn.Module):
            def forward(self, x, t, **extras):
                return model(x, t.expand(x.shape[0]))

        x_init = torch.randn(SAMPLES, *self.data.spec.shape, generator=torch.Generator().manual_seed(seed))
        return ODESolver(velocity_model=Velocity()).sample(x_init=x_init, step_size=1.0 / SOLVER_STEPS,
                                                           method="midpoint", time_grid=torch.tensor([0.0, 1.0]))


class Distance:
    """The Frechet distance of the project's digits features against one fixed set of held-out digits."""

    def __init__(self, data):
        import registry
        from core.collectives import Group
        from core.generate import _compute_sample_metrics
        from core.data import generator as make_generator

        metric = registry.build("metric", {"plugin": "frechet_distance"}, spec=data.spec, data=data)
        self.metrics, self.compute, self.group = {"frechet_distance": metric}, _compute_sample_metrics, Group(0, 1)
        self.real = data.reference(SAMPLES, make_generator(0, "eval-reference", 0))["x"]

    def __call__(self, fake: torch.Tensor) -> float:
        return float(self.compute(self.metrics, self.real, fake.clamp(-1, 1), self.group)["frechet_distance"])


def crossing(times: list[float], values: list[float], target: float) -> float | None:
    """The first time the piecewise-linear curve (times, values) reaches `target` or below (None: never)."""
    for i, (t, v) in enumerate(zip(times, values)):
        if v <= target:
            if i == 0:
                return t
            t0, v0 = times[i - 1], values[i - 1]
            return t0 + (t - t0) * (v0 - target) / (v0 - v) if v0 != v else t
    return None


def at_time(times: list[float], values: list[float], when: float) -> float:
    """The curve's value at `when` (linear between segments; the last value after the end)."""
    for i, t in enumerate(times):
        if t >= when:
            if i == 0:
                return values[0]
            t0, v0 = times[i - 1], values[i - 1]
            return v0 + (values[i] - v0) * (when - t0) / (t - t0)
    return values[-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--segments", type=int, default=6)
    parser.add_argument("--segment-steps", type=int, default=250)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    try:
        import flow_matching  # noqa: F401
    except ImportError:
        print("needs Meta's library: pip install --no-deps flow-matching", file=sys.stderr)
        return 2
    meta = MetaLoop()
    distance = Distance(meta.data)
    untrained = distance(meta.samples(1))  # both sides start from these weights
    rows, ff_t, ff_d, meta_t, meta_d = [], [0.0], [untrained], [0.0], [untrained]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "flowforge"
        for k in range(1, args.segments + 1):
            steps = k * args.segment_steps
            ff_t.append(ff_t[-1] + flowforge_segment(out, steps, args.segment_steps))
            meta_t.append(meta_t[-1] + meta.train(args.segment_steps))
            ff_d.append(distance(flowforge_samples(out, 1)))
            meta_d.append(distance(meta.samples(1)))
            rows.append([steps, meta_t[-1], meta_d[-1], ff_t[-1], ff_d[-1], ff_t[-1] / meta_t[-1]])
            print(f"step {steps}: meta {meta_t[-1]:.1f} s FD {meta_d[-1]:.3f} | flowforge {ff_t[-1]:.1f} s "
                  f"FD {ff_d[-1]:.3f}", file=sys.stderr, flush=True)
    target = meta_d[-1]
    meta_reach, ff_reach = crossing(meta_t, meta_d, target), crossing(ff_t, ff_d, target)
    figures = {"rows": [dict(zip(["step", "meta_s", "meta_fd", "flowforge_s", "flowforge_fd", "time_ratio"], r))
                        for r in rows],
               "target_fd": target, "meta_time_to_target_s": meta_reach, "flowforge_time_to_target_s": ff_reach,
               "meta_fd_at_meta_total": target, "flowforge_fd_at_meta_total": at_time(ff_t, ff_d, meta_t[-1])}
    text = table(["step", "Meta loop: train s", "Meta loop: FD", "flowforge: train s", "flowforge: FD",
                  "time ratio (flowforge / Meta)"], rows)
    reach = f"{ff_reach:.1f} s" if ff_reach is not None else "not reached"
    text += (f"\n\nTo reach FD {target:.3f} (Meta's final): Meta {meta_reach:.1f} s, flowforge {reach}. "
             f"In Meta's total time ({meta_t[-1]:.1f} s): Meta FD {target:.3f}, "
             f"flowforge FD {figures['flowforge_fd_at_meta_total']:.3f}.")
    emit(figures, text, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
