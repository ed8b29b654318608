"""The latent family (plugins/latent): sd_vae against diffusers' own calls, latent data, decoded metrics,
the sharded latent cache and `flowforge encode`, and a latent experiment end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import registry
from core.cli import main as cli_main
from registry import ConfigError

from ...latent_fixtures import save_tiny_vae

diffusers = pytest.importorskip("diffusers")
ROOT = Path(__file__).resolve().parents[3]
EXPERIMENT = ROOT / "experiments" / "latent_rf_digits.toml"


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> Path:
    return save_tiny_vae(tmp_path_factory.mktemp("vae") / "tiny_vae")


@pytest.fixture(scope="module")
def reference_vae(vae_dir):
    return diffusers.AutoencoderKL.from_pretrained(str(vae_dir), local_files_only=True).eval()


def _ae(vae_dir, **options):
    return registry.build("autoencoder", {"plugin": "sd_vae", "path": str(vae_dir), "device": "cpu", **options})


def test_sd_vae_matches_diffusers(vae_dir, reference_vae):
    """z = (mean - shift) * scale and x = decode(z / scale + shift), as diffusers' SD3 pipeline does; a
    sample is mean + std * eps; chunked calls equal one call."""
    ae = _ae(vae_dir, chunk_size=2)
    assert (ae.scale, ae.shift) == (0.7, 0.1)
    x = torch.rand(5, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        dist = reference_vae.encode(x).latent_dist
        z_ref = (dist.mean - 0.1) * 0.7
        eps = torch.randn(dist.mean.shape, generator=torch.Generator().manual_seed(1))
        z_sample_ref = (dist.mean + dist.std * eps - 0.1) * 0.7
        x_ref = reference_vae.decode(z_ref / 0.7 + 0.1).sample
    assert ae.latent_shape((1, 32, 32)) == (4, 16, 16)
    torch.testing.assert_close(ae.encode(x), z_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(ae.encode(x, noise=eps), z_sample_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(ae.decode(z_ref), x_ref, atol=1e-5, rtol=0)
    # bf16 weights and arithmetic: the same latents to bf16's precision
    z16 = _ae(vae_dir, dtype="bfloat16").encode(x)
    assert z16.dtype == torch.float32 and (z16 - z_ref).abs().max() < 0.05 * z_ref.abs().max()


def test_single_safetensors_file_and_config_overrides(vae_dir, reference_vae, tmp_path):
    from safetensors.torch import save_file

    file = tmp_path / "vae.safetensors"
    save_file({k: v.contiguous() for k, v in reference_vae.state_dict().items()}, str(file))
    ae = _ae(file, config=str(vae_dir), scaling_factor=2.0, shift_factor=0.0)
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        ref = reference_vae.encode(x).latent_dist.mean * 2.0
    torch.testing.assert_close(ae.encode(x), ref, atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match="needs its architecture"):
        _ae(file)
    with pytest.raises(ConfigError, match="does not exist"):
        _ae(tmp_path / "nowhere")


def _tiny(vae_dir: Path, tmp_path: Path, cache: bool = True) -> list[str]:
    return [f"autoencoder.path={vae_dir}", "autoencoder.device=cpu", f"data.cache={tmp_path / 'cache' if cache else ''}",
            "data.shard_size=128", "data.data.held_out=0.8", "trainer.steps=20", "trainer.batch_size=64", "trainer.log_every=10",
            "trainer.warmup_steps=0", "trainer.checkpoint_every=20", "backbone.hidden=64", "backbone.depth=2",
            "solver.steps=2", "eval.num_samples=64", "eval.num_pictures=16", "eval.batch_size=64",
            "metrics.0.metric.train_steps=20", "metrics.0.metric.feature_dim=16",
            f"metrics.0.metric.cache_dir={tmp_path / 'features'}"]


def test_latent_experiment_runs_end_to_end(vae_dir, tmp_path):
    """experiments/latent_rf_digits.toml trains on 4x16x16 latents and reports metrics on decoded 32x32 images;
    the autoencoder is frozen and stays out of the checkpoint."""
    from core.run import run

    summary = run(EXPERIMENT, _tiny(vae_dir, tmp_path), out=tmp_path / "run")
    metrics = summary["metrics"]
    assert {"frechet_distance", "energy_distance"} <= set(metrics)
    assert (tmp_path / "run" / "samples" / "final.png").is_file()
    config = (tmp_path / "run" / "config.toml").read_text()
    assert "[autoencoder]" in config and 'plugin = "sd_vae"' in config
    assert all(v == v for v in metrics.values())
    # frozen, and outside the trained state: no VAE tensor in the checkpoint's model or EMA
    ae = _ae(vae_dir)
    ae.train()
    assert not ae.training and not any(m.training for m in ae.modules())
    assert not any(p.requires_grad for p in ae.parameters())
    ckpt = sorted((tmp_path / "run" / "checkpoints").glob("step-*.pt"))[-1]
    state = torch.load(ckpt, weights_only=True, map_location="cpu")
    keys = [k for part in ("model", "ema") if isinstance(state.get(part), dict) for k in state[part]]
    assert keys and not any("encoder" in k or "decoder" in k or "vae" in k for k in keys)
    _sample_writes_decoded_images(tmp_path / "run", tmp_path / "samples")


def _sample_writes_decoded_images(run_dir, stem):
    """``flowforge sample --npz`` of a latent run writes the decoded 32x32 images (uint8 NHWC, as DiT's
    sample_ddp.py), exactly the decode of the latents the solver generates."""
    from core.cli import main as cli
    from core.commands.sample import to_uint8_nhwc
    from core.data import generator as make_generator
    from core.generate import generate
    from core.runs import load_run

    assert cli(["sample", str(run_dir), "-n", "5", "--npz", "--out", str(stem)]) == 0
    images = np.load(f"{stem}.npz")["arr_0"]
    assert images.shape == (5, 32, 32, 1) and images.dtype == np.uint8
    run = load_run(run_dir, device="cpu")
    z = generate(run.components, run.model, 5, make_generator(0, "sample-cli", 0),
                 guidance_scale=run.exp.eval.guidance_scale, batch_size=run.exp.eval.batch_size)[0]["x"]
    assert z.shape == (5, 4, 16, 16)
    assert np.array_equal(images, to_uint8_nhwc(run.components.data.decode(z)))


def _latent(vae_dir, tmp_path, ae=None, **options):
    return registry.build("data", {"plugin": "latent", "size": 32, "data": {"plugin": "digits", "held_out": 0.8}, "shard_size": 100,
                                   **options}, autoencoder=_ae(vae_dir, **(ae or {})))


def test_latent_data_encodes_every_training_image(vae_dir, tmp_path):
    """The cache holds each training image's latent exactly once (a permutation of the split), with its label."""
    from plugins.data.digits import Digits, DigitsConfig

    data = _latent(vae_dir, tmp_path)
    assert data.spec.shape == (4, 16, 16) and data.spec.num_classes == 10
    digits = Digits(DigitsConfig(held_out=0.8))
    x = torch.nn.functional.interpolate(digits.train["x"], size=(32, 32), mode="bilinear", align_corners=False)
    z = data.autoencoder.encode(x)
    cached = torch.from_numpy(data.rows.rows("mean", np.arange(data.num_examples)))
    match = torch.cdist(cached.flatten(1), z.flatten(1)).argmin(1)
    assert data.num_examples == len(z) and len(set(match.tolist())) == len(z)
    assert (cached - z[match]).abs().max() < 1e-5
    assert torch.equal(torch.from_numpy(data.rows.rows("y", np.arange(len(z)))), digits.train["y"][match])
    decoded = data.decode(cached[:3])
    assert decoded.shape == (3, 1, 32, 32)


