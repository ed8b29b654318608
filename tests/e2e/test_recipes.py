"""The reproduction recipes (experiments/recipe_*.toml): each parses, documents itself, builds its
published architecture, and runs its smoke mode on tiny synthetic data of the right shape.

The smoke overrides are read from each recipe's own header (the ``--set`` arguments after
"Smoke mode"), so the documented command is the tested one. Its placeholder paths are
replaced by the files this module writes:

=========================  ==========================================================
placeholder                written here
=========================  ==========================================================
``/tmp/tiny-cifar``        a CIFAR-10 python-format folder (`write_cifar10`)
``/tmp/tiny-latents.npz``  latents ``x (24, 4, 32, 32)``, labels ``y`` (`write_npz`)
``/tmp/tiny-pairs.csv``    8 images with captions and labels (cat / dog)
``/tmp/tiny-teacher``      a tiny CLIP for that CSV, as a Hugging Face directory
=========================  ==========================================================
"""

from __future__ import annotations

import csv
import json
import math
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch

import registry
from core.config import load
from core.run import run
from core.testing.files import write_cifar10, write_npz

from ..conftest import ROOT

RECIPES = sorted((ROOT / "experiments").glob("recipe_*.toml"))
HEADER_KEYS = ("Published result", "Hardware", "Launch", "Expected wall time", "Smoke mode")

#: Published parameter counts of the recipes' backbones (millions), checked within 3%.
PARAMS_M = {
    "recipe_imagenet256_dit_xl2.toml": 675.0,   # DiT-XL/2 (paper, Table 4: 675M)
}


def header(recipe: Path) -> list[str]:
    """The comment lines at the top of a recipe, without the leading '#'."""
    lines = []
    for line in recipe.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[1:].strip())
    return lines


def smoke_overrides(recipe: Path, paths: dict[str, str]) -> list[str]:
    """The ``--set`` values of the header's smoke-mode command, placeholders replaced by `paths`."""
    lines = header(recipe)
    start = next(i for i, line in enumerate(lines) if line.startswith("Smoke mode"))
    command = " ".join(line.rstrip("\\").strip() for line in lines[start + 1:])
    tokens = shlex.split(command)
    values = [tokens[i + 1] for i, tok in enumerate(tokens[:-1]) if tok == "--set"]
    for placeholder, path in paths.items():
        values = [v.replace(placeholder, path) for v in values]
    return values


def write_pairs(root: Path, n: int = 8) -> Path:
    """A caption CSV (filepath, caption, label) of `n` small PNG images, alternately cat and dog."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for k in range(n):
        name = ("cat", "dog")[k % 2]
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(root / f"{k}.png")
        rows.append({"filepath": f"{k}.png", "caption": f"a photo of a {name}.", "label": name})
    path = root / "pairs.csv"
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["filepath", "caption", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_teacher(pairs: Path, directory: Path) -> Path:
    """A tiny random CLIP over the vocabulary of `pairs`, saved as a Hugging Face CLIP directory."""
    from plugins.tinyclip.hf import save_hf_clip

    data = registry.build("data", {"plugin": "clip_pairs", "train": str(pairs), "image_size": 16,
                                   "label_key": "label", "class_names": ["cat", "dog"],
                                   "templates": ["a photo of a {}."]})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = registry.build("backbone", {"plugin": "clip", "embed_dim": 16, "width": 32, "depth": 2, "heads": 2,
                                            "patch_size": 8}, spec=data.spec)
    return save_hf_clip(model, directory)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, str]:
    """Placeholder -> path of the tiny data every smoke mode reads."""
    root = tmp_path_factory.mktemp("recipe-data")
    cifar = write_cifar10(root / "cifar", per_batch=8)
    latents = write_npz(root / "latents.npz", n=24, shape=(4, 32, 32), classes=6)
    pairs = write_pairs(root / "pairs")
    teacher = write_teacher(pairs, root / "teacher")
    return {"/tmp/tiny-cifar": str(cifar), "/tmp/tiny-latents.npz": str(latents),
            "/tmp/tiny-pairs.csv": str(pairs), "/tmp/tiny-teacher": str(teacher)}


def test_recipes_exist():
    names = {r.name for r in RECIPES}
    assert {"recipe_cifar10_fm.toml", "recipe_cifar10_dfm.toml", "recipe_cifar10_iddpm.toml",
            "recipe_imagenet256_dit_xl2.toml", "recipe_tinyclip_39m16_yfcc.toml"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_parses_and_documents_itself(recipe):
    exp = load(recipe)  # the published settings, every plugin and option valid
    text = "\n".join(header(recipe))
    for key in HEADER_KEYS:
        assert key in text, f"{recipe.name}: the header has no '{key}' line"
    assert f"python -m core.run experiments/{recipe.name} --set launcher.num_processes=8" in text
    assert exp.components["launcher"]["plugin"] == "accelerate"
    assert exp.components["launcher"]["num_processes"] == 1  # the GPU count comes from the command line


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_builds_published_backbone(recipe, tiny):
    """The published architecture builds (on the meta device: shapes only) for data of the real shape."""
    exp = load(recipe, [o for o in smoke_overrides(recipe, tiny) if o.split("=")[0].startswith("data.")])
    data = registry.build("data", exp.components["data"])
    backbone = dict(exp.section("backbone"))
    if backbone["plugin"] == "clip":  # the published student, at the published image size; no teacher here
        backbone["inherit_from"] = ""
        spec = data.spec
        data.spec = type(spec)(shape=(3, 224, 224), kind=spec.kind, num_classes=spec.num_classes,
                               vocab_size=spec.vocab_size, extra=spec.extra)
    with torch.device("meta"):
        model = registry.build("backbone", backbone, spec=data.spec)
    millions = sum(p.numel() for p in model.parameters()) / 1e6
    expected = PARAMS_M.get(recipe.name)
    if expected is not None:
        assert abs(millions - expected) / expected < 0.03, f"{recipe.name}: {millions:.1f}M parameters"
    if backbone["plugin"] == "clip":  # TinyCLIP's names count the towers: ViT-39M, Text-19M (without embeddings)
        vision = sum(p.numel() for p in model.visual.parameters()) / 1e6
        text = sum(p.numel() for n, p in model.text.named_parameters() if "embedding" not in n) / 1e6
        assert abs(vision - 39) < 1.2 and abs(text - 19) < 1.0, (vision, text)
    assert millions > 10


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_smoke_mode_runs(recipe, tiny, tmp_path):
    out = tmp_path / "run"
    summary = run(recipe, [*smoke_overrides(recipe, tiny), "trainer.progress=off"], out=out)
    written = json.loads((out / "summary.json").read_text())
    assert written["steps"] == summary["steps"] == 2
    assert (out / "config.toml").is_file() and (out / "metrics.jsonl").is_file()
    assert any((out / "checkpoints").glob("step-*.pt"))
    assert written["metrics"] and all(math.isfinite(v) for v in written["metrics"].values())
    assert math.isfinite(written["final_loss"])
    if load(recipe).section("solver") is not None:
        assert written["samples"] and all(Path(p).is_file() for p in written["samples"])
