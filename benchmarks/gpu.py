"""GPU throughput: DiT-B/2 training steps per second and model FLOPs utilisation (MFU).

    python benchmarks/gpu.py [--batch 256] [--steps 30] [--json]

MFU = (training FLOPs per step / step time) / measured bf16 matmul rate of this GPU, where training
FLOPs = 3 x forward FLOPs (torch.utils.flop_counter) and the rate is measured here with an 8192^3 bf16
matmul. The training step is flowforge's hot path: bf16 autocast, fused AdamW, torch.compile of the
backbone, channels-last irrelevant for DiT, EMA by foreach lerp. Goal: MFU >= 45%. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import time

import _common  # noqa: F401
from _common import emit, table

import torch


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


def main() -> None:
    import registry
    from core.interfaces import DataSpec
    from torch.utils.flop_counter import FlopCounterMode

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu.py needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = True
    spec = DataSpec(shape=(4, 32, 32), num_classes=1000)
    model = registry.build("backbone", {"plugin": "dit", "preset": "DiT-B/2"}, spec=spec).cuda()
    x = torch.randn(args.batch, 4, 32, 32, device="cuda")
    t = torch.rand(args.batch, device="cuda")
    y = torch.randint(1000, (args.batch,), device="cuda")
    with FlopCounterMode(display=False) as counter, torch.autocast("cuda", dtype=torch.bfloat16):
        model(x, t, y)
    train_flops = 3 * counter.get_total_flops()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ema = [p.detach().clone() for p in model.parameters()]
    step_model = model if args.no_compile else torch.compile(model)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = (step_model(x, t, y).float() - x.repeat(1, 2, 1, 1)[:, : 8]).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch._foreach_lerp_(ema, [p.detach() for p in model.parameters()], 1e-4)

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / args.steps
    peak = matmul_rate()
    figures = {"gpu": torch.cuda.get_device_name(), "samples_per_s": args.batch / dt, "step_ms": 1000 * dt,
               "achieved_tflops": train_flops / dt / 1e12, "matmul_tflops": peak / 1e12, "mfu": train_flops / dt / peak}
    text = table(["gpu", "batch", "step ms", "samples/s", "achieved TFLOP/s", "bf16 matmul TFLOP/s", "MFU"],
                 [[figures["gpu"], args.batch, figures["step_ms"], figures["samples_per_s"], figures["achieved_tflops"],
                   figures["matmul_tflops"], figures["mfu"]]])
    emit(figures, "DiT-B/2 training on GPU\n" + text, args.json)


if __name__ == "__main__":
    main()