def test_sampled_posterior_and_flips_do_not_depend_on_the_process_count(vae_dir, tmp_path):
    data = _latent(vae_dir, tmp_path, flip=True, ae={"posterior": "sample"})
    one = next(iter(data.train_batches(8, seed=3, start_step=5)))
    halves = [next(iter(data.train_batches(4, seed=3, start_step=5, rank=r, world_size=2))) for r in (0, 1)]
    for key in ("x", "y"):
        assert torch.equal(one[key], torch.cat([h[key] for h in halves]))
    mean = torch.from_numpy(data.rows.rows("mean", np.arange(data.num_examples)))
    assert (torch.cdist(one["x"].flatten(1), mean.flatten(1)).min(1).values > 1e-3).all()  # a draw, not the mean
    later = next(iter(data.train_batches(8, seed=3, start_step=6)))
    assert not torch.equal(one["x"], later["x"])


def _encode(tmp_path, vae_dir, *extra):
    return cli_main(["encode", str(EXPERIMENT), "--set", f"autoencoder.path={vae_dir}", "--set", "autoencoder.device=cpu",
                     "--set", f"data.cache={tmp_path}", "--set", "data.shard_size=80", "--set", "data.flip=true",
                     "--set", "data.data.held_out=0.8",
                     *extra])


