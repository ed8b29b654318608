"""The reproduction recipes (experiments/recipe_*.toml): each parses, documents itself, builds its
published architecture, and runs its smoke mode on tiny synthetic data of the right shape.

The smoke overrides are read from each recipe's own header (the ``--set`` arguments after
"Smoke mode"), so the documented command is the tested one. Its placeholder paths are
replaced by the files this module writes:

=========================  ==========================================================
placeholder                written here
=========================  ==========================================================
``/tmp/tiny-cifar``        a CIFAR-10 python-format folder (`write_cifar10`)
``/tmp/tiny-imagenet``     an image folder of 3 classes x 6 RGB images (`write_imagefolder`)
``/tmp/tiny-vae``          a tiny random RGB AutoencoderKL folder (`save_tiny_vae`; 2x downsampling)
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

import attrs
import numpy as np
import pytest
import torch

import registry
from core.config import load
from core.run import run
from core.testing.files import write_cifar10, write_imagefolder

from ..conftest import ROOT
from ..latent_fixtures import save_tiny_vae

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
    images = write_imagefolder(root / "imagenet")
    vae = save_tiny_vae(root / "vae", in_channels=3, out_channels=3)
    pairs = write_pairs(root / "pairs")
    teacher = write_teacher(pairs, root / "teacher")
    return {"/tmp/tiny-cifar": str(cifar), "/tmp/tiny-imagenet": str(images), "/tmp/tiny-vae": str(vae),
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
    sets = [o for o in smoke_overrides(recipe, tiny) if o.split("=")[0].startswith(("data.", "autoencoder."))]
    # a latent recipe: 64x64 tiny images through the tiny VAE give the published latent shape (4, 32, 32)
    exp = load(recipe, [o.replace("resolution=32", "resolution=64") for o in sets])
    built = {"autoencoder": registry.build("autoencoder", exp.components["autoencoder"])} if "autoencoder" in exp.components else {}
    data = registry.build("data", exp.components["data"], **built)
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


# Meta's flow_matching CIFAR-10 recipes, every value against the example's source. Sources are files of
# facebookresearch/flow_matching under examples/image/ (read at commit 11568d37, 2026-01-05):
# README.md (the published commands, lines 52 and 55), train_arg_parser.py (flag defaults), train.py,
# submitit_train.py, models/ema.py, models/model_configs.py, training/train_loop.py, training/eval_loop.py and
# training/edm_time_discretization.py. "fm": recipe_cifar10_fm.toml, "dfm": recipe_cifar10_dfm.toml.
_UNET_FM, _UNET_DFM = "models/model_configs.py:47-66", "models/model_configs.py:67-86"

#: (recipe, key of the resolved config, published value, source file:line, what the source says)
PUBLISHED_META = [
    ("fm", "trainer.batch_size", 512, "README.md:52 + submitit_train.py:34", "--batch_size=64 per GPU x --ngpus 8"),
    ("dfm", "trainer.batch_size", 256, "README.md:55 + submitit_train.py:34", "--batch_size=32 per GPU x --ngpus 8"),
    ("fm", "trainer.epochs", 3000, "README.md:52", "--epochs=3000"),
    ("dfm", "trainer.steps", 588000, "README.md:55", "--epochs=3000 of 50,000 / 256 = 196 steps"),
    *[(r, "trainer.lr", 1e-4, "train_arg_parser.py:36", "--lr default 0.0001") for r in ("fm", "dfm")],
    *[(r, "trainer.betas", [0.9, 0.95], "train_arg_parser.py:43", "--optimizer_betas default [0.9, 0.95]")
      for r in ("fm", "dfm")],
    *[(r, "trainer.weight_decay", 0.01, "train.py:119-121", "torch.optim.AdamW without weight_decay: 0.01")
      for r in ("fm", "dfm")],
    *[(r, "trainer.eps", 1e-8, "train.py:119-121", "torch.optim.AdamW without eps: 1e-8") for r in ("fm", "dfm")],
    *[(r, "trainer.lr_schedule", "constant", "train.py:130-131", "no --decay_lr: ConstantLR(factor=1.0)")
      for r in ("fm", "dfm")],
    *[(r, "trainer.ema_decay", 0.999, "models/ema.py:16 + models/model_configs.py:110",
       "EMA(model=model): decay default 0.999") for r in ("fm", "dfm")],
    *[(r, "trainer.ema_warmup", "meta", "models/ema.py:51-53",
       "num_updates += 1; decay = min(self.decay, (1 + num_updates) / (10 + num_updates))") for r in ("fm", "dfm")],
    *[(r, "eval.use_ema", True, f"README.md:{line}", "--use_ema") for r, line in (("fm", 52), ("dfm", 55))],
    ("fm", "trainer.precision", "fp16", "training/train_loop.py:100", "torch.cuda.amp.autocast() around the loss"),
    ("dfm", "trainer.precision", "fp32", "training/train_loop.py:73-87", "no autocast in the discrete branch"),
    ("fm", "data.conditional", False, "README.md:52", "--class_drop_prob=1.0: never a label"),
    ("dfm", "data.data.conditional", False, "README.md:55", "--class_drop_prob=1.0: never a label"),
    ("fm", "data.flip", True, "training/data_transform.py:13", "RandomHorizontalFlip()"),
    ("dfm", "data.data.flip", True, "training/data_transform.py:13", "RandomHorizontalFlip()"),
    ("fm", "objective.time_sampler", "log_normal", "README.md:52 + training/train_loop.py:26-31",
     "--skewed_timesteps: sigma = exp(N(P_mean, P_std)), t = 1 / (1 + sigma)"),
    ("fm", "objective.p_mean", -1.2, "training/train_loop.py:27", "P_mean = -1.2"),
    ("fm", "objective.p_std", 1.2, "training/train_loop.py:28", "P_std = 1.2"),
    ("fm", "scheduler.plugin", "cond_ot", "training/train_loop.py:56", "path = CondOTProbPath()"),
    ("fm", "objective.prediction", "velocity", "training/train_loop.py:98-101", "loss = (model(x_t, t) - dx_t)^2"),
    ("fm", "solver.method", "heun", "README.md:52", "--ode_method heun2"),
    ("fm", "solver.steps", 50, "README.md:52", "--ode_options '{\"nfe\": 50}': 50 grid intervals"),
    ("fm", "solver.grid", "edm", "README.md:52 + training/eval_loop.py:151-152", "--edm_schedule"),
    ("fm", "solver.sigma_min", 0.002, "training/edm_time_discretization.py:12", "sigma_min = 0.002"),
    ("fm", "solver.sigma_max", 80.0, "training/edm_time_discretization.py:13", "sigma_max = 80.0"),
    ("fm", "solver.rho", 7.0, "training/edm_time_discretization.py:10", "rho=7"),
    ("fm", "solver.t0", 1 / 81, "training/edm_time_discretization.py:19-20", "t = 1 - sigma / (1 + sigma) at 80"),
    *[("fm", f"backbone.{k}", v, _UNET_FM, f'"{k}": {v}') for k, v in (
        ("model_channels", 128), ("num_res_blocks", 4), ("attention_resolutions", [2]), ("dropout", 0.3),
        ("channel_mult", [2, 2, 2]), ("conv_resample", False), ("num_heads", 1), ("num_head_channels", -1),
        ("use_scale_shift_norm", True), ("resblock_updown", False))],
    *[("dfm", f"backbone.{k}", v, _UNET_DFM, f'"{k}": {v}') for k, v in (
        ("model_channels", 96), ("num_res_blocks", 5), ("attention_resolutions", [2]), ("dropout", 0.4),
        ("channel_mult", [3, 4, 4]), ("conv_resample", False), ("num_heads", -1), ("num_head_channels", 64),
        ("use_scale_shift_norm", True), ("resblock_updown", False))],
    ("dfm", "scheduler.n", 3.0, "training/train_loop.py:53", "PolynomialConvexScheduler(n=3.0)"),
    ("dfm", "path.source", "mask", "training/train_loop.py:22,78-80", "x_0 = MASK_TOKEN (256) everywhere"),
    ("dfm", "objective.loss", "cross_entropy", "training/train_loop.py:85-87", "cross_entropy(logits, samples)"),
    ("dfm", "objective.t_max", 1.0, "training/train_loop.py:75", "t = torch.rand(B): U(0, 1)"),
    ("dfm", "solver.steps", 1024, "train_arg_parser.py:201", "--discrete_fm_steps default 1024"),
    ("dfm", "solver.div_free", "sym", "README.md:55 + training/eval_loop.py:129-130", "--sym_func"),
    ("dfm", "solver.sym_scale", 12.0, "training/eval_loop.py:130", "12.0 * t^2.0 * (1 - t)^0.25"),
    ("dfm", "solver.sym_t_power", 2.0, "training/eval_loop.py:130", "12.0 * t^2.0 * (1 - t)^0.25"),
    ("dfm", "solver.sym_one_minus_t_power", 0.25, "training/eval_loop.py:130", "12.0 * t^2.0 * (1 - t)^0.25"),
    ("dfm", "solver.categorical_dtype", "float32", "train_arg_parser.py:124", "--sampling_dtype default float32"),
]


def _resolved(recipe: str) -> dict:
    """The recipe's config with every default filled in (presets included), as nested mappings."""
    exp = load(ROOT / "experiments" / f"recipe_cifar10_{recipe}.toml")
    return {**exp.components, "trainer": attrs.asdict(exp.trainer), "eval": attrs.asdict(exp.eval)}


