"""Time and memory per optimizer step: flowforge's trainer against a plain PyTorch loop doing the same work.

    python benchmarks/trainer_overhead.py [--steps 200] [--repeats 3] [--json]

Same model (built through the registry with the same seed), same batch, AdamW, EMA (foreach lerp),
warmup + cosine LR, the same velocity_mse objective with logit-normal times, data already in memory and
drawn as shuffled minibatches (one gather of a permutation's slice per step, as the trainer's sampler does;
before issue 24 the plain loop took contiguous pre-sliced batches, which no real training does).
The plain loop draws its noise and times per example through `core.rng` as the trainer's objective does
(keyed by (seed, step, global example index)), so the ratio measures the trainer, not the RNG.
Timing: flowforge's loop time (summary "loop_time_s") against the plain loop's, interleaved runs in
this process (ABBA order: odd pairs run the plain loop first), the median of the per-pair ratios. Memory: the peak of live tensor bytes over the run
(`_common.peak_tensor_bytes`: torch.cuda.max_memory_allocated's CPU analogue, from the profiler's
allocation events), each variant in its own subprocess; the peak RSS increase is reported beside it
(it also counts the modules a flowforge run imports and the allocator's retained pages). The flowforge run's data-wait fraction (the share of
the loop spent waiting for the next batch) is reported too. Goal: time ratio <= 1.03, memory <= 1.05.
Runs on CUDA when it is available (as a flowforge run does): the plain loop then pins each batch and copies
it without blocking, uses fused AdamW, and memory is torch.cuda.max_memory_allocated.
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


def flowforge_run(model_name: str, steps: int, out: Path) -> dict:
    """One flowforge run on in-memory data; returns its summary."""
    spec_cfg = MODELS[model_name]
    tensors, spec = memory_data(spec_cfg["data"], steps, spec_cfg["batch"])
    backbone = "backbone={" + ", ".join(f"{k}={v!r}" for k, v in spec_cfg["backbone"].items()) + "}"
    overrides = [backbone, f"trainer.steps={steps}", f"trainer.batch_size={spec_cfg['batch']}",
                 "trainer.progress='off'", f"trainer.log_every={steps}", "metrics=[]", "eval.num_pictures=0",
                 "eval.untrained=false", "eval.floor=false", "trainer.warmup_steps=10"]
    return run_on_tensors(tensors, spec, overrides, out)


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def plain_loop(model_name: str, steps: int, seed: int = 0) -> float:
    """The same training written as a plain PyTorch loop; returns the loop's wall time."""
    import time

    import registry
    from core import rng
    from core.data import derive_seed

    spec_cfg = MODELS[model_name]
    tensors, spec = memory_data(spec_cfg["data"], steps, spec_cfg["batch"])
    batch = spec_cfg["batch"]
    data = tensors["x"]
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(1))  # shuffled, as any real loop
    torch.manual_seed(derive_seed(seed, "init"))
    dev = device()
    cuda = dev.type == "cuda"
    model = registry.build("backbone", spec_cfg["backbone"], spec=spec).to(dev)
    ema = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.999), **({"fused": True} if cuda else {}))
    torch.manual_seed(derive_seed(seed, "train", 0))
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for step in range(steps):
        x1 = data[order[step * batch:(step + 1) * batch]]  # a shuffled minibatch (the trainer's gather)
        if cuda:
            x1 = x1.pin_memory().to(dev, non_blocking=True)
        draw = rng.ExampleRandom(rng.shard_seeds(seed, step, batch, 0, dev))  # the trainer's per-example draws
        x0 = draw.randn_like(x1, "noise")
        t = torch.sigmoid(draw.randn((), "time", device=dev))
        tb = t.reshape(-1, *([1] * (x1.ndim - 1)))
        xt = tb * x1 + (1 - tb) * x0
        loss = (model(xt, t) - (x1 - x0)).pow(2).mean()
        loss.backward()
        lr = 2e-3 * ((step + 1) / 10 if step < 10 else 0.5 * (1 + math.cos(math.pi * (step - 10) / (steps - 10))))
        for g in opt.param_groups:
            g["lr"] = lr
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in model.parameters()], 1 - 0.995)
        if (step + 1) % steps == 0:
            loss.item()
    return time.perf_counter() - t0


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
    parser.add_argument("--repeats", type=int, default=3)
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
        ratios, waits, ff_times, base_times = [], [], [], []
        plain_loop(name, 10)  # warm-up (threads, allocator)
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(args.repeats):
                if r % 2:  # ABBA order: a drift of the machine's speed during a pair cancels over two pairs
                    base = plain_loop(name, args.steps)
                    summary = flowforge_run(name, args.steps, Path(tmp) / f"r{r}")
                else:
                    summary = flowforge_run(name, args.steps, Path(tmp) / f"r{r}")
                    base = plain_loop(name, args.steps)
                ff_times.append(summary["loop_time_s"])
                base_times.append(base)
                ratios.append(summary["loop_time_s"] / base)
                waits.append(summary["data_wait_fraction"])
        mem = rss = None
        if not args.no_memory:
            steps = min(args.steps, 30)  # the profiler is slow; the peak is reached in the first steps
            ours, plain = measure_memory("flowforge", name, steps), measure_memory("plain", name, steps)
            mem, rss = ours["tensors"] / plain["tensors"], ours["rss"] / max(1, plain["rss"])
        ratio = statistics.median(ratios)
        figures[name] = {"time_ratio": ratio, "flowforge_ms_per_step": 1000 * statistics.median(ff_times) / args.steps,
                         "plain_ms_per_step": 1000 * statistics.median(base_times) / args.steps,
                         "data_wait_fraction": statistics.median(waits), "memory_ratio": mem, "rss_ratio": rss}
        rows.append([name, figures[name]["plain_ms_per_step"], figures[name]["flowforge_ms_per_step"], ratio,
                     mem if mem is not None else "-", rss if rss is not None else "-",
                     figures[name]["data_wait_fraction"]])
    text = table(["model", "plain ms/step", "flowforge ms/step", "time ratio", "peak tensor memory ratio",
                  "peak RSS ratio", "data wait"], rows)
    where = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    emit(figures, f"trainer overhead on {where} ({args.steps} steps, median of {args.repeats} interleaved pairs)\n"
         + text, args.json)


if __name__ == "__main__":
    main()
