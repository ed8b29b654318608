"""``flowforge import dit``: a checkpoint in facebookresearch/DiT's own layout becomes a run that samples
like DiT.

The "published" checkpoints are written here: a random DiT built from the reference definition
(`benchmarks.reference_backbones.RefDiT`, DiT's models.py parameter names), every parameter drawn
(the zero-initialised adaLN and output layers too), saved with ``torch.save`` as DiT releases them (a
plain state dict) and as DiT's train.py saves them (``{"model", "ema", "opt", "args"}``). The imported
run's network is compared with DiT's forward at the integer step k (`tests.test_published_time`,
written from models.py) and one ancestral step with guided-diffusion's ``p_sample``.
"""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from ...reference.backbones import RefDiT
from core import cli
from core.runs import build_solver, load_run
from plugins.ddpm.diffusion import randn_like
from tests.plugins.ddpm.test_published_time import dit_forward, reference_p_sample

CLASSES, SIDE, CHANNELS = 10, 8, 4


def random_dit(seed: int = 0) -> RefDiT:
    """DiT (64 wide, 2 blocks, 4 heads, patch 2, learn_sigma) with every trainable tensor drawn."""
    torch.manual_seed(seed)
    ref = RefDiT(SIDE, 2, CHANNELS, 64, 2, 4, num_classes=CLASSES, learn_sigma=True, time_scale=1.0).eval()
    with torch.no_grad():
        for p in ref.parameters():
            if p.requires_grad:
                p.normal_(0, 0.3 / max(1, p.shape[-1]) ** 0.5)
    return ref


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """(reference network, path of its plain state dict, imported run directory)."""
    root = tmp_path_factory.mktemp("dit")
    ref = random_dit()
    torch.save(ref.state_dict(), root / "DiT-tiny.pt")
    assert cli.main(["import", "dit", str(root / "DiT-tiny.pt"), "--out", str(root / "run"), "--num-heads", "4",
                     "--image-size", "64", "--num-classes", str(CLASSES)]) == 0
    return ref, root / "DiT-tiny.pt", root / "run"


def test_the_imported_network_is_dits_forward_at_the_integer_step(released):
    ref, _, run_dir = released
    run = load_run(run_dir, device="cpu")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, CHANNELS, SIDE, SIDE, generator=g)
    y = torch.tensor([0, 3, 9, CLASSES])  # CLASSES: the null label
    worst = 0.0
    for k in (999, 500, 1, 0):
        ks = torch.full((4,), k)
        t = 1 - (ks + 1) / 1000  # the ddpm plugin's time of step k
        with torch.no_grad():
            ours, theirs = run.model(x, t.float(), y), dit_forward(ref, x, ks, y)
        assert theirs.abs().max() > 0.1
        worst = max(worst, float((ours - theirs).abs().max()))
    print(f"max |flowforge - DiT| over k in (999, 500, 1, 0): {worst:.2e}")
    assert worst < 1e-5


