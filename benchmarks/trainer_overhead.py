"""Time and memory per optimizer step: flowforge's trainer against a plain PyTorch loop doing the same work.

    python benchmarks/trainer_overhead.py [--steps 200] [--repeats 7] [--block 10] [--json]

Same model (built through the registry with the same seed), same batch, AdamW, EMA (foreach lerp),
warmup + cosine LR, the same velocity_mse objective with logit-normal times, data already in memory and
drawn as shuffled minibatches (one gather of a permutation's slice per step, as the trainer's sampler does).
The plain loop draws its noise and times per example through `core.rng` as the trainer's objective does
(keyed by (seed, step, global example index)), so the ratio measures the trainer, not the RNG.

Timing (issue 24, round 2): within each flowforge run the plain loop runs in alternating blocks of
`--block` steps (`Interleave`, a temporary plugin on the trainer's ``flowforge_step_end`` event), so
both sides see the same machine: separate runs of a few seconds each, as before, met a drift of the
shared machine's speed that moved single ratios by +-10%. A repeat's ratio is flowforge's time per step
(whole loop iterations: batch, step, EMA, periodic actions, the event's call) over the plain loop's;
the figure is the median over `--repeats` repeats, after one uncounted warm-up repeat. The same
alternation of two plain loops (A/A, "plain vs plain") is reported beside it: the measurement's own
bias and scatter. Memory: the peak of live tensor bytes over the run
(`_common.peak_tensor_bytes`: torch.cuda.max_memory_allocated's CPU analogue, from the profiler's
allocation events), each variant in its own subprocess; the peak RSS increase is reported beside it
(it also counts the modules a flowforge run imports and the allocator's retained pages). The flowforge
run's data-wait fraction (the share of its own loop time spent waiting for the next batch) is reported
too. Goals: time ratio <= 1.02 (2D MLP) and <= 1.01 (DiT), memory <= 1.05.
Runs on CUDA when it is available (as a flowforge run does): the plain loop then pins each batch and copies
it without blocking, uses fused AdamW, and memory is torch.cuda.max_memory_allocated; each block is
timed between device synchronisations.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import _common  # noqa: F401  (puts the repo on sys.path)
from _common import PeakRSS, emit, peak_tensor_bytes, run_on_tensors, table

import torch

from registry import hookimpl

MODELS = {
    "mlp-2d": {"data": "toy2d", "backbone": {"plugin": "mlp", "hidden": 256, "depth": 4, "time_dim": 32}, "batch": 1024},
    "dit-digits": {"data": "digits", "backbone": {"plugin": "dit", "depth": 4, "hidden_size": 128, "num_heads": 4,
                                                   "patch_size": 2}, "batch": 128},
}


def memory_data(name: str, steps: int, batch: int):
    """Pre-generated training data (steps x batch examples) and a spec, held in memory."""
    import registry

    if name == "toy2d":
        from plugins.data.toy2d import sample_toy2d

        x = sample_toy2d("checkerboard", steps * batch, torch.Generator().manual_seed(0))
        return {"x": x}, registry.build("data", {"plugin": "toy2d"}).spec
    source = registry.build("data", {"plugin": "digits", "conditional": False})
    idx = torch.randint(len(source.train["x"]), (steps * batch,), generator=torch.Generator().manual_seed(0))
    return {"x": source.train["x"][idx]}, source.spec


def flowforge_run(model_name: str, steps: int, out: Path, plugins: tuple = ()) -> dict:
    """One flowforge run on in-memory data (with `plugins` registered); returns its summary."""
    spec_cfg = MODELS[model_name]
    tensors, spec = memory_data(spec_cfg["data"], steps, spec_cfg["batch"])
    backbone = "backbone={" + ", ".join(f"{k}={v!r}" for k, v in spec_cfg["backbone"].items()) + "}"
    overrides = [backbone, f"trainer.steps={steps}", f"trainer.batch_size={spec_cfg['batch']}",
                 "trainer.progress='off'", f"trainer.log_every={steps}", "metrics=[]", "eval.num_pictures=0",
                 "eval.untrained=false", "eval.floor=false", "trainer.warmup_steps=10"]
    return run_on_tensors(tensors, spec, overrides, out, plugins)


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def plain_loss(model: torch.nn.Module, x1: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """The plain loop's loss: straight-path velocity MSE, noise and logit-normal times drawn per example from
    `seeds` through `core.rng`, as the trainer's objective draws them."""
    from core import rng

    draw = rng.ExampleRandom(seeds)
    x0 = draw.randn_like(x1, "noise")
    t = torch.sigmoid(draw.randn((), "time", device=x1.device))
    tb = t.reshape(-1, *([1] * (x1.ndim - 1)))
    xt = tb * x1 + (1 - tb) * x0
    return (model(xt, t) - (x1 - x0)).pow(2).mean()


