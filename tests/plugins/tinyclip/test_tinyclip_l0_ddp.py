"""The L0 stage of automatic inheritance (clip_l0 + tinyclip_l0) on 2 gloo processes equals 1 process.

Three trainer steps with the same global batch, through the ``accelerate`` launcher: the masks'
``log_alpha``, the Lagrange multipliers and every other weight must agree to ~1e-5. That needs one
mask sample per step shared by the ranks (`plugins.tinyclip.autoinherit.step_seed`), the mask and
multiplier gradients averaged by DistributedDataParallel (each rank adds the same penalty) and the
``log_alpha`` clamp after every update (`MaskedCLIP.after_optimizer_step`). With a step's seed,
cached accumulation replays the very masks of its cache: its gradients equal one pass's.
"""

from __future__ import annotations

import math

import pytest
import tomli_w
import torch

import registry
from core import checkpoint as ckpt
from core import rng
from plugins.tinyclip.prune import save_student

BACKBONE = {"width": 32, "depth": 2, "heads": 2, "embed_dim": 16, "patch_size": 4}
DATA = {"plugin": "clip_shapes", "image_size": 8, "train_size": 64, "held_out_size": 16}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from core.run import run

    folder = tmp_path_factory.mktemp("l0ddp")
    data = registry.build("data", DATA)
    torch.manual_seed(0)
    save_student(registry.build("backbone", {"plugin": "clip", **BACKBONE}, spec=data.spec), folder / "teacher")
    teacher = str(folder / "teacher")
    experiment = {
        "experiment": {"name": "l0-ddp", "seed": 3},
        "data": DATA,
        "backbone": {"plugin": "clip_l0", **BACKBONE, "inherit_from": teacher, "inherit_weights": "model",
                     "target_sparsity": 0.5, "mask_lr": 0.3, "lambda_init": 1.0},
        "objective": {"plugin": "tinyclip_l0", "teacher": teacher, "teacher_weights": "model", "alpha": 0.5},
        "trainer": {"steps": 3, "batch_size": 16, "lr": 1e-3, "warmup_steps": 0, "log_every": 1,
                    "ema_decay": 0.0, "grad_clip": 0.0},
        "eval": {"untrained": False},
    }
    (folder / "l0.toml").write_text(tomli_w.dumps(experiment))
    run(folder / "l0.toml", out=folder / "one")
    run(folder / "l0.toml", ["launcher={plugin='accelerate', num_processes=2}"], out=folder / "two")
    return {n: ckpt.load(ckpt.latest(folder / n / "checkpoints"))["model"] for n in ("one", "two")}


def _without_key_bias(key: str, value: torch.Tensor) -> torch.Tensor:
    """`value`, less the key third of a fused qkv bias: softmax over keys ignores a bias added to every key
    (``q.(k_j + b) = q.k_j + q.b`` for all j), so its gradient is 0 up to rounding, which AdamW scales up
    to whole steps of either sign; every other weight is compared."""
    if not key.endswith("attn.qkv.bias"):
        return value
    q, _, v = value.chunk(3)
    return torch.cat([q, v])


def test_two_processes_take_the_steps_of_one(runs):
    one, two = runs["one"], runs["two"]
    masks = [k for k in one if k.startswith("masks.")]
    assert {"masks.lambda_1", "masks.lambda_2", "masks.visual.heads.log_alpha"} <= set(masks)
    for key in masks:  # log_alpha (mask lr 0.3) and the multipliers
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-5, msg=lambda m, key=key: f"{key}: {m}")
    for key in set(one) - set(masks):  # lr 1e-3: a tenth of one step (AdamW turns rounding-sized gradients
        a, b = _without_key_bias(key, one[key]), _without_key_bias(key, two[key])  # into whole steps)
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-4, msg=lambda m, key=key: f"{key}: {m}")
    # the stage did something: the multipliers were ascended and log_alpha moved inside its clamp range
    assert float(one["masks.lambda_1"]) > 1.0 and float(one["masks.lambda_2"]) > 1.0
    alphas = torch.cat([one[k].flatten() for k in masks if k.endswith("log_alpha")])
    assert float(alphas.min()) < math.log(100) - 0.5
    assert float(alphas.max()) <= math.log(100) + 1e-6  # clamped after each update (it starts at log 100)


def test_cached_accumulation_replays_the_steps_masks():
    """accum_chunks = 2 with a step seed: loss and every gradient equal one pass over the batch."""
    data = registry.build("data", DATA)
    teacher = registry.build("backbone", {"plugin": "clip", **BACKBONE}, spec=data.spec)
    batch = {k: v[:8] for k, v in data.train.items()}
    batch["seeds"] = rng.shard_seeds(0, 5, 8)
    results = []
    for chunks in (1, 2):
        torch.manual_seed(0)
        model = registry.build("backbone", {"plugin": "clip_l0", **BACKBONE, "target_sparsity": 0.5}, spec=data.spec)
        objective = registry.build("objective", {"plugin": "tinyclip_l0", "teacher": "(in memory)",
                                                 "accum_chunks": chunks}, spec=data.spec, teacher=teacher)
        torch.manual_seed(chunks)  # a different global RNG state: the masks must not come from it
        loss, _ = objective.loss({"model": model}, batch, 5)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss1, g1), (loss2, g2) = results
    torch.testing.assert_close(loss2, loss1)
    assert set(g1) == set(g2) and any(k.endswith("log_alpha") for k in g1)
    for key in g1:
        torch.testing.assert_close(g2[key], g1[key], rtol=1e-4, atol=1e-6, msg=lambda m, key=key: f"{key}: {m}")