@pytest.mark.parametrize("k", [999, 10, 0])
def test_one_ancestral_step_of_the_imported_run_is_guided_diffusions(released, k):
    ref, _, run_dir = released
    run = load_run(run_dir, device="cpu")
    solver = build_solver(run, {"plugin": "ddpm_ancestral", "clip_denoised": False})  # all 1000 steps
    x = torch.randn(3, CHANNELS, SIDE, SIDE, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([1, 4, CLASSES])
    d = solver.diffusion
    ks = d.steps(k, 3, "cpu")
    with torch.no_grad():
        ours = solver.step(run.model(x, d.model_time(ks, x), y), x, ks, k, torch.Generator().manual_seed(7))
        theirs = reference_p_sample(dit_forward(ref, x, ks, y), x, k, randn_like(x, torch.Generator().manual_seed(7)))
    diff = float((ours.double() - theirs).abs().max())
    print(f"k={k}: max |flowforge step - p_sample| = {diff:.2e}")
    assert (theirs - x).abs().max() > 1e-3 and diff < 1e-5


def test_the_run_holds_dits_diffusion_and_samples_from_the_cli(released, capsys):
    _, source, run_dir = released
    run = load_run(run_dir, device="cpu")
    backbone, path = run.exp.components["backbone"], run.exp.components["path"]
    assert backbone["time_input"] == "integer_step" and backbone["learn_sigma"] is True
    assert (path["schedule"], path["steps"], path["prediction"], path["variance"]) == \
        ("linear", 1000, "epsilon", "learned_range")
    assert run.exp.components["solver"] == {"plugin": "ddpm_ancestral", "respacing": "250", "clip_denoised": False}
    assert run.exp.eval.guidance_scale == pytest.approx(0.5)  # DiT's cfg scale 1.5
    assert run.weights == "ema" and run.components.spec.shape == (CHANNELS, SIDE, SIDE)
    meta = json.loads((run_dir / "imported.json").read_text())
    assert meta["family"] == "dit" and meta["source"] == str(source.resolve())
    capsys.readouterr()
    assert cli.main(["sample", str(run_dir), "-n", "4", "--set", 'solver.respacing="3"', "--device", "cpu"]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["nfe"] == 3 and info["guidance_scale"] == pytest.approx(0.5) and info["files"]


def test_a_train_py_checkpoint_imports_its_ema_weights(tmp_path):
    raw, ema = random_dit(1), random_dit(2)
    opt = torch.optim.AdamW(raw.parameters())
    state = {"model": raw.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
             "args": argparse.Namespace(model="DiT-XL/2", image_size=256, num_classes=1000)}
    torch.save(state, tmp_path / "0050000.pt")
    for weights, want in (("auto", ema), ("model", raw)):
        out = tmp_path / f"run-{weights}"
        assert cli.main(["import", "dit", str(tmp_path / "0050000.pt"), "--out", str(out), "--num-heads", "4",
                         "--weights", weights]) == 0
        model = load_run(out, device="cpu").model
        for key, value in want.state_dict().items():
            assert torch.equal(model.state_dict()[key], value), key


def _refused(argv, out, capsys, message):
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not out.exists() and not out.with_name(out.name + ".import-tmp").exists()


def test_malformed_checkpoints_exit_2_and_write_nothing(released, tmp_path, capsys):
    ref, source, _ = released
    out = tmp_path / "run"
    sd = ref.state_dict()
    torch.save({k: v for k, v in sd.items() if not k.startswith("final_layer")}, tmp_path / "partial.pt")
    _refused(["import", "dit", str(tmp_path / "partial.pt"), "--out", str(out), "--num-heads", "4"], out, capsys,
             "missing final_layer.linear.weight")
    torch.save({k: v for k, v in sd.items() if k != "blocks.1.mlp.fc2.bias"}, tmp_path / "holed.pt")
    _refused(["import", "dit", str(tmp_path / "holed.pt"), "--out", str(out), "--num-heads", "4"], out, capsys,
             "blocks.1.mlp.fc2.bias")
    torch.save(ref, tmp_path / "module.pt")  # a pickled nn.Module: code, not data
    _refused(["import", "dit", str(tmp_path / "module.pt"), "--out", str(out)], out, capsys,
             "not a data-only checkpoint")
    torch.save({"fn": print, **sd}, tmp_path / "code.pt")  # a pickled function among the tensors
    _refused(["import", "dit", str(tmp_path / "code.pt"), "--out", str(out)], out, capsys,
             "not a data-only checkpoint")
    _refused(["import", "dit", str(source), "--out", str(out), "--preset", "DiT-XL/2"], out, capsys,
             "is not a DiT-XL/2")
    _refused(["import", "dit", str(source), "--out", str(out), "--num-heads", "4", "--image-size", "256"], out, capsys,
             "32x32 latents")
    _refused(["import", "dit", str(source), "--out", str(out), "--num-heads", "4", "--num-classes", "1000"], out,
             capsys, "the label table has 11 rows")
    _refused(["import", "dit", str(source), "--out", str(out)], out, capsys, "give --num-heads")
    _refused(["import", "nosuch", str(source), "--out", str(out)], out, capsys, "unknown importer plugin")


def test_the_shape_only_data_has_a_spec_and_no_examples(tmp_path):
    import registry
    from registry import ConfigError

    data = registry.build("data", {"plugin": "shape_only", "shape": [4, 8, 8], "num_classes": 10})
    assert data.spec.shape == (4, 8, 8) and data.spec.num_classes == 10
    with pytest.raises(ConfigError, match="holds no examples"):
        next(iter(data.train_batches(4, seed=0)))
    with pytest.raises(ConfigError, match="holds no examples"):
        data.reference(4, torch.Generator())
    assert data.render({"x": torch.randn(4, 4, 8, 8)}, str(tmp_path / "grid"))[0].endswith(".png")
    with pytest.raises(ConfigError, match="positive sizes"):
        registry.build("data", {"plugin": "shape_only", "shape": [4, 0, 8]})


def test_help_lists_the_importers_flags(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["import", "dit", "some.pt", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "--image-size" in text and "--image_size" in text and "--cfg-scale" in text and "--out" in text


def test_eval_of_an_imported_run_with_real_data_of_its_shape(released, tmp_path, capsys):
    from core.testing.files import write_npz

    _, _, run_dir = released
    npz = write_npz(tmp_path / "latents.npz", n=16, shape=(CHANNELS, SIDE, SIDE), classes=CLASSES)
    capsys.readouterr()
    argv = ["eval", str(run_dir), "--set", 'solver.respacing="2"', "--device", "cpu", "--metric", "energy_distance",
            "-n", "8", "--out", str(tmp_path / "eval")]
    assert cli.main(argv) == 2  # shape_only holds no reference examples
    assert "holds no examples" in capsys.readouterr().err
    data = f'data={{plugin = "npz", path = "{npz}", held_out_fraction = 0.0, num_classes = {CLASSES}}}'
    assert cli.main(argv + ["--set", data]) == 0


def test_a_safetensors_file_and_a_ddp_prefixed_state_dict_import_alike(released, tmp_path):
    from safetensors.torch import save_file

    ref, _, run_dir = released
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    save_file(sd, str(tmp_path / "dit.safetensors"))
    torch.save({f"module.{k}": v for k, v in sd.items()}, tmp_path / "ddp.pt")
    want = load_run(run_dir, device="cpu").model.state_dict()
    for name in ("dit.safetensors", "ddp.pt"):
        out = tmp_path / f"run-{name}"
        assert cli.main(["import", "dit", str(tmp_path / name), "--out", str(out), "--num-heads", "4"]) == 0
        got = load_run(out, device="cpu").model.state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
