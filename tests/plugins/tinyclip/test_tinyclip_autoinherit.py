"""Automatic inheritance in training (plugins/tinyclip/autoinherit.py): the clip_l0 backbone under the
tinyclip_l0 objective moves its expected sparsity to the target, and the prune command writes a dense
student equal to the trained masked model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import tomli_w

import registry
from core.optim import param_groups
from plugins.tinyclip.autoinherit import MaskedCLIP, main
from plugins.tinyclip.prune import save_student

BACKBONE = {"width": 32, "depth": 2, "heads": 2, "embed_dim": 16, "patch_size": 4}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("l0")
    data = registry.build("data", {"plugin": "clip_shapes", "image_size": 8, "train_size": 64, "held_out_size": 16})
    teacher = registry.build("backbone", {"plugin": "clip", **BACKBONE}, spec=data.spec)
    save_student(teacher, folder / "teacher")  # a run directory that teacher / inherit_from accept
    return folder, data


def test_training_raises_the_expected_sparsity_to_the_target(setup):
    folder, data = setup
    model = registry.build("backbone", {"plugin": "clip_l0", **BACKBONE, "inherit_from": str(folder / "teacher"),
                                        "inherit_weights": "model", "target_sparsity": 0.4, "sparsity_warmup": 20,
                                        "mask_lr": 0.1}, spec=data.spec)
    objective = registry.build("objective", {"plugin": "tinyclip_l0", "teacher": str(folder / "teacher"),
                                             "teacher_weights": "model"}, spec=data.spec)
    assert isinstance(model, MaskedCLIP)
    groups = param_groups(model, 0.1)
    masks_group = [g for g in groups if any(p is model.masks.lambda_1 for p in g["params"])]
    assert masks_group and masks_group[0]["lr"] == 0.1 and masks_group[0]["weight_decay"] == 0.0
    opt = torch.optim.AdamW(groups, lr=1e-3)
    logs = []
    torch.manual_seed(0)
    for step in range(48):
        batch = {k: v[(step * 16) % 64:(step * 16) % 64 + 16] for k, v in data.train.items()}
        loss, log = objective.loss({"model": model}, batch, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        logs.append(log)
    assert logs[0]["expected_sparsity"] < 0.02 and logs[0]["target_sparsity"] == 0 and logs[2]["l0_penalty"] > 0
    trace = [round(x["expected_sparsity"], 3) for x in logs]
    assert max(trace) > 0.35 and trace == sorted(trace), trace  # it rises to the target (from log_alpha = log 100)
    assert float(model.masks.lambda_1.detach()) > 10  # ascended while the sparsity lagged behind the target
    model.eval()
    student = model.pruned().eval()
    batch = {k: v[:8] for k, v in data.held_out.items()}
    with torch.no_grad():
        torch.testing.assert_close(student.encode_image(batch["image"]), model.encode_image(batch["image"]),
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(student.encode_text(batch["text"]), model.encode_text(batch["text"]),
                                   atol=1e-5, rtol=1e-5)


def test_a_trainer_run_and_the_prune_command(setup, capsys):
    from core.run import run
    from core.runs import load_run

    folder, data = setup
    experiment = {
        "experiment": {"name": "l0", "seed": 0},
        "data": {"plugin": "clip_shapes", "image_size": 8, "train_size": 64, "held_out_size": 16},
        "backbone": {"plugin": "clip_l0", **BACKBONE, "inherit_from": str(folder / "teacher"),
                     "inherit_weights": "model", "target_sparsity": 0.3, "mask_lr": 0.5},
        "objective": {"plugin": "tinyclip_l0", "teacher": str(folder / "teacher"), "teacher_weights": "model"},
        "trainer": {"steps": 4, "batch_size": 16, "lr": 1e-3, "log_every": 2, "ema_decay": 0.0},
    }
    (folder / "l0.toml").write_text(tomli_w.dumps(experiment))
    run(folder / "l0.toml", out=folder / "run")
    assert main([str(folder / "run"), str(folder / "student"), "--weights", "model"]) == 0
    assert "vision_mlp_width" in capsys.readouterr().out
    masked = load_run(folder / "run", ema=False, device="cpu").model
    student = registry.build("backbone", {"plugin": "clip", "inherit_from": str(folder / "student"),
                                          "inherit_weights": "model",
                                          **_options(folder / "student")}, spec=data.spec).eval()
    image = data.held_out["image"][:4]
    with torch.no_grad():
        torch.testing.assert_close(student.encode_image(image), masked.encode_image(image), atol=1e-5, rtol=1e-5)
    assert main([str(folder / "teacher"), str(folder / "nothing")]) == 2  # not a clip_l0 run


def _options(directory: Path) -> dict:
    import tomllib

    options = tomllib.loads((directory / "config.toml").read_text())["backbone"]
    options.pop("plugin")
    return options
