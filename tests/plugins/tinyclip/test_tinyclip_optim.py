"""Weight-decay exclusion (core.optim, trainer.no_decay_*) and TinyCLIP's fixed student logit scale."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

import registry
from core import checkpoint as ckpt
from core.config import TrainerConfig
from core.optim import param_groups, scheduled_lr
from core.run import run
from registry import ConfigError
from tests.plugins.tinyclip.test_tinyclip import make_clip

ROOT = Path(__file__).resolve().parents[3]


def open_clip_exclude(name: str, p: torch.Tensor) -> bool:
    """open_clip / TinyCLIP's rule (src/training/optimizer.py: ``exclude``), restated."""
    return p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name


def test_ndim_rule_matches_open_clip_on_a_clip():
    model = make_clip()
    groups = param_groups(model, 0.2, no_decay_ndim=2, no_decay_patterns=["bias", "ln", "logit_scale"])
    by_id = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    names = dict(model.named_parameters())
    assert len(by_id) == len(names)
    for name, p in names.items():
        assert by_id[id(p)] == (0.0 if open_clip_exclude(name, p) else 0.2), name
    # in this model every excluded tensor has ndim < 2, except none: the rank rule alone already agrees
    alone = param_groups(model, 0.2, no_decay_ndim=2)
    assert {id(p) for g in alone if g["weight_decay"] == 0 for p in g["params"]} == \
        {id(p) for n, p in names.items() if open_clip_exclude(n, p)}


def test_patterns_exclude_by_name_and_default_is_one_group():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    assert [len(g["params"]) for g in param_groups(model, 0.1)] == [6]
    groups = param_groups(model, 0.1, no_decay_patterns=[r"^2\."])
    decay, no_decay = groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in no_decay["params"]} == {id(p) for p in model[2].parameters()}
    frozen = nn.Linear(2, 2).requires_grad_(False)
    assert param_groups(frozen, 0.1) == []


def test_declared_groups_get_a_fixed_learning_rate():
    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(2, 2)
            self.mask_loga = nn.Parameter(torch.zeros(2))

        def optimizer_groups(self):
            return [("mask_", {"lr": 0.02})]

    model = Masked()
    groups = param_groups(model, 0.1, no_decay_ndim=2)
    fixed = [g for g in groups if "fixed_lr" in g]
    assert len(fixed) == 1 and fixed[0]["params"] == [model.mask_loga] and fixed[0]["weight_decay"] == 0.0
    assert scheduled_lr(fixed[0], 1e-4) == 0.02 and scheduled_lr(groups[0], 1e-4) == 1e-4


def test_adamw_with_the_groups_leaves_excluded_parameters_undecayed():
    """With zero gradients, AdamW changes a parameter only by decay: p <- p (1 - lr wd)."""
    model = make_clip()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt = torch.optim.AdamW(param_groups(model, 0.5, no_decay_ndim=2), lr=0.1)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for name, p in model.named_parameters():
        expected = before[name] if p.ndim < 2 else before[name] * (1 - 0.1 * 0.5)
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-7, msg=name)


@pytest.mark.parametrize("key, value", [("no_decay_ndim", -1), ("no_decay_patterns", ["(unclosed"])])
def test_bad_options_name_the_key(key, value):
    with pytest.raises(ConfigError) as info:
        TrainerConfig(**{key: value})
    assert key in str(info.value)


def test_fixed_logit_scale_stays_fixed_through_training_and_inheritance(tmp_path):
    over = ["trainer.steps=4", "trainer.log_every=2", "trainer.warmup_steps=0", "data.train_size=64",
            "data.held_out_size=32", "trainer.batch_size=16", "backbone.fixed_logit_scale=50",
            "trainer.no_decay_ndim=2", "metrics=[]"]
    summary = run(ROOT / "experiments" / "tinyclip_teacher.toml", over, out=tmp_path / "t")
    assert summary["steps"] == 4
    state = ckpt.load(ckpt.latest(tmp_path / "t" / "checkpoints"))
    for weights in (state["model"], state["ema"]):
        assert torch.equal(weights["logit_scale"], torch.tensor(math.log(50)))  # exactly log(50) in float32
    data = registry.build("data", {"plugin": "clip_shapes", "train_size": 8, "held_out_size": 8})
    student = registry.build("backbone", {"plugin": "clip", "width": 32, "depth": 1, "heads": 1, "embed_dim": 64,
                                          "inherit_from": str(tmp_path / "t"), "fixed_logit_scale": 30.0},
                             spec=data.spec)
    assert student.scale().item() == pytest.approx(30.0) and not student.logit_scale.requires_grad
    with pytest.raises(ConfigError, match="fixed_logit_scale"):
        registry.build("backbone", {"plugin": "clip", "fixed_logit_scale": 200.0}, spec=data.spec)
