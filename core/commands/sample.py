"""``flowforge sample RUN_DIR``: draw samples from a run's latest checkpoint.

Loads the EMA weights (``--no-ema``: the raw weights), integrates with the
run's solver or another one (``--solver``, ``--steps``, ``--method``, or any
``--set solver.KEY=VALUE``), with classifier-free guidance scale ``--guidance``,
and writes a picture of the first ``--grid`` samples through the data source's
``render()`` (a PNG grid or a scatter plot) and, with ``--npz``, all of them.

Samples are generated in blocks of ``--batch-size`` and streamed to disk, so
``-n 50000`` holds one block (and the picture's samples) in memory. Block
``[a, b)`` is drawn from its own generator (seeded by ``--seed`` and ``a``):
the whole blocks of a run do not depend on ``-n`` (the first ``k B`` samples of
``-n 50000`` are those of ``-n k B``). Image data (examples ``(C, H, W)``
in [-1, 1]) is written as the ADM evaluator, torch-fidelity and clean-fid read
it: ``arr_0`` uint8 ``(N, H, W, C)`` with ``uint8((x + 1) * 127.5)`` clamped to
[0, 255] (guided-diffusion's conversion), ``arr_1`` the labels of a
class-conditional model; ``--png-folder DIR`` also writes one PNG per sample.
Other data is written as ``x`` (and ``y``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from typing import Any

import numpy as np
import torch

from registry import ConfigError

NAME = "sample"
HELP = "draw samples from a run's checkpoint (PNG grid or scatter plot, optional .npz)"


def add_solver_arguments(parser: argparse.ArgumentParser, run_optional: bool = False) -> None:
    """Options shared by ``sample`` and ``eval``: the run (optional for eval's --input1/--input2), weights,
    overrides and device."""
    parser.add_argument("run_dir", metavar="RUN_DIR", nargs="?" if run_optional else None,
                        help="a run directory written by flowforge run")
    parser.add_argument("--no-ema", dest="ema", action="store_false", help="use the raw weights, not the EMA ones")
    parser.add_argument("--checkpoint", help="a checkpoint file (default: the newest in RUN_DIR/checkpoints)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of the run's config.toml, e.g. --set solver.steps=8 (repeatable)")
    parser.add_argument("--device", default="auto", help="auto (a GPU when visible), cpu, cuda, cuda:1, ...")
    parser.add_argument("--batch-size", type=int, default=None, help="examples per solver batch (default: eval.batch_size)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_solver_arguments(parser)
    parser.add_argument("--solver", help="solver plugin (replaces the run's [solver] section)")
    parser.add_argument("--steps", type=int, help="solver steps (solver.steps)")
    parser.add_argument("--method", help="solver method (solver.method), e.g. euler, midpoint, heun, rk4")
    parser.add_argument("--guidance", type=float, default=None,
                        help="classifier-free guidance scale (default: the run's eval.guidance_scale)")
    parser.add_argument("-n", "--num", type=int, default=64, help="number of samples (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise and the labels (default 0)")
    parser.add_argument("--labels", help="class labels, comma-separated, cycled to -n (default: uniform draws)")
    parser.add_argument("--out", help="output file stem (default RUN_DIR/samples/sample-<settings>)")
    parser.add_argument("--npz", action="store_true",
                        help="also write every sample to OUT.npz (images: uint8 arr_0 NHWC and arr_1 labels; else x, y)")
    parser.add_argument("--png-folder", help="also write each image sample as DIR/NNNNNN.png (for folder-based FID tools)")
    parser.add_argument("--grid", type=int, default=None,
                        help="samples shown in the picture (default: 64 for images, up to 20000 points otherwise)")


def main(args: argparse.Namespace) -> int:
    from core.runs import load_run, solver_overrides

    overrides = [*solver_overrides(args.solver, steps=args.steps, method=args.method), *args.overrides]
    run = load_run(args.run_dir, overrides, ema=args.ema, device=args.device, checkpoint=args.checkpoint)
    c = run.components
    if not c.can_generate:
        raise ConfigError(f"{run.run_dir.config}: this experiment has no [solver] and [path]; it cannot generate")
    if args.num < 1:
        raise ConfigError(f"-n expects a positive number of samples, got {args.num}")
    if args.grid is not None and args.grid < 0:
        raise ConfigError(f"--grid expects a number of samples >= 0, got {args.grid}")
    guidance = run.exp.eval.guidance_scale if args.guidance is None else args.guidance
    labels = None
    if args.labels:
        if c.spec.num_classes <= 0:
            raise ConfigError("--labels: this data set has no class labels")
        try:
            given = [int(v) for v in args.labels.split(",") if v.strip()]
        except ValueError:
            raise ConfigError(f"--labels expects comma-separated integers, got {args.labels!r}") from None
        if not given or not all(0 <= v < c.spec.num_classes for v in given):
            raise ConfigError(f"--labels expects class labels in 0..{c.spec.num_classes - 1}, got {args.labels!r}")
        labels = torch.tensor(given).repeat(-(-args.num // len(given)))[: args.num]
    stem = _stem(args, run, guidance)
    batch, nfe, files_written = stream_samples(c, run.model, args, labels, guidance,
                                               args.batch_size or run.exp.eval.batch_size, run.device, stem)
    non_finite = batch.pop("non_finite", 0)
    solver = run.exp.components["solver"]
    files = (list(c.data.render(batch, str(stem))) if len(batch.get("x", ())) else []) + files_written
    info = {"run": str(run.run_dir.root), "step": run.step, "weights": run.weights, "solver": solver,
            "nfe": nfe, "guidance_scale": guidance, "seed": args.seed, "num": args.num, "files": files}
    if non_finite:
        print(f"warning: {non_finite} non-finite values in the samples")
    print(json.dumps(info))
    if not files:
        print(f"note: the data source {run.exp.components['data']['plugin']!r} renders no pictures; use --npz")
    return 0


def _stem(args: argparse.Namespace, run: Any, guidance: float) -> Path:
    solver = run.exp.components["solver"]
    parts = [str(solver["plugin"])]
    if "method" in solver:
        parts.append(str(solver["method"]))
    if "steps" in solver:
        parts.append(f"{solver['steps']}steps")
    tag = "-".join(parts)
    stem = Path(args.out) if args.out else run.run_dir.samples / f"sample-{tag}-w{guidance:g}-seed{args.seed}-{run.weights}"
    if stem.suffix in (".png", ".npz"):
        stem = stem.with_suffix("")
    stem.parent.mkdir(parents=True, exist_ok=True)
    return stem


def is_image(shape: tuple[int, ...], kind: str) -> bool:
    """Examples ``(C, H, W)`` with 1, 3 or 4 channels of continuous values."""
    return kind == "continuous" and len(shape) == 3 and shape[0] in (1, 3, 4)


def to_uint8_nhwc(x: torch.Tensor) -> np.ndarray:
    """``(B, C, H, W)`` in [-1, 1] -> ``(B, H, W, C)`` uint8: ``uint8(clamp((x + 1) * 127.5, 0, 255))``
    (truncation, as guided-diffusion's sample script)."""
    return ((x.float() + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def _npz_members(spec: Any, n: int, conditional: bool) -> dict[str, tuple[Any, tuple[int, ...], int]]:
    if is_image(spec.shape, spec.kind):
        c, h, w = spec.shape
        members = {"arr_0": (np.uint8, (h, w, c), n)}
        return {**members, "arr_1": (np.int64, (), n)} if conditional else members
    dtype = np.float32 if spec.kind == "continuous" else np.int64
    members = {"x": (dtype, tuple(spec.shape), n)}
    return {**members, "y": (np.int64, (), n)} if conditional else members


def stream_samples(c: Any, model: Any, args: argparse.Namespace, labels: torch.Tensor | None, guidance: float,
                   batch_size: int, device: Any, stem: Path) -> tuple[dict[str, torch.Tensor], int, list[str]]:
    """Generate ``args.num`` samples block by block, streaming them to ``--npz`` / ``--png-folder`` as the data
    source's observations (`DataSource.decode`: a latent run writes decoded images, as DiT's sample_ddp.py).

    Returns (the first ``--grid`` samples as a batch, model evaluations per sample, files written).
    """
    from core.collectives import blocks
    from core.data import generator as make_generator
    from core.generate import generate
    from core.npzfile import NpzWriter
    from core.progress import Progress

    spec = c.data.observation_spec  # what the files hold: a latent source's decoded images
    image = is_image(spec.shape, spec.kind)
    keep = args.grid if args.grid is not None else (64 if image else 20000)
    conditional = c.spec.num_classes > 0
    writer = NpzWriter(f"{stem}.npz", _npz_members(spec, args.num, conditional)) if args.npz else None
    folder = Path(args.png_folder) if args.png_folder else None
    if folder is not None:
        if not image:
            raise ConfigError("--png-folder: this data set's samples are not images; use --npz")
        folder.mkdir(parents=True, exist_ok=True)
    kept: dict[str, list[torch.Tensor]] = {}
    all_labels, nfe, non_finite = [], 0, 0
    progress = Progress(args.num, 0, "auto", every=1, label="sample")
    for a, b in blocks(args.num, batch_size):
        block, nfe = generate(c, model, b - a, make_generator(args.seed, "sample-cli", a),
                              labels=None if labels is None else labels[a:b], guidance_scale=guidance,
                              batch_size=batch_size, device=device)
        x = block["x"]
        if x.is_floating_point():
            non_finite += int((~torch.isfinite(x)).sum())
        if a < keep:
            for k, v in block.items():
                kept.setdefault(k, []).append(v[: keep - a])
        if "y" in block:
            all_labels.append(block["y"].cpu())
        if writer is not None or folder is not None:
            seen = c.data.decode(x) if spec is not c.spec else x
            if writer is not None:
                writer.write(*(("arr_0", to_uint8_nhwc(seen)) if image else ("x", seen.cpu().numpy())))
            if folder is not None:
                _write_pngs(folder, a, to_uint8_nhwc(seen))
        progress.update(b)
    progress.close()
    files = []
    if writer is not None:
        if conditional:
            writer.write("arr_1" if image else "y", torch.cat(all_labels).numpy())
        writer.close()
        files.append(f"{stem}.npz")
    if folder is not None:
        files.append(str(folder))
    batch = {k: torch.cat(v) for k, v in kept.items()}
    batch["non_finite"] = non_finite
    return batch, nfe, files


def _write_pngs(folder: Path, start: int, images: np.ndarray) -> None:
    from PIL import Image

    for i, img in enumerate(images):
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(folder / f"{start + i:06d}.png")
