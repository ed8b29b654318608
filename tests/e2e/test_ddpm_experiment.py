"""experiments/ddpm_digits.toml: consistent options, and a short run that writes metrics and samples."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import registry
from core.config import read_toml
from core.interfaces import DataSpec
from core.run import run

ROOT = Path(__file__).resolve().parents[2]
#: the DDPM experiments (ddpm_digits_classifier.toml trains a noisy classifier: tests/plugins/ddpm/test_ddpm_noisy_classifier.py)
EXPERIMENTS = sorted(f for f in (ROOT / "experiments").glob("ddpm_digits*.toml") if "ddpm_bpd" in f.read_text())


@pytest.mark.parametrize("file", EXPERIMENTS, ids=lambda p: p.name)
def test_bpd_metric_describes_the_same_process_as_the_path(file):
    """The metric takes the run's [path] process; a contradicting option is refused, naming the key."""
    from core.build import build_components
    from core.config import apply_overrides, resolve

    raw = read_toml(file)
    raw["trainer"] = {**raw.get("trainer", {}), "steps": 1}
    c = build_components(resolve(raw, file=str(file)))
    bpd = [m for m in c.metrics.values() if type(m).__name__ == "BitsPerDim"]
    assert bpd and all(m.process == c.path.config for m in bpd), file.name
    index = next(i for i, m in enumerate(raw["metrics"]) if m["plugin"] == "ddpm_bpd")
    wrong = 4000 if c.path.config.steps != 4000 else 1000
    with pytest.raises(registry.ConfigError, match=rf"metrics\[{index}\]\.steps.*this run's \[path\] has steps"):
        build_components(resolve(apply_overrides(raw, [f"metrics.{index}.steps={wrong}"]), file=str(file)))


def test_path_rejects_a_scheduler_section_and_discrete_data():
    with pytest.raises(registry.ConfigError, match="scheduler"):
        registry.build("path", {"plugin": "gaussian_diffusion"}, spec=DataSpec((2,)), scheduler=object())
    with pytest.raises(registry.ConfigError, match="continuous"):
        registry.build("path", {"plugin": "gaussian_diffusion"}, spec=DataSpec((2,), kind="discrete", vocab_size=3))
    with pytest.raises(registry.ConfigError, match="more than 20 steps"):
        registry.build("path", {"plugin": "gaussian_diffusion", "steps": 10}, spec=DataSpec((2,)))


def test_path_sample_is_q_sample_at_the_step_of_t():
    path = registry.build("path", {"plugin": "gaussian_diffusion", "schedule": "cosine", "steps": 30,
                                   "prediction": "v"}, spec=DataSpec((3,)))
    d = path.diffusion
    k = torch.tensor([0, 7, 29])
    noise, data = torch.randn(3, 3, dtype=torch.float64), torch.rand(3, 3, dtype=torch.float64)
    ps = path.sample(noise, data, d.model_time(k, data))
    torch.testing.assert_close(ps.x_t, d.q_sample(data, k, noise))
    torch.testing.assert_close(ps.target, d.v_from(data, noise, k))
    assert path.sample_source((4, 3), torch.Generator().manual_seed(0)).shape == (4, 3)


def _short_file(tmp_path: Path, file: Path) -> Path:
    """The experiment with tiny metric settings (``--set`` cannot reach [[metrics]] entries)."""
    import tomli_w

    raw = read_toml(file)
    for entry in raw.get("metrics", []):
        if entry["plugin"] == "ddpm_bpd":
            entry.update(num_examples=16, batch_size=16, respacing="ddim10")
    out = tmp_path / file.name
    out.write_text(tomli_w.dumps(raw))
    return out


SHORT_RUNS = {
    "mlp-ancestral": ("ddpm_digits.toml", ["solver.plugin=ddpm_ancestral", "solver.respacing=\"100\"",
                                           "backbone.hidden=64"], 100),
    "mlp-ddim": ("ddpm_digits.toml", ["solver.plugin=ddim", "solver.respacing=\"ddim10\"", "backbone.hidden=64"], 10),
    "unet-ddim": ("ddpm_digits_unet.toml", ["solver.respacing=\"ddim10\"", "trainer.steps=4", "trainer.batch_size=32"], 10),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(SHORT_RUNS))
def test_short_run_writes_metrics_and_samples(tmp_path, case):
    name, overrides, nfe = SHORT_RUNS[case]
    file = _short_file(tmp_path, ROOT / "experiments" / name)
    out = tmp_path / "run"
    common = ["trainer.steps=30", "trainer.warmup_steps=0", "trainer.log_every=2", "eval.num_samples=64",
              "eval.num_pictures=16", "eval.batch_size=64", "trainer.progress=\"off\""]
    summary = run(file, common + overrides, out=out)
    metrics = summary["metrics"]
    for key in ("energy_distance", "sliced_wasserstein", "ddpm_bpd/total", "ddpm_bpd/prior", "ddpm_bpd/decoder"):
        assert key in metrics and math.isfinite(metrics[key]), metrics
    assert metrics["ddpm_bpd/total"] > 0
    assert summary["nfe"] == nfe
    assert json.loads((out / "summary.json").read_text())["metrics"] == metrics
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("mse" in r and "vb" in r for r in records)  # the hybrid loss's two terms are logged
    assert (out / "samples" / "final.png").stat().st_size > 200