class PlainLoop:
    """The same training written as a plain PyTorch loop, `steps` steps in all, advanced by `run`."""

    def __init__(self, model_name: str, steps: int, seed: int = 0):
        import registry
        from core.data import derive_seed

        spec_cfg = MODELS[model_name]
        tensors, spec = memory_data(spec_cfg["data"], steps, spec_cfg["batch"])
        self.batch, self.data, self.steps, self.seed, self.step = spec_cfg["batch"], tensors["x"], steps, seed, 0
        self.order = torch.randperm(len(self.data), generator=torch.Generator().manual_seed(1))  # shuffled, as any real loop
        torch.manual_seed(derive_seed(seed, "init"))
        self.dev = device()
        self.cuda = self.dev.type == "cuda"
        self.model = registry.build("backbone", spec_cfg["backbone"], spec=spec).to(self.dev)
        self.ema = [p.detach().clone() for p in self.model.parameters()]
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=2e-3, betas=(0.9, 0.999), weight_decay=0.0,
                                     **({"fused": True} if self.cuda else {}))  # the trainer's default decay (0)
        torch.manual_seed(derive_seed(seed, "train", 0))

    def run(self, n: int) -> float:
        """Take the next `n` steps; their wall time in seconds (the device synchronised at both ends)."""
        import time

        from core import rng

        model, opt, batch, dev, steps = self.model, self.opt, self.batch, self.dev, self.steps
        if self.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for step in range(self.step, self.step + n):
            x1 = self.data[self.order[step * batch:(step + 1) * batch]]  # a shuffled minibatch (the trainer's gather)
            if self.cuda:
                x1 = x1.pin_memory().to(dev, non_blocking=True)
            loss = plain_loss(model, x1, rng.shard_seeds(self.seed, step, batch, 0, dev))
            loss.backward()
            lr = 2e-3 * ((step + 1) / 10 if step < 10 else 0.5 * (1 + math.cos(math.pi * (step - 10) / (steps - 10))))
            for g in opt.param_groups:
                g["lr"] = lr
            opt.step()
            opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                torch._foreach_lerp_(self.ema, [p.detach() for p in model.parameters()], 1 - 0.995)
            if (step + 1) % steps == 0:
                loss.item()
        self.step += n
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0


def plain_loop(model_name: str, steps: int, seed: int = 0) -> float:
    """The plain loop's wall time for `steps` steps in one go."""
    return PlainLoop(model_name, steps, seed).run(steps)


class Interleave:
    """A plugin whose ``flowforge_step_end`` hook alternates a flowforge run with a `PlainLoop` in blocks.

    After every `block` trainer steps it runs `block` plain steps, so the two alternate every few tens
    of milliseconds and a drift of the machine's speed (seconds long on a shared machine) falls on both.
    A trainer block is timed from the hook's return after the previous block to the hook's call at its
    last step: whole loop iterations (batch, step, EMA, the periodic actions, this hook's call), the
    device synchronised at both ends. The first block (the loop's start-up) is not counted.
    """

    def __init__(self, plain: PlainLoop, block: int):
        self.plain, self.block = plain, block
        self.trainer_s = self.plain_s = 0.0
        self.trainer_steps = self.plain_steps = 0
        self.resumed_at: float | None = None

    @hookimpl
    def flowforge_step_end(self, trainer, step, logs):
        if step % self.block:
            return
        import time

        if self.plain.cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        if self.resumed_at is not None:
            self.trainer_s += now - self.resumed_at
            self.trainer_steps += self.block
        if self.plain.step + self.block <= self.plain.steps:
            self.plain_s += self.plain.run(self.block)
            self.plain_steps += self.block
        self.resumed_at = time.perf_counter()

    def time_ratio(self) -> float:
        """flowforge's time per step over the plain loop's."""
        return (self.trainer_s / self.trainer_steps) / (self.plain_s / self.plain_steps)


def interleaved_pair(model_name: str, steps: int, block: int, out: Path) -> tuple[Interleave, dict]:
    """One flowforge run of `steps` steps interleaved with a plain loop; the timings and the run's summary."""
    plain = PlainLoop(model_name, steps)
    plain.run(0)
    timing = Interleave(plain, block)
    summary = flowforge_run(model_name, steps, out, plugins=(timing,))
    return timing, summary


