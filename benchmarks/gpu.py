"""GPU throughput: DiT-B/2 training steps per second and model FLOPs utilisation (MFU).

    python benchmarks/gpu.py [--batch 256] [--steps 30] [--no-compile] [--json]

MFU = (training FLOPs per step / step time) / measured bf16 matmul rate of this GPU, where training
FLOPs = 3 x forward FLOPs (torch.utils.flop_counter) and the rate is measured here with an 8192^3 bf16
matmul. Two rows, the same model, batch, bf16 autocast, fused AdamW, EMA and torch.compile:
- plain loop: a hand-written step on a batch resident on the GPU (the hardware reference);
- flowforge: a `python -m core.run` training run (velocity MSE with logit-normal times, label dropout
  0.1, warmup + cosine LR, loss-by-time logging, NaN check) drawing class-labelled 4x32x32 latents from
  CPU memory through its data stream; its step time is the median of the logged per-interval rates
  after the first interval (which holds the compilation).
Goal: MFU >= 45%, and the flowforge row within a few percent of the plain one. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401
from _common import emit, run_on_tensors, table

import torch

SHAPE, CLASSES = (4, 32, 32), 1000


def matmul_rate(n: int = 8192, repeats: int = 10) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * repeats / (time.perf_counter() - t0)


def dit_b2() -> torch.nn.Module:
    """DiT-B/2 for class-conditional 4x32x32 latents, on the GPU."""
    import registry
    from core.interfaces import DataSpec

    return registry.build("backbone", {"plugin": "dit", "preset": "DiT-B/2"},
                          spec=DataSpec(shape=SHAPE, num_classes=CLASSES)).cuda()


def train_flops(model: torch.nn.Module, batch: int) -> float:
    """3 x the forward FLOPs of `model` on one batch (backward = 2 x forward)."""
    from torch.utils.flop_counter import FlopCounterMode

    x, t, y = (torch.randn(batch, *SHAPE, device="cuda"), torch.rand(batch, device="cuda"),
               torch.randint(CLASSES, (batch,), device="cuda"))
    with FlopCounterMode(display=False) as counter, torch.autocast("cuda", dtype=torch.bfloat16):
        model(x, t, y)
    return 3 * counter.get_total_flops()


def plain_step_time(model: torch.nn.Module, batch: int, steps: int, compile: bool) -> float:
    """Seconds per step of a hand-written bf16 training step of `model` on GPU-resident data."""
    x1 = torch.randn(batch, *SHAPE, device="cuda")
    y = torch.randint(CLASSES, (batch,), device="cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ema = [p.detach().clone() for p in model.parameters()]
    net = torch.compile(model) if compile else model

    def step():
        x0 = torch.randn_like(x1)
        t = torch.sigmoid(torch.randn(batch, device="cuda"))
        tb = t.view(-1, 1, 1, 1)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = (net(tb * x1 + (1 - tb) * x0, t, y).float() - (x1 - x0)).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in model.parameters()], 1e-4)

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def flowforge_step_time(batch: int, steps: int, compile: bool) -> float:
    """Seconds per step of a flowforge run (median of logged intervals after the first)."""
    from core.interfaces import DataSpec

    g = torch.Generator().manual_seed(0)
    n = 8 * batch
    data = {"x": torch.randn(n, *SHAPE, generator=g), "y": torch.randint(CLASSES, (n,), generator=g)}
    interval = max(1, steps // 4)
    overrides = ["backbone={plugin='dit', preset='DiT-B/2'}", "objective.label_dropout=0.1",
                 f"trainer.steps={5 * interval}", f"trainer.batch_size={batch}", "trainer.precision='bf16'",
                 f"trainer.compile={str(compile).lower()}", "trainer.progress='off'", f"trainer.log_every={interval}",
                 "trainer.checkpoint_every=0", "trainer.lr=1e-4", "trainer.warmup_steps=10",
                 "trainer.ema_decay=0.9999", "metrics=[]", "eval.num_pictures=0", "eval.untrained=false",
                 "eval.floor=false"]
    with tempfile.TemporaryDirectory() as tmp:
        run_on_tensors(data, DataSpec(shape=SHAPE, num_classes=CLASSES), overrides, Path(tmp) / "run")
        records = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    rates = [r["it_per_s"] for r in records if r.get("it_per_s")][1:]
    return 1.0 / statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu.py needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = True
    compile = not args.no_compile
    model = dit_b2()
    flops, peak = train_flops(model, args.batch), matmul_rate()
    figures: dict = {"gpu": torch.cuda.get_device_name(), "batch": args.batch, "compile": compile,
                     "train_gflops_per_step": flops / 1e9, "matmul_tflops": peak / 1e12}
    rows = []
    measures = {"plain loop": lambda: plain_step_time(model, args.batch, args.steps, compile),
                "flowforge": lambda: flowforge_step_time(args.batch, args.steps, compile)}
    for name, measure in measures.items():
        dt = measure()
        fig = {"step_ms": 1000 * dt, "samples_per_s": args.batch / dt, "achieved_tflops": flops / dt / 1e12,
               "mfu": flops / dt / peak}
        figures[name] = fig
        rows.append([name, args.batch, fig["step_ms"], fig["samples_per_s"], fig["achieved_tflops"],
                     figures["matmul_tflops"], f"{100 * fig['mfu']:.1f}%"])
    figures["flowforge_over_plain"] = figures["flowforge"]["step_ms"] / figures["plain loop"]["step_ms"]
    text = table(["loop", "batch", "step ms", "samples/s", "achieved TFLOP/s", "bf16 matmul TFLOP/s", "MFU"], rows)
    emit(figures, f"DiT-B/2 training on {figures['gpu']} (bf16, fused AdamW, compile={compile}); flowforge / plain "
                  f"step time {figures['flowforge_over_plain']:.3f}\n" + text, args.json)


if __name__ == "__main__":
    main()
