"""Shared helpers for the benchmark scripts: tables, JSON output, peak RSS and peak tensor memory."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def table(headers: list[str], rows: list[list]) -> str:
    """A markdown table."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def emit(figures: dict, text: str, as_json: bool) -> None:
    print(json.dumps(figures) if as_json else text)


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples this process's resident set size every millisecond; ``increase`` = peak - start."""

    def __init__(self, interval: float = 0.001):
        self.interval, self.peak, self.start = interval, 0, 0
        self._stop = threading.Event()

    def __enter__(self) -> "PeakRSS":
        self.start = self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def increase(self) -> int:
        return self.peak - self.start


def peak_tensor_bytes(fn, device: str = "cpu") -> tuple[int, object]:
    """Run ``fn()``; return ``(peak bytes of live tensors during the call, fn's result)``.

    On CUDA this is ``torch.cuda.max_memory_allocated`` (after a reset). On the CPU, where torch keeps no
    such counter, it is the same quantity rebuilt from the profiler's allocation events
    (``profile_memory=True``): every allocation and free in time order, the peak of their running sum.
    Both count every tensor alive at the peak (parameters, optimizer state, activations, batches) that was
    allocated during the call, so they are insensitive to the Python modules a run imports and to how the
    allocator returns pages to the system, unlike RSS.
    """
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base, out
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    sizes, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        if event.typed[0] == _EventType.Allocation:
            sizes.append((event.start_time_ns, event.typed[1].alloc_size))  # negative for a free
        stack.extend(event.children)
    live = peak = 0
    for _, size in sorted(sizes):
        live += size
        peak = max(peak, live)
    return peak, out


def run_on_tensors(tensors: dict, spec, overrides: list[str], out: Path, plugins: tuple = ()) -> dict:
    """A flowforge run (`experiments/rectified_flow_2d.toml` with `overrides`) training on in-memory
    `tensors` (``{"x": (N, ...), "y": (N,) optional}``, also its held-out split) described by `spec`,
    through a temporary data plugin ``memory``, with `plugins` (objects with hook implementations)
    registered for the run; returns the run's summary."""
    import contextlib

    import registry
    from core.data import TensorDataSource
    from core.run import run
    from registry import hookimpl

    class MemoryPlugin:
        @hookimpl
        def flowforge_register(self, register):
            register("data", "memory", lambda: TensorDataSource(tensors, tensors, spec), None)

    with contextlib.ExitStack() as stack:
        stack.enter_context(registry.temporary_plugin(MemoryPlugin(), name="benchmark_memory_data"))
        for i, plugin in enumerate(plugins):
            stack.enter_context(registry.temporary_plugin(plugin, name=f"benchmark_plugin_{i}"))
        return run(ROOT / "experiments" / "rectified_flow_2d.toml", ["data={plugin='memory'}", *overrides],
                   out=out, overwrite=True)
