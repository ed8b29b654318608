"""Where the trainer's time per step goes beyond a plain loop: each part against its bare form, step by step.

    python benchmarks/trainer_step_parts.py [--steps 600] [--repeats 3] [--parts ...] [--json]

One flowforge run of the 2D MLP of `trainer_overhead.py` per part and repeat. On even steps the part runs as
flowforge has it, on odd steps a bare stand-in doing only what the plain loop does (the objective: the plain
loop's loss; the EMA: one foreach lerp; the update: optimizer step and zero_grad; the NaN check: none; the
periodic actions: none; the batch split: the batch and its seeds). Alternating every step puts any drift
of the machine on both; the figure is the median time of the even steps' iterations over the odd steps'
(the first 20 steps skipped). "none" alternates flowforge with itself: the method's scatter. A part's ratio
minus 1 is its share of a step; their sum is roughly the time ratio of `trainer_overhead.py`.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401  (puts the repo on sys.path)
from _common import emit, table

import torch

import trainer_overhead

PARTS = ("none", "objective", "ema", "update", "nan_check", "actions", "split")


def bare_loss(self, models, batch, step):
    """The plain loop's loss (`trainer_overhead.plain_loss`) on the trainer's batch."""
    return trainer_overhead.plain_loss(models["model"], batch["x"], batch["seeds"]), {}


@torch.no_grad()
def bare_ema(self, model, step=0):
    if self._source is None:
        self._source = (model, list(model.parameters()))
    torch._foreach_lerp_(self._ema_params, self._source[1], 1.0 - self.decay)


def bare_update(self):
    self.optimizer.step()
    self.optimizer.zero_grad(set_to_none=True)
    return self.lr, False


def bare_split(self, batch):
    from core import rng

    return [{"x": batch["x"], "seeds": rng.shard_seeds(self.seed, self.step, self.per_process, self.rank, self.device)}]


def targets():
    """``{part: (owner, attribute, bare stand-in)}``."""
    import core.ema
    import core.trainer
    import plugins.flow_matching.objective as objective

    return {"objective": (objective.FlowMatching, "loss", bare_loss), "ema": (core.ema.EMA, "update", bare_ema),
            "update": (core.trainer.Trainer, "_update", bare_update),
            "nan_check": (core.trainer, "check_finite", lambda *a: None),
            "actions": (core.trainer.Trainer, "_after_step", lambda self, loop, actions: False),
            "split": (core.trainer.Trainer, "_split", bare_split)}


def measure(part: str, steps: int, out: Path) -> float:
    """One run alternating `part` with its bare form; median even-step over odd-step iteration time."""
    import core.trainer

    trainer_cls, parity, times = core.trainer.Trainer, [0], {0: [], 1: []}
    train_step, after_step = trainer_cls.train_step, trainer_cls._after_step
    owner, attr, bare = targets().get(part, (None, None, None))
    own = getattr(owner, attr) if owner is not None else None

    def alternating(*args, **kwargs):
        return (own if parity[0] == 0 else bare)(*args, **kwargs)

    inner_after = alternating if part == "actions" else after_step

    def timed_step(self, loop):
        parity[0] = self.step % 2
        self._t0 = time.perf_counter()
        train_step(self, loop)

    def timed_after(self, loop, actions):
        stop = inner_after(self, loop, actions)
        times[parity[0]].append(time.perf_counter() - self._t0)
        return stop

    try:
        if owner is not None and part != "actions":
            setattr(owner, attr, alternating)
        trainer_cls.train_step, trainer_cls._after_step = timed_step, timed_after
        trainer_overhead.flowforge_run("mlp-2d", steps, out)
    finally:
        trainer_cls.train_step, trainer_cls._after_step = train_step, after_step
        if owner is not None and part != "actions":
            setattr(owner, attr, own)
    return statistics.median(times[0][20:]) / statistics.median(times[1][20:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--parts", nargs="*", default=list(PARTS))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    figures, rows = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        trainer_overhead.flowforge_run("mlp-2d", 50, Path(tmp) / "warm-up")
        for part in args.parts:
            ratios = [measure(part, args.steps, Path(tmp) / f"{part}-{r}") for r in range(args.repeats)]
            figures[part] = ratios
            rows.append([part, *(f"{r:.4f}" for r in ratios), f"{100 * (statistics.mean(ratios) - 1):+.2f}%"])
    text = table(["part (flowforge / bare)", *(f"repeat {r + 1}" for r in range(args.repeats)), "share of a step"], rows)
    emit(figures, f"trainer step parts, mlp-2d, {args.steps} steps, {torch.get_num_threads()} threads\n" + text, args.json)


if __name__ == "__main__":
    main()
