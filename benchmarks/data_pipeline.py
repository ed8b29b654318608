"""Data wait with the real file loaders: the share of the training loop spent waiting for the next batch.

    python benchmarks/data_pipeline.py [--images 2048] [--steps 40] [--json]

Writes a CIFAR-10 python-format folder and a class-per-folder tree of PNG files (32 x 32 RGB, random
pixels: decoding cost does not depend on content much) to a temporary directory, then trains a small
DiT on each for `--steps` steps through flowforge's runner and reads the summary's
``data_wait_fraction`` (time blocked in ``next(batches)`` / loop time) and ``loop_time_s``.
cifar10 gathers batches from arrays in memory (``num_workers`` threads assemble batches ahead);
imagefolder decodes files in DataLoader worker processes with prefetching (pinned memory on CUDA).
On CUDA the trainer also draws, pins and copies each batch a step ahead (``trainer.prefetch``).
Goal: data wait <= 5% of the step.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import _common  # noqa: F401
from _common import ROOT, emit, table

MODEL = ["backbone={plugin='dit', depth=4, hidden_size=128, num_heads=4, patch_size=4}"]
LOADERS = {
    "cifar10 (in memory)": ("cifar10", {"num_workers": 0}),
    "cifar10, 1 thread ahead": ("cifar10", {"num_workers": 1}),
    "imagefolder, decode in process": ("imagefolder", {"num_workers": 0}),
    "imagefolder, 2 workers": ("imagefolder", {"num_workers": 2}),
}
if (os.cpu_count() or 1) > 2:  # a bigger machine: as many decoding workers as a GPU run would use
    LOADERS[f"imagefolder, {min(8, os.cpu_count())} workers"] = ("imagefolder", {"num_workers": min(8, os.cpu_count())})


def write_data(root: Path, images: int) -> dict[str, Path]:
    from core.testing.files import write_cifar10, write_imagefolder

    cifar = write_cifar10(root / "cifar", per_batch=max(1, images // 5))
    classes = tuple(f"class{c}" for c in range(10))
    folder = write_imagefolder(root / "folder", classes=classes, per_class=max(1, images // 10), sizes=(32, 33))
    return {"cifar10": cifar, "imagefolder": folder}


def train(plugin: str, root: Path, options: dict, steps: int, batch: int, out: Path) -> dict:
    from core.run import run

    data = {"plugin": plugin, "root": str(root), **options}
    if plugin == "imagefolder":
        data |= {"resolution": 32, "held_out_fraction": 0.05}
    data_toml = "data={" + ", ".join(f"{k}={v!r}" for k, v in data.items()) + "}"
    overrides = [data_toml, *MODEL, f"trainer.steps={steps}", f"trainer.batch_size={batch}", "trainer.progress='off'",
                 f"trainer.log_every={steps}", "trainer.checkpoint_every=0", "metrics=[]", "eval.num_pictures=0",
                 "eval.untrained=false", "eval.floor=false", "trainer.warmup_steps=1"]
    return run(ROOT / "experiments" / "rectified_flow_2d.toml", overrides, out=out, overwrite=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows, figures = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        roots = write_data(Path(tmp), args.images)
        for name, (plugin, options) in LOADERS.items():
            summary = train(plugin, roots[plugin], options, args.steps, args.batch, Path(tmp) / "run")
            wait, loop = summary["data_wait_fraction"], summary["loop_time_s"]
            figures[name] = {"data_wait_fraction": wait, "ms_per_step": 1000 * loop / args.steps}
            rows.append([name, 1000 * loop / args.steps, f"{100 * wait:.1f}%"])
    text = table(["loader", "ms/step", "data wait (goal <= 5%)"], rows)
    emit(figures, f"data pipeline (DiT depth 4 width 128 patch 4 on 32x32 RGB, batch {args.batch}, "
                  f"{args.steps} steps, {args.images} images)\n" + text, args.json)


if __name__ == "__main__":
    main()
