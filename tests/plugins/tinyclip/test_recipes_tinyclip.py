"""Every value of recipe_tinyclip_*.toml against the published value, with its source file and line.

Sources are files of microsoft/Cream (directory TinyCLIP/), read at the repository's
default branch: ``script/manual_weight_inherit_100to75.sh`` (the released manual-inheritance
launch script; the YFCC ViT-39M/16 run uses the same flags), ``src/training/params.py``
(defaults of the flags the script leaves unset), ``src/training/optimizer.py``,
``src/training/train.py``, ``src/training/main.py``, ``src/open_clip/model.py`` and
``src/open_clip/model_configs/TinyCLIP-ViT-39M-16-Text-19M.json``.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

from core.optim import param_groups
from tests.plugins.tinyclip.test_tinyclip import make_clip

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[3]
SCRIPT = "script/manual_weight_inherit_100to75.sh"
JSON = "src/open_clip/model_configs/TinyCLIP-ViT-39M-16-Text-19M.json"

#: (toml key, published value, source file:line, what the source says)
PUBLISHED_39M16 = [
    ("trainer.batch_size", 8192, f"{SCRIPT}:2,12", "GPUS_PER_NODE=8 x --batch-size 1024 (per GPU)"),
    ("trainer.lr", 1e-4, f"{SCRIPT}:21", "--lr 0.0001"),
    ("trainer.warmup_steps", 2000, f"{SCRIPT}:11", "--warmup 2000"),
    ("trainer.grad_clip", 5.0, f"{SCRIPT}:27", "--norm_gradient_clip 5"),
    ("trainer.gradient_checkpointing", True, f"{SCRIPT}:19", "--grad-checkpointing"),
    ("objective.gather", True, f"{SCRIPT}:18", "--local-loss (local rows against the gathered batch)"),
    ("objective.gather_with_grad", True, f"{SCRIPT}:22", "--gather-with-grad"),
    ("objective.teacher_logit_scale", 50.0, f"{SCRIPT}:26 + src/training/train.py:409",
     "--logit-scale 50: teacher_model.logit_scale.fill_(log(50))"),
    ("backbone.fixed_logit_scale", 50.0, f"{SCRIPT}:26 + src/training/train.py:528",
     "--logit-scale 50: model.logit_scale.fill_(log(50)) after every step"),
    ("objective.alpha", 1.0, "src/training/params.py:408", "--distillation-alpha default 1.0"),
    ("objective.weight", 1.0, "src/training/params.py:402", "--distillation-weight default 1.0"),
    ("trainer.betas", [0.9, 0.98], "src/training/params.py:8", "ViT defaults beta1 0.9, beta2 0.98"),
    ("trainer.eps", 1e-6, "src/training/params.py:8", "ViT default eps 1e-6"),
    ("trainer.weight_decay", 0.2, "src/training/params.py:116", "--wd default 0.2"),
    ("trainer.no_decay_ndim", 2, "src/training/optimizer.py:23-24", "exclude: p.ndim < 2 or ..."),
    ("trainer.no_decay_patterns", ["bn", "ln", "bias", "logit_scale"], "src/training/optimizer.py:24",
     '"bn" in n or "ln" in n or "bias" in n or "logit_scale" in n'),
    ("trainer.lr_schedule", "cosine", "src/training/main.py:521", "cosine_lr(optimizer, lr, warmup, total_steps)"),
    ("trainer.min_lr_ratio", 0.0, "src/training/scheduler.py (cosine_lr)", "0.5 (1 + cos(pi e / es)) base_lr: to 0"),
    ("trainer.ema_decay", 0.0, "src/training/train.py", "no EMA anywhere in the training loop"),
    ("backbone.embed_dim", 512, f"{JSON}:2", '"embed_dim": 512'),
    ("data.image_size", 224, f"{JSON}:4", '"image_size": 224'),
    ("backbone.vision_depth", 12, f"{JSON}:5", '"layers": 12'),
    ("backbone.vision_width", 512, f"{JSON}:6", '"width": 512'),
    ("backbone.patch_size", 16, f"{JSON}:7", '"patch_size": 16'),
    ("backbone.vision_heads", 8, "src/open_clip/model.py:574,624", "heads = width // head_width (64)"),
    ("data.context_length", 77, f"{JSON}:10", '"context_length": 77'),
    ("backbone.text_width", 512, f"{JSON}:12", '"width": 512'),
    ("backbone.text_heads", 8, f"{JSON}:13", '"heads": 8'),
    ("backbone.text_depth", 6, f"{JSON}:14", '"layers": 6'),
    ("backbone.activation", "gelu", "src/open_clip/model.py:214", "act_layer = nn.GELU (no quick_gelu in the JSON)"),
]


def _value(config: dict, key: str):
    section, name = key.split(".")
    return config[section][name]


@pytest.fixture(scope="module")
def recipe() -> dict:
    with (ROOT / "experiments" / "recipe_tinyclip_39m16_yfcc.toml").open("rb") as fh:
        raw = tomllib.load(fh)
    raw["backbone"].setdefault("activation", "gelu")  # the backbone's default
    raw["trainer"].setdefault("min_lr_ratio", 0.0)
    return raw


@pytest.mark.parametrize("key, published, source, says", PUBLISHED_39M16, ids=[k for k, *_ in PUBLISHED_39M16])
def test_recipe_value_matches_the_published_one(recipe, key, published, source, says):
    value = _value(recipe, key)
    if isinstance(published, float):
        assert math.isclose(value, published, rel_tol=1e-12), (key, value, source, says)
    else:
        assert value == published, (key, value, source, says)


def test_recipe_exclusion_equals_tinyclips_rule_on_a_clip(recipe):
    """The recipe's two options select the same parameters as TinyCLIP's exclude(n, p)."""
    t = recipe["trainer"]
    model = make_clip()
    groups = param_groups(model, t["weight_decay"], t["no_decay_ndim"], t["no_decay_patterns"])
    excluded = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    rule = {id(p) for n, p in model.named_parameters()
            if p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n}
    assert excluded == rule
