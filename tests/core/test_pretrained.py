"""save_pretrained / from_pretrained / ``flowforge export``: safetensors + config that sample like the run."""

import json

import pytest
import torch
from safetensors.torch import load_file

from core import cli
from core.data import generator
from core.generate import generate
from core.pretrained import from_pretrained, save_pretrained
from core.run import main as run_main
from core.runs import load_run
from registry import ConfigError


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("rf") / "run"
    assert run_main(["experiments/rectified_flow_2d.toml", "--out", str(out), "--set", "trainer.steps=5",
                     "--set", "trainer.batch_size=64", "--set", "metrics=[]", "--set", "eval.num_pictures=4"]) == 0
    return out


def test_export_holds_the_ema_weights_and_samples_identically(trained, tmp_path):
    folder = tmp_path / "exported"
    assert cli.main(["export", str(trained), "--out", str(folder)]) == 0
    run = load_run(trained, device="cpu")
    weights = load_file(str(folder / "model.safetensors"))
    assert weights.keys() == run.model.state_dict().keys()
    for key, value in run.model.state_dict().items():
        assert torch.equal(weights[key], value)
    meta = json.loads((folder / "pretrained.json").read_text())
    assert meta["weights"] == "ema" and meta["step"] == 5
    loaded = from_pretrained(folder, device="cpu")
    a, _ = generate(run.components, run.model, 16, generator(0, "x"))
    b, _ = generate(loaded.components, loaded.model, 16, generator(0, "x"))
    assert torch.equal(a["x"], b["x"])
    assert load_run(folder, device="cpu").checkpoint.name == "model.safetensors"  # sample/eval accept the folder


def test_raw_export_and_a_mismatched_file_is_a_clear_error(trained, tmp_path):
    folder = save_pretrained(trained, tmp_path / "raw", ema=False)
    assert json.loads((folder / "pretrained.json").read_text())["weights"] == "raw"
    text = (folder / "config.toml").read_text()
    assert "hidden = 256" in text
    (folder / "config.toml").write_text(text.replace("hidden = 256", "hidden = 8"))
    with pytest.raises(ConfigError, match="does not match the model"):
        from_pretrained(folder, device="cpu")
    with pytest.raises(ConfigError, match="not an exported model"):
        from_pretrained(tmp_path)
