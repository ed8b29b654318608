"""Evaluation gives the same numbers on 1 and 2 processes: one global generated set (block k from its
own generator) against one global held-out selection, gathered in global order before the metrics.

Checked on the real digits experiment with its
Fréchet distance and KID (the digits feature network, named the older and the newer way), energy
distance and sliced Wasserstein, on the 2D main job with off_support, and on the latent digits
experiment (a tiny random VAE) with decoded metrics against real images and against reconstructions;
blocks of 300 over 1000 samples so the ranks hold unequal shares. FID and KID agree to 1e-6 (absolute).
"""

from __future__ import annotations

import importlib.util
import math

import pytest

import registry
from core.generate import evaluate, floor
from core.run import run
from core.runs import load_run

from ..conftest import RF2D, ROOT

N, BLOCK = 1000, 300
FAST = ["eval.num_pictures=0", "eval.untrained=false", "eval.floor=false", "trainer.progress='off'",
        "trainer.checkpoint_every=0"]


def metrics_of(accelerator, run_dir: str, seed: int) -> dict:
    """Launcher entry: this rank's part of the evaluation and the floor of the run in `run_dir`."""
    loaded = load_run(run_dir, device="cpu")
    rank = accelerator.process_index if accelerator is not None else 0
    world = accelerator.num_processes if accelerator is not None else 1
    kw = dict(rank=rank, world_size=world, batch_size=BLOCK)
    return {"eval": evaluate(loaded.components, loaded.model, N, seed, **kw),
            "floor": floor(loaded.components, N, seed, **kw)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("evalinv")
    out = {"digits": root / "digits", "rf2d": root / "rf2d"}
    run(ROOT / "experiments" / "rf_digits.toml",
        [*FAST, "trainer.steps=5", "metrics=[{plugin='energy_distance'}, {plugin='sliced_wasserstein'}, "
         "{plugin='frechet_distance', train_steps=20, feature_dim=16, cache_reference=false}, "
         "{plugin='kid', subset_size=500, subsets=4, cache_reference=false, "
         "features={plugin='digits_cnn', train_steps=20, feature_dim=16}}]",
         "eval.num_samples=64"], out=out["digits"])
    run(RF2D, [*FAST, "trainer.steps=30", "backbone.hidden=64", "eval.num_samples=64",
               "metrics=[{plugin='energy_distance'}, {plugin='off_support'}]"], out=out["rf2d"])
    if importlib.util.find_spec("diffusers") is not None:  # the latent family's extra
        from ..latent_fixtures import save_tiny_vae

        vae = save_tiny_vae(root / "vae")
        out["latent"] = root / "latent"
        run(ROOT / "experiments" / "latent_rf_digits.toml",
            [*FAST, "trainer.steps=5", f"autoencoder.path='{vae}'", "autoencoder.device='cpu'", "data.cache=''",
             "data.shard_size=512", "backbone.hidden=32", "backbone.depth=1", "eval.num_samples=64", "solver.steps=2",
             "metrics=[{plugin='decoded', name='fd', metric={plugin='frechet_distance', train_steps=20, feature_dim=16, "
             "cache_reference=false}}, {plugin='decoded', name='ed', metric={plugin='energy_distance'}}, "
             "{plugin='decoded', name='ed_recon', reference='reconstructions', metric={plugin='energy_distance'}}]"],
            out=out["latent"])
    return {k: str(v) for k, v in out.items()}


@pytest.mark.parametrize("name", ["digits", "rf2d", "latent"])
def test_two_processes_give_the_metrics_of_one(runs, name):
    """"latent": decoded metrics (each rank decodes its own blocks) against real images and reconstructions."""
    if name not in runs:
        pytest.skip("the latent case needs diffusers (pip install -e '.[test]')")
    one = metrics_of(None, runs[name], seed=7)
    launcher = registry.build("launcher", {"plugin": "accelerate", "num_processes": 2, "threads_per_process": 1})
    two = launcher.launch(metrics_of, runs[name], 7, accelerator_kwargs={})
    for part in ("eval", "floor"):
        assert one[part].keys() == two[part].keys() and one[part]
        for key, value in one[part].items():
            print(f"{name} {part} {key}: 1 process {value:.8g}, 2 processes {two[part][key]:.8g}, "
                  f"difference {abs(value - two[part][key]):.3g}")
            assert math.isclose(value, two[part][key], rel_tol=1e-5, abs_tol=1e-9), (part, key, value, two[part][key])
            if key in ("frechet_distance", "kid", "fd"):
                assert abs(value - two[part][key]) <= 1e-6, (part, key, value, two[part][key])


def test_another_seed_changes_the_metrics(runs):
    """The comparison is not vacuous: the generated and reference draws move the numbers."""
    a, b = metrics_of(None, runs["rf2d"], seed=7), metrics_of(None, runs["rf2d"], seed=8)
    assert a["eval"]["energy_distance"] != b["eval"]["energy_distance"]
    assert a["floor"]["energy_distance"] != b["floor"]["energy_distance"]