@pytest.mark.parametrize("recipe, key, published, source, says", PUBLISHED_META,
                         ids=[f"{r}-{k}" for r, k, *_ in PUBLISHED_META])
def test_meta_recipe_value_matches_the_published_one(recipe, key, published, source, says):
    value = _resolved(recipe)
    for part in key.split("."):
        value = value[part]
    value = list(value) if isinstance(value, tuple) else value
    if isinstance(published, float):
        assert math.isclose(value, published, rel_tol=1e-12), (recipe, key, value, source, says)
    else:
        assert value == published, (recipe, key, value, source, says)


def test_meta_ema_warmup_is_the_examples_rule():
    """models/ema.py:50-57 written out: n-th update rate min(0.999, (1 + n) / (10 + n)); the trainer's EMA follows it."""
    from core.ema import EMA, Warmup

    model = torch.nn.Linear(3, 1, bias=False)
    ema = EMA(model, 0.999, Warmup("meta"))
    shadow = model.weight.detach().clone()
    for n in range(1, 2001):
        with torch.no_grad():
            model.weight.add_(torch.randn_like(model.weight))
        ema.update(model, step=n - 1)
        decay = min(0.999, (1 + n) / (10 + n))
        shadow -= (1 - decay) * (shadow - model.weight.detach())
    torch.testing.assert_close(ema.model.weight, shadow)