def _arrays(folder: Path) -> dict[str, np.ndarray]:
    out = {}
    for file in sorted(folder.glob("shard-*.npz")):
        with np.load(file) as z:
            out.update({f"{file.name}/{k}": z[k] for k in z.files})
    return out


def test_encode_command_one_vs_two_processes_and_resume(vae_dir, tmp_path, capsys):
    assert _encode(tmp_path / "one", vae_dir) == 0
    assert _encode(tmp_path / "two", vae_dir, "--rank", "1", "--world-size", "2") == 0
    assert "wrote 2 shard(s), skipped 0 finished; 3 of 5 still missing" in capsys.readouterr().out
    assert _encode(tmp_path / "two", vae_dir, "--rank", "0", "--world-size", "2") == 0
    one, two = _arrays(tmp_path / "one"), _arrays(tmp_path / "two")
    assert len(one) == 5 * 3 and one.keys() == two.keys()  # 360 training digits / 80: 5 shards of mean, mean_flip, y
    assert all(np.array_equal(one[k], two[k]) for k in one)
    assert json.loads((tmp_path / "one" / "meta.json").read_text()) == json.loads((tmp_path / "two" / "meta.json").read_text())
    capsys.readouterr()
    stamp = {f: f.stat().st_mtime_ns for f in (tmp_path / "one").glob("shard-*.npz")}
    (tmp_path / "one" / "shard-00002.npz").unlink()
    assert _encode(tmp_path / "one", vae_dir) == 0
    assert "wrote 1 shard(s), skipped 4" in capsys.readouterr().out
    assert all(f.stat().st_mtime_ns == t for f, t in stamp.items() if f.name != "shard-00002.npz")
    assert all(np.array_equal(v, _arrays(tmp_path / "one")[k]) for k, v in one.items())


