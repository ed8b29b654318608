"""``flowforge eval --input1 A --input2 B``: score a set of images against another, like ``fidelity --input1
--input2`` and pytorch-fid.

Each input is a folder of PNG images (sorted by file name), an ``.npz`` archive in the ADM evaluator's
layout (``arr_0``: uint8 ``(N, H, W, C)``, what ``flowforge sample --npz`` writes), or, for ``--input2``,
a run directory: its ``-n`` held-out examples (default: as many as ``--input1`` has) of the global
reference selection that evaluation uses (seed ``--seed``, default the run's), quantised to uint8 the
way ``flowforge sample`` writes images. Images are mapped to ``u / 127.5 - 1`` in [-1, 1], channels first.

The feature metrics named with ``--metric`` (e.g. ``frechet_distance``, ``kid``, ``precision_recall``)
use the extractor ``--features`` (e.g. ``inception`` from a local weights file) unless their
table names their own; both are required (core names no plugin). Under ``torchrun`` every rank extracts the features of its blocks of images and
the features are gathered in global order, so the numbers do not depend on the number of processes;
the reference statistics are read from and written to the cache (``--cache DIR``, default
``$FLOWFORGE_CACHE``, else ``~/.cache/flowforge``), keyed by the reference images' fingerprint and the
extractor's identity. Rank 0 prints one JSON line (and writes it to ``OUT/eval-inputs.json`` with ``--out``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from registry import ConfigError

IMAGE_SUFFIXES = (".png",)
LAYOUT = "a folder of PNG images, an .npz archive with a uint8 arr_0 (N, H, W, C), or (--input2) a run directory"


def add_input_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input1", metavar="PATH", help="score these images (PNG folder or ADM-layout .npz) "
                                                         "instead of a run's samples")
    parser.add_argument("--input2", metavar="PATH", help="against these: PNG folder, .npz, or a run directory "
                                                         "(its held-out data)")
    parser.add_argument("--features", metavar="PLUGIN|{TOML}",
                        help="feature extractor for --input1/--input2 (required with them): a feature_extractor "
                             "plugin name (flowforge plugins lists them) or '{plugin = \"NAME\", weights = \"w.pth\"}'")
    parser.add_argument("--cache", metavar="DIR", help="with --input1/--input2: the reference-statistics cache folder "
                                                       "(default $FLOWFORGE_CACHE, else ~/.cache/flowforge)")
    parser.add_argument("--no-cache", dest="use_cache", action="store_false",
                        help="with --input1/--input2: neither read nor write cached reference statistics")


def _folder(path: Path, where: str) -> np.ndarray:
    from PIL import Image

    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ConfigError(f"{where}: {path} holds no PNG images; expected {LAYOUT}")
    images = []
    for f in files:
        with Image.open(f) as img:
            arr = np.asarray(img.convert("L" if img.mode in ("L", "I;16", "1") else "RGB"))
        images.append(arr[..., None] if arr.ndim == 2 else arr)
    shapes = {a.shape for a in images}
    if len(shapes) > 1:
        raise ConfigError(f"{where}: the images of {path} differ in size or channels: {sorted(shapes)[:3]}")
    return np.stack(images)


def _npz(path: Path, where: str) -> np.ndarray:
    from core.npzfile import read_npz

    arr = read_npz(path, ["arr_0"], set(), mmap=True, where=(where,), layout=LAYOUT)["arr_0"]
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] not in (1, 3):
        raise ConfigError(f"{where}: arr_0 of {path} is {arr.dtype} {tuple(arr.shape)}; expected uint8 (N, H, W, C) "
                          f"with C = 1 or 3 (the ADM evaluator's layout)")
    return arr


def read_images(text: str, where: str) -> np.ndarray:
    """uint8 images ``(N, H, W, C)`` from a PNG folder or an ADM-layout .npz; ConfigError naming `where`."""
    path = Path(text).expanduser()
    if path.is_dir():
        return _folder(path, where)
    if path.is_file() and path.suffix == ".npz":
        return _npz(path, where)
    what = "no such file or folder" if not path.exists() else "not a folder or an .npz file"
    raise ConfigError(f"{where} {text!r}: {what}; expected {LAYOUT}")


def run_reference(root: Path, n: int, seed: int | None, batch_size: int) -> tuple[np.ndarray, Any]:
    """(uint8 images of the run's reference selection ``(n, H, W, C)``, the run's data source)."""
    import registry
    from core.collectives import Group
    from core.generate import reference_examples
    from core.runs import load_experiment

    from .sample import is_image, to_uint8_nhwc

    exp = load_experiment(root)
    data = registry.build("data", exp.components["data"])
    if not is_image(tuple(data.spec.shape), data.spec.kind) or data.spec.shape[0] not in (1, 3):
        raise ConfigError(f"--input2 {str(root)!r}: the run's examples are not grey or RGB images "
                          f"({data.spec.kind} {tuple(data.spec.shape)}); score them with flowforge eval RUN_DIR")
    group = Group()
    x = reference_examples(data, n, exp.experiment.seed if seed is None else seed, batch_size=batch_size,
                           rank=group.rank, world_size=group.world_size)
    return to_uint8_nhwc(x), data


def to_float(images: np.ndarray) -> torch.Tensor:
    """uint8 ``(N, H, W, C)`` -> float32 ``(N, C, H, W)`` in [-1, 1]: ``u / 127.5 - 1``."""
    return torch.from_numpy(np.array(images, dtype=np.uint8)).permute(0, 3, 1, 2).float() / 127.5 - 1


def sharded_features(extractor: Any, images: np.ndarray, batch_size: int) -> torch.Tensor:
    """Features ``(N, F)`` of every image: each rank extracts its blocks, gathered in global order."""
    from core.collectives import Group, blocks

    group = Group()
    mine = [extractor(to_float(images[a:b])).double().cpu() for a, b in blocks(len(images), batch_size, group.rank,
                                                                                  group.world_size)]
    return group.gather_cat(torch.cat(mine) if mine else torch.empty(0, dtype=torch.float64))


def _build_metrics(args: argparse.Namespace, spec: Any, data: Any) -> dict[str, Any]:
    import registry
    from core.generate import metric_names

    from .eval import _parse_metric

    for flag, given, kind in (("--features", args.features, "feature_extractor"), ("--metric", args.metric, "metric")):
        if not given:
            raise ConfigError(f"--input1/--input2 need {flag} (installed: {', '.join(registry.available(kind))})")
    entries = [_parse_metric(m) for m in args.metric]
    extractor_entry = _parse_metric(args.features)
    try:
        extractor = registry.build("feature_extractor", extractor_entry, spec=spec, data=data)
    except ConfigError as exc:
        raise exc.within("--features") from None
    metrics = {}
    for index, (name, entry) in enumerate(zip(metric_names(entries), entries)):
        entry = {**entry, **({"cache_dir": args.cache} if args.cache and "cache_dir" not in entry else {}),
                 **({} if args.use_cache else {"cache_reference": False})}
        try:
            metric = registry.build("metric", entry, spec=spec, data=data, feature_extractor=extractor)
        except ConfigError as exc:
            raise exc.within(f"--metric[{index}]") from None
        if not hasattr(metric, "add_generated_features"):
            raise ConfigError(f"--metric[{index}] {entry['plugin']!r} is not a feature metric (it takes no "
                              f"features); --input1/--input2 score feature metrics only")
        metrics[name] = metric
    return metrics


def _score(metrics: dict[str, Any], first: np.ndarray, second: np.ndarray, batch_size: int) -> dict[str, float]:
    """Every metric of `first` (generated) against `second` (reference), on rank 0; {} on the other ranks."""
    from core.collectives import Group, local_metrics, sync_allowed
    from core.generate import _to_floats

    group = Group()
    features: dict[tuple[int, str], torch.Tensor] = {}

    def of(extractor: Any, images: np.ndarray, tag: str) -> torch.Tensor:
        key = (id(extractor), tag)
        if key not in features:
            features[key] = sharded_features(extractor, images, batch_size)
        return features[key]

    keys = {name: m.reference_key(second) for name, m in metrics.items()} if group.is_main else {}
    hits = group.broadcast({name: keys[name] is not None and m.add_cached_reference(keys[name])
                            for name, m in metrics.items()} if group.is_main else None)
    out: dict[str, float] = {}
    for name, m in metrics.items():
        fake = of(m.extractor, first, "1")
        real = None if hits[name] else of(m.extractor, second, "2")
        if group.is_main:
            m.add_generated_features(fake)
            if real is not None:
                m.reference_extractions += 1
                m.add_reference_features(real, keys.get(name))
            m.distributed_available_fn = sync_allowed
            with local_metrics():  # every feature is here already: no torchmetrics synchronisation
                out.update(_to_floats(name, m.compute()))
    return out


def score_inputs(args: argparse.Namespace) -> int:
    """The ``--input1 A --input2 B`` mode of ``flowforge eval`` (see the module docstring)."""
    from accelerate import PartialState

    from core.collectives import close_process_group

    if not args.input1 or not args.input2:
        raise ConfigError("--input1 and --input2 go together: give both (or neither, to evaluate RUN_DIR)")
    batch_size = args.batch_size or 256
    PartialState()  # joins the torchrun process group, if any
    try:
        return _score_inputs(args, batch_size)
    finally:
        close_process_group()


def _score_inputs(args: argparse.Namespace, batch_size: int) -> int:
    from core.collectives import Group
    from core.interfaces import DataSpec

    first = read_images(args.input1, "--input1")
    root = Path(args.input2).expanduser()
    data = None
    if root.is_dir() and (root / "config.toml").is_file():
        second, data = run_reference(root, args.num_samples or len(first), args.seed, batch_size)
    else:
        second = read_images(args.input2, "--input2")
    if first.shape[1:] != second.shape[1:]:
        raise ConfigError(f"--input1 images are {first.shape[1:]} (H, W, C), --input2 images {second.shape[1:]}; "
                          f"they must match")
    h, w, c = first.shape[1:]
    metrics = _build_metrics(args, DataSpec(shape=(c, h, w)) if data is None else data.spec, data)
    results = _score(metrics, first, second, batch_size)
    if Group().is_main:
        line = json.dumps({"input1": args.input1, "input2": args.input2, "n1": len(first), "n2": len(second),
                           "metrics": results, "reference_from_cache": {k: m.reference_extractions == 0
                                                                        for k, m in metrics.items()}})
        print(line)
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "eval-inputs.json").write_text(line + "\n")
    return 0
