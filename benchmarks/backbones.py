"""Backbone presets: parameters, forward FLOPs and training throughput, against plain reference definitions.

For every preset of the ``unet`` and ``dit`` plugins this prints

* ``params``: parameter count (the DiT's fixed position embedding included, as in the DiT paper);
* ``GFLOP/sample``: forward FLOPs of one example (``torch.utils.flop_counter.FlopCounterMode``,
  counted on the meta device; a multiply-add is 2 FLOPs);
* ``ours/s`` and ``ref/s``: training samples per second (forward, backward and an
  AdamW step on a regression loss, at the ``batch`` shown) of the plugin's network
  and of the plain reference definition of the same network with explicit softmax
  attention (``tests/reference/backbones.py``), loaded with the same weights
  and timed in the same process;
* ``speedup``: ``ours/s / ref/s``.

Big presets are timed at a smaller batch on CPU (the ``batch`` column says which).
Examples::

    python benchmarks/backbones.py                 # every preset, on this machine's CPU
    python benchmarks/backbones.py --quick         # the small presets only, a few seconds
    python benchmarks/backbones.py --device cuda --dtype bf16 --json out.json
    python benchmarks/backbones.py --presets DiT-S/2 cifar10
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils import flop_counter

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import registry
from tests.reference.backbones import reference_for
from core.interfaces import DataSpec

# torch's flop counter knows the CUDA attention kernels but not the fused CPU one.
_CPU_SDPA = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
if _CPU_SDPA is not None and _CPU_SDPA not in flop_counter.flop_registry:
    @flop_counter.register_flop_formula(_CPU_SDPA)
    def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)

LATENT = DataSpec(shape=(4, 32, 32), num_classes=1000)  # DiT's 256x256 ImageNet latents

#: (plugin, preset, options, data spec, CPU batch, GPU batch, in --quick)
CASES: list[tuple[str, str, dict[str, Any], DataSpec, int, int, bool]] = [
    ("unet", "digits", {}, DataSpec(shape=(1, 8, 8), num_classes=10), 32, 256, True),
    ("unet", "cifar10", {}, DataSpec(shape=(3, 32, 32)), 2, 128, False),
    ("unet", "imagenet64", {}, DataSpec(shape=(3, 64, 64), num_classes=1000), 1, 64, False),
    ("dit", "DiT-digits", {}, DataSpec(shape=(1, 8, 8), num_classes=10), 32, 256, True),
    *[("dit", f"DiT-{size}/{p}", {"learn_sigma": True}, LATENT, {"S": 8, "B": 4, "L": 2, "XL": 2}[size], 64, False)
      for size in ("S", "B", "L", "XL") for p in (2, 4, 8)],
]


def build(plugin: str, preset: str, options: dict[str, Any], spec: DataSpec, device: str | torch.device) -> torch.nn.Module:
    """A preset's network on `device` (``"meta"`` allocates nothing)."""
    with torch.device(device):
        return registry.build("backbone", {"plugin": plugin, "preset": preset, **options}, spec=spec)