def plain_pair(model_name: str, steps: int, block: int) -> float:
    """The same alternation of two plain loops (A/A): the measurement's own scatter; time ratio of A over B."""
    a, b = PlainLoop(model_name, steps), PlainLoop(model_name, steps)
    a.run(block), b.run(block)  # as the trainer's first block, not counted
    ta = tb = 0.0
    while a.step + block <= steps:
        ta += a.run(block)
        tb += b.run(block)
    return ta / tb


def memory_worker(variant: str, model_name: str, steps: int) -> None:
    """Prints the peak tensor bytes and the peak RSS increase of one variant (run in a fresh process)."""
    with tempfile.TemporaryDirectory() as tmp:
        def train():
            if variant == "flowforge":
                flowforge_run(model_name, steps, Path(tmp) / "run")
            else:
                plain_loop(model_name, steps)

        with PeakRSS() as rss:
            train()
        tensors, _ = peak_tensor_bytes(train, device().type)
    print(json.dumps({"tensors": tensors, "rss": rss.increase}))


def measure_memory(variant: str, model_name: str, steps: int) -> dict[str, int]:
    proc = subprocess.run([sys.executable, __file__, "--memory-worker", variant, "--model", model_name,
                           "--steps", str(steps)], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def available_models() -> list[str]:
    import registry

    return [m for m, c in MODELS.items() if c["backbone"]["plugin"] in registry.available("backbone")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--block", type=int, default=10, help="steps of each side between switches")
    parser.add_argument("--models", nargs="*", default=None)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--memory-worker", default=None)
    parser.add_argument("--model", default="mlp-2d")
    args = parser.parse_args()
    if args.memory_worker:
        memory_worker(args.memory_worker, args.model, args.steps)
        return
    try:  # a [[loggers]] tensorboard entry imports it: import it outside the timed loops
        importlib.import_module("torch.utils.tensorboard")
    except ImportError:
        pass
    rows, figures = [], {}
    for name in args.models or available_models():
        ratios, aa, waits, ff_ms, plain_ms = [], [], [], [], []
        with tempfile.TemporaryDirectory() as tmp:
            interleaved_pair(name, args.steps, args.block, Path(tmp) / "warm-up")  # threads, allocator, first calls
            for r in range(args.repeats):
                timing, summary = interleaved_pair(name, args.steps, args.block, Path(tmp) / f"r{r}")
                ratios.append(timing.time_ratio())
                ff_ms.append(1000 * timing.trainer_s / timing.trainer_steps)
                plain_ms.append(1000 * timing.plain_s / timing.plain_steps)
                own = summary["loop_time_s"] - timing.plain_s  # the flowforge loop's time without the plain blocks
                waits.append(summary["data_wait_fraction"] * summary["loop_time_s"] / own)
                aa.append(plain_pair(name, args.steps, args.block))
        mem = rss = None
        if not args.no_memory:
            steps = min(args.steps, 30)  # the profiler is slow; the peak is reached in the first steps
            ours, plain = measure_memory("flowforge", name, steps), measure_memory("plain", name, steps)
            mem, rss = ours["tensors"] / plain["tensors"], ours["rss"] / max(1, plain["rss"])
        ratio = statistics.median(ratios)
        figures[name] = {"time_ratio": ratio, "time_ratios": ratios, "plain_vs_plain": statistics.median(aa),
                         "flowforge_ms_per_step": statistics.median(ff_ms), "plain_ms_per_step": statistics.median(plain_ms),
                         "data_wait_fraction": statistics.median(waits), "memory_ratio": mem, "rss_ratio": rss}
        rows.append([name, figures[name]["plain_ms_per_step"], figures[name]["flowforge_ms_per_step"], ratio,
                     f"{min(ratios):.3f}-{max(ratios):.3f}", figures[name]["plain_vs_plain"],
                     mem if mem is not None else "-", rss if rss is not None else "-",
                     figures[name]["data_wait_fraction"]])
    text = table(["model", "plain ms/step", "flowforge ms/step", "time ratio", "range over repeats",
                  "plain vs plain (noise)", "peak tensor memory ratio", "peak RSS ratio", "data wait"], rows)
    where = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    emit(figures, f"trainer overhead on {where} ({args.steps} steps in blocks of {args.block}, median of "
         f"{args.repeats} repeats, {torch.get_num_threads()} threads)\n" + text, args.json)


if __name__ == "__main__":
    main()