def test_bad_inputs_exit_2(vae_dir, tmp_path, capsys):
    assert cli_main(["encode", str(EXPERIMENT), "--set", f"autoencoder.path={tmp_path / 'none'}",
                     "--set", f"data.cache={tmp_path}"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert _encode(tmp_path / "c", vae_dir, "--set", "data.size=31") == 2  # 31 is odd: the VAE halves the sides
    assert "sides divisible by 2" in capsys.readouterr().err
    assert _encode(tmp_path / "c", vae_dir) == 0
    assert _encode(tmp_path / "c", vae_dir, "--set", "data.data.split_seed=1") == 2
    assert "written for other data" in capsys.readouterr().err


FAMILIES = {
    "rectified_flow": {"scheduler": {"plugin": "cond_ot"}, "path": {"plugin": "affine"},
                       "objective": {"plugin": "velocity_mse"}, "solver": {"plugin": "ode", "steps": 2}},
    "flow_matching": {"scheduler": {"plugin": "cosine"}, "path": {"plugin": "affine"},
                      "objective": {"plugin": "flow_matching", "prediction": "epsilon"},
                      "solver": {"plugin": "ode", "steps": 2}},
    "ddpm": {"path": {"plugin": "gaussian_diffusion", "schedule": "cosine", "steps": 8},
             "objective": {"plugin": "ddpm"}, "solver": {"plugin": "ddim", "respacing": "ddim2"}},
}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_continuous_family_trains_and_samples_in_latent_space(family, vae_dir):
    """Each family's loss runs on latent batches, its solver's latents decode to images, and a decoded
    metric compares them with decoded held-out latents."""
    from core import config as config_mod
    from core.build import build_components
    from core.data import generator
    from core.generate import evaluate, generate

    raw = config_mod.read_toml(EXPERIMENT)
    for key in ("scheduler", "path", "objective", "solver"):
        raw.pop(key, None)
    raw.update(FAMILIES[family])
    raw["autoencoder"].update(path=str(vae_dir), device="cpu")
    raw["data"].update(cache="", shard_size=128, data={"plugin": "digits", "held_out": 0.8})
    raw["backbone"].update(hidden=32, depth=1)
    raw["metrics"] = [{"plugin": "decoded", "metric": {"plugin": "energy_distance"}}]
    c = build_components(config_mod.resolve(raw))
    batch = next(iter(c.data.train_batches(8, seed=0)))
    assert batch["x"].shape == (8, 4, 16, 16)
    loss, _ = c.objective.loss({"model": c.model}, batch, 0)
    assert torch.isfinite(loss)
    out, _ = generate(c, c.model, 4, generator(0))
    assert out["x"].shape == (4, 4, 16, 16) and c.data.decode(out["x"]).shape == (4, 1, 32, 32)
    result = evaluate(c, c.model, 16, 0, batch_size=16)
    assert set(result) == {"decoded"} and result["decoded"] > 0


def _energy_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Reference: 2 E|X - Y| - E|X - X'| - E|Y - Y'| over flattened rows, in float64 (V-statistics)."""
    a, b = a.flatten(1).double(), b.flatten(1).double()
    return float(2 * torch.cdist(a, b).mean() - torch.cdist(a, a).mean() - torch.cdist(b, b).mean())


def test_decoded_metrics_compare_with_real_images_or_with_reconstructions(vae_dir):
    """reference = "images": decode(generated) against the real held-out images (the floor: real images
    against real images); "reconstructions": against decode(encode(images)). Checked against the energy
    distance written here, on the held-out rows evaluation selects, in 2 blocks (each decoded apart)."""
    from core import config as config_mod
    from core.build import build_components
    from core.data import derive_seed, generator
    from core.generate import evaluate, floor, generate

    raw = config_mod.read_toml(EXPERIMENT)
    raw["autoencoder"].update(path=str(vae_dir), device="cpu")
    raw["data"].update(cache="", shard_size=128, data={"plugin": "digits", "held_out": 0.8})
    raw["backbone"].update(hidden=32, depth=1)
    raw["solver"].update(steps=2)
    raw["metrics"] = [{"plugin": "decoded", "name": "real", "metric": {"plugin": "energy_distance"}},
                      {"plugin": "decoded", "name": "recon", "reference": "reconstructions",
                       "metric": {"plugin": "energy_distance"}},
                      {"plugin": "energy_distance"},  # on the latents
                      {"plugin": "few_step", "name": "one_step", "num_samples": 24,
                       "distance": {"plugin": "decoded", "metric": {"plugin": "energy_distance"}}}]
    c = build_components(config_mod.resolve(raw))
    n, seed, block = 24, 3, 12
    result = evaluate(c, c.model, n, seed, batch_size=block, guidance_scale=1.0)
    fake = torch.cat([generate(c, c.model, block, generator(seed, "eval-generate", a), guidance_scale=1.0,
                               batch_size=block)[0]["x"] for a in (0, block)])
    images = c.data.observation.reference(n, torch.Generator().manual_seed(derive_seed(seed, "eval-reference")))["x"]
    with torch.no_grad():
        decoded = c.data.autoencoder.decode(fake).clamp(-1, 1)
        recon = c.data.autoencoder.decode(c.data.autoencoder.encode(images)).clamp(-1, 1)
    assert decoded.shape == images.shape == (n, 1, 32, 32)
    assert result["real"] == pytest.approx(_energy_distance(images, decoded), rel=1e-4)
    assert result["recon"] == pytest.approx(_energy_distance(recon, decoded), rel=1e-4)
    assert result["energy_distance"] == pytest.approx(_energy_distance(c.data.autoencoder.encode(images), fake), rel=1e-4)
    assert abs(result["real"] - result["recon"]) > 1e-3  # the two references differ
    low = floor(c, n, seed, batch_size=block)
    g = [torch.Generator().manual_seed(derive_seed(seed, k)) for k in ("floor-a", "floor-b")]
    a, b = (c.data.observation.reference(n, gen)["x"] for gen in g)
    assert low["real"] == pytest.approx(_energy_distance(a, b), rel=1e-4)
    one_step = c.metrics["one_step"]  # few_step hands its decoded distance images too
    got = one_step.evaluate(c.model, c.data, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    fake, _ = one_step.generate(c.model, c.data.spec, g)
    images = c.data.observation.reference(24, g)["x"]
    with torch.no_grad():
        expected = _energy_distance(images, c.data.autoencoder.decode(fake).clamp(-1, 1))
    assert got["decoded"] == pytest.approx(expected, rel=1e-4)