def inputs(spec: DataSpec, batch: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """``(x, t, y, target)`` for a batch; ``y`` is None for unconditional data."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *spec.shape, generator=g)
    t = torch.rand(batch, generator=g)
    y = torch.randint(0, spec.num_classes, (batch,), generator=g) if spec.num_classes else None
    return tuple(v.to(device) if v is not None else None for v in (x, t, y))


def forward_flops(model: torch.nn.Module, spec: DataSpec) -> int:
    """Forward FLOPs of one example, counted on the meta device."""
    x, t, y = inputs(spec, 1, torch.device("meta"))
    counter = flop_counter.FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x, t, y)
    return counter.get_total_flops()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _trainer(model: torch.nn.Module, spec: DataSpec, batch: int, device: torch.device, dtype: str):
    """A closure running one training step (forward, backward, AdamW) of `model` on a fixed batch."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    x, t, y = inputs(spec, batch, device)
    with torch.no_grad():
        out_shape = model(x[:1], t[:1], y[:1] if y is not None else None).shape[1:]
    target = torch.randn(batch, *out_shape, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()

    def step() -> None:
        with autocast:
            out = model(x, t, y)
        loss = (out.float() - target).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)

    return step


def train_throughput(models: list[torch.nn.Module], spec: DataSpec, batch: int, device: torch.device, dtype: str,
                     min_time: float, max_steps: int) -> list[float]:
    """Training samples per second of each model (forward + backward + AdamW step).

    After one warm-up step each, the models' steps are interleaved (A, B, A, B, ...)
    so that a change of machine load affects them alike; timing stops after
    `max_steps` rounds or once `min_time` seconds have passed (at least one round).
    """
    steps = [_trainer(m, spec, batch, device, dtype) for m in models]
    for step in steps:
        step()
    spent = [0.0] * len(steps)
    rounds, start = 0, time.perf_counter()
    while rounds < max(1, max_steps) and (rounds == 0 or time.perf_counter() - start < min_time):
        for i, step in enumerate(steps):
            t0 = time.perf_counter()
            step()
            spent[i] += time.perf_counter() - t0
        rounds += 1
    return [rounds * batch / s for s in spent]


def run(cases=None, device: str = "cpu", dtype: str = "fp32", compile_: bool = False, quick: bool = False,
        batch: int | None = None, min_time: float = 2.0, max_steps: int = 5, out=sys.stdout) -> list[dict[str, Any]]:
    """Measure `cases` (default: all, or the quick ones); print a table row by row; return the rows."""
    dev = torch.device(device)
    selected = [c for c in CASES if (c[6] or not quick)] if cases is None else cases
    rows = []
    print(f"# backbones on {describe(dev)}, torch {torch.__version__}, {dtype}"
          f"{', compiled' if compile_ else ''}; ratio = ours / reference (same weights, same process)", file=out)
    header = f"{'plugin':<5} {'preset':<11} {'input':<10} {'params':>13} {'GFLOP/sample':>12} {'batch':>5} " \
             f"{'ours/s':>9} {'ref/s':>9} {'speedup':>7}"
    print(header, file=out)
    print("-" * len(header), file=out)
    for plugin, preset, options, spec, cpu_batch, gpu_batch, _ in selected:
        meta = build(plugin, preset, options, spec, "meta")
        params = sum(p.numel() for p in meta.parameters())
        flops = forward_flops(meta, spec)
        del meta
        b = batch or (gpu_batch if dev.type == "cuda" else 8 if quick else cpu_batch)
        torch.manual_seed(0)
        model = build(plugin, preset, options, spec, dev)
        ref = reference_for(model, dev)
        if compile_:
            model, ref = torch.compile(model), torch.compile(ref)
        ours_rate, ref_rate = train_throughput([model, ref], spec, b, dev, dtype, min_time, max_steps)
        row = {"plugin": plugin, "preset": preset, "input": "x".join(map(str, spec.shape)), "params": params,
               "gflop_per_sample": flops / 1e9, "batch": b, "ours_samples_per_s": ours_rate,
               "ref_samples_per_s": ref_rate, "speedup": ours_rate / ref_rate}
        rows.append(row)
        print(f"{plugin:<5} {preset:<11} {row['input']:<10} {params:>13,} {row['gflop_per_sample']:>12.2f} {b:>5} "
              f"{ours_rate:>9.3g} {ref_rate:>9.3g} {row['speedup']:>6.2f}x", file=out, flush=True)
        del model, ref
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="only the small presets, short timings (for CI)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON to PATH ('-' for stdout)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16: autocast")
    parser.add_argument("--compile", action="store_true", help="torch.compile both networks")
    parser.add_argument("--presets", nargs="*", help="only these presets")
    parser.add_argument("--batch", type=int, help="override every preset's batch")
    parser.add_argument("--min-time", type=float, default=None, help="seconds of timed steps per network")
    parser.add_argument("--max-steps", type=int, default=None, help="at most this many timed steps")
    parser.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads or args.quick:
        # Small networks are dominated by per-operator overhead, where OpenMP threads only contend.
        torch.set_num_threads(args.threads or 1)
    try:
        return _main(args, parser)
    finally:
        torch.set_num_threads(threads)


def _main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    cases = None
    if args.presets:
        cases = [c for c in CASES if c[1] in args.presets]
        unknown = set(args.presets) - {c[1] for c in cases}
        if unknown:
            parser.error(f"unknown presets {sorted(unknown)}; known: {[c[1] for c in CASES]}")
    min_time = args.min_time if args.min_time is not None else (0.0 if args.quick else 3.0)
    max_steps = args.max_steps if args.max_steps is not None else (1 if args.quick else 10)
    out = sys.stderr if args.json == "-" else sys.stdout
    rows = run(cases, args.device, args.dtype, args.compile, args.quick, args.batch, min_time, max_steps, out=out)
    if args.json:
        doc = {"device": describe(torch.device(args.device)), "torch": torch.__version__, "dtype": args.dtype,
               "compiled": args.compile, "rows": rows}
        text = json.dumps(doc, indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
