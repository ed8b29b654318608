"""``flowforge export RUN --diffusers OUT``: a DiT run as a diffusers ``DiTTransformer2DModel`` folder.

A random DiT in DiT's own layout is imported (``flowforge import dit``), exported, and loaded back with
``DiTTransformer2DModel.from_pretrained``. diffusers' DiT embeds the step with frequencies
``10000^(-i / (half - 1))`` where DiT's models.py uses ``10000^(-i / half)`` (written below from both
sources); so the folder's outputs equal flowforge's (= DiT's) exactly at ``k = 0`` (all sinusoid
arguments vanish), and at every step once flowforge's time features are computed diffusers' way; the
remaining difference of the unchanged models is measured and printed.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from core import cli
from core.runs import load_run
from tests.plugins.dit.test_import_dit import CHANNELS, CLASSES, SIDE, random_dit

diffusers = pytest.importorskip("diffusers")


def diffusers_sinusoid(k: torch.Tensor, dim: int = 256) -> torch.Tensor:
    """diffusers' Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=1): [cos, sin] of k 10000^(-i/(half-1))."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / (half - 1))
    args = k.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("diffusers")
    torch.save(random_dit(3).state_dict(), root / "dit.pt")
    assert cli.main(["import", "dit", str(root / "dit.pt"), "--out", str(root / "run"), "--num-heads", "4"]) == 0
    assert cli.main(["export", str(root / "run"), "--diffusers", str(root / "transformer")]) == 0
    return root / "run", root / "transformer"


def outputs(run, model, k: int, time_features=None):
    x = torch.randn(4, CHANNELS, SIDE, SIDE, generator=torch.Generator().manual_seed(k))
    y = torch.tensor([0, 5, 9, CLASSES])  # CLASSES: the null label
    ks = torch.full((4,), k)
    with torch.no_grad():
        theirs = model(x, timestep=ks, class_labels=y).sample
        if time_features is None:
            ours = run.model(x, (1 - (ks + 1) / 1000).float(), y)
        else:  # flowforge's network with diffusers' time features
            m = run.model
            h = m.x_embedder(x) + m.pos_embed
            c = m.t_embedder.mlp(time_features(ks)) + m.y_embedder(y, 4, x.device)
            for block in m.blocks:
                h = block(h, c)
            ours = m.unpatchify(m.final_layer(h, c))
    assert theirs.shape == ours.shape == (4, 2 * CHANNELS, SIDE, SIDE) and theirs.abs().max() > 0.1
    return float((ours - theirs).abs().max())


def test_the_folder_loads_with_diffusers_and_its_outputs_are_the_runs(exported):
    run_dir, folder = exported
    config = json.loads((folder / "config.json").read_text())
    assert config["_class_name"] == "DiTTransformer2DModel" and config["norm_eps"] == 1e-6
    assert (config["num_layers"], config["num_attention_heads"], config["num_embeds_ada_norm"]) == (2, 4, CLASSES)
    model = diffusers.DiTTransformer2DModel.from_pretrained(str(folder), local_files_only=True).eval()
    assert set(load_file(str(folder / "diffusion_pytorch_model.safetensors"))) == set(model.state_dict())
    run = load_run(run_dir, device="cpu")
    at_zero = outputs(run, model, 0)
    mapped = max(outputs(run, model, k, diffusers_sinusoid) for k in (999, 500, 10))
    own = {k: outputs(run, model, k) for k in (999, 500, 10)}
    print(f"max |flowforge - diffusers|: k=0 {at_zero:.2e}; with diffusers' time features {mapped:.2e}; "
          f"as they are (diffusers' 1/(half-1) frequencies) " + ", ".join(f"k={k} {v:.2e}" for k, v in own.items()))
    assert at_zero < 1e-5 and mapped < 1e-5
    assert max(own.values()) > 1e-4  # the frequency difference is real, and documented


def test_exports_diffusers_cannot_hold_exit_2(exported, tmp_path, capsys):
    run_dir, _ = exported
    scaled = tmp_path / "scaled"
    scaled.mkdir()
    (scaled / "checkpoints").mkdir()
    for name in ("checkpoints/step-00000000.pt",):
        (scaled / name).write_bytes((run_dir / name).read_bytes())
    text = (run_dir / "config.toml").read_text()
    (scaled / "config.toml").write_text(text.replace('time_input = "integer_step"', 'time_input = "scaled"'))
    capsys.readouterr()
    assert cli.main(["export", str(scaled), "--diffusers", str(tmp_path / "out")]) == 2
    assert "integer_step" in capsys.readouterr().err and not (tmp_path / "out").exists()
    assert cli.main(["export", str(run_dir)]) == 2
    assert "--out FOLDER and/or --diffusers" in capsys.readouterr().err
