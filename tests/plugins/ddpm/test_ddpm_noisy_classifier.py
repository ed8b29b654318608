"""Classifier guidance with a classifier trained on noisy states (guided-diffusion's classifier_train.py and
classifier_sample.py): the noisy_classifier objective, the unet_classifier backbone's attention pooling, the
noisy_accuracy metric, and a ddpm objective guided by a trained classifier run.

* the objective's loss is the cross entropy of ``model(x_k, t_k)`` with ``x_k`` exactly
  ``sqrt(abar_k) x_0 + sqrt(1 - abar_k) eps`` (eps the path's per-example draw), recomputed here;
* ``AttentionPool2d`` equals guided-diffusion's equations written out here (mean token, positional
  embedding, [q | k | v] heads, softmax(q k^T / sqrt(c)), c_proj, the mean token's output), float64;
* a short training on the digits beats chance clearly at small noise, and less at large noise;
* guided DDIM sampling of an exact mixture-of-Gaussians model of the digits (each class a diagonal
  Gaussian fitted to its training digits; the unconditional eps in closed form) with the trained
  classifier puts more samples in the requested class than unguided sampling, as judged by the
  project's digits feature classifier (digits_cnn);
* a classifier of another process or data shape, or a directory that is no classifier run, is a ConfigError.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import registry
from core import rng
from core.config import resolve
from core.interfaces import DataSpec
from core.run import run_config

T = 1000
PATH = {"plugin": "gaussian_diffusion", "schedule": "cosine", "steps": T, "prediction": "epsilon",
        "variance": "fixed_small"}
DIGITS = {"plugin": "digits", "form": "continuous", "conditional": True}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def classifier_config(steps: int = 150) -> dict:
    return {"experiment": {"name": "noisy-classifier", "seed": 0}, "data": DIGITS,
            "backbone": {"plugin": "mlp", "hidden": 256, "depth": 2, "classifier": True}, "path": PATH,
            "objective": {"plugin": "noisy_classifier"},
            "trainer": {"steps": steps, "batch_size": 128, "lr": 1e-3, "ema_decay": 0.0, "log_every": 100,
                        "progress": "off"},
            "eval": {"batch_size": 359},
            "metrics": [{"plugin": "noisy_accuracy", "times": [0.9, 0.5, 0.1], "num_examples": 359,
                         "batch_size": 359}]}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(run directory, summary) of a 150-step noisy classifier of the digits on the cosine process."""
    out = tmp_path_factory.mktemp("noisy-classifier") / "run"
    return out, run_config(resolve(classifier_config()), out)


def test_loss_is_the_cross_entropy_on_q_sample_states():
    spec = DataSpec((1, 2, 2), num_classes=3)
    path = registry.build("path", {**PATH, "steps": 50}, spec=spec)
    objective = registry.build("objective", {"plugin": "noisy_classifier"}, spec=spec, path=path)
    seen = {}

    def model(x, t, y=None):
        assert y is None, "the classifier never sees the label"
        seen["x"], seen["t"] = x, t
        seen["logits"] = torch.stack([x.sum((1, 2, 3)), x[:, 0, 0, 0], t], dim=1)
        return seen["logits"]

    g = torch.Generator().manual_seed(0)
    batch = {"x": torch.randn(32, 1, 2, 2, generator=g), "y": torch.randint(3, (32,), generator=g),
             "seeds": torch.arange(32)}
    loss, logs = objective.loss({"model": model}, batch, 0)
    k = torch.round((1 - seen["t"].double()) * 50 - 1).long()
    torch.testing.assert_close(seen["t"].double(), 1 - (k + 1).double() / 50, rtol=0, atol=1e-6)
    abar = torch.cumprod(1 - path.diffusion.tables["betas"], 0)[k].reshape(-1, 1, 1, 1)
    eps = path.sample_source(batch["x"].shape, draw=rng.for_batch(batch))
    torch.testing.assert_close(seen["x"].double(), abar.sqrt() * batch["x"] + (1 - abar).sqrt() * eps,
                               rtol=1e-5, atol=1e-5)
    assert len(set(k.tolist())) > 10, "steps are drawn per example"
    torch.testing.assert_close(loss, F.cross_entropy(seen["logits"].float(), batch["y"]))
    assert float(logs["accuracy"]) == float((seen["logits"].argmax(1) == batch["y"]).float().mean())


def test_objective_and_backbone_refuse_what_they_cannot_train():
    unlabelled = DataSpec((1, 8, 8))
    path = registry.build("path", PATH, spec=unlabelled)
    with pytest.raises(registry.ConfigError, match="labelled"):
        registry.build("objective", {"plugin": "noisy_classifier"}, spec=unlabelled, path=path)
    with pytest.raises(registry.ConfigError, match="gaussian_diffusion"):
        registry.build("objective", {"plugin": "noisy_classifier"}, spec=DataSpec((2,), num_classes=2), path=None)
    with pytest.raises(registry.ConfigError, match="labelled"):
        registry.build("backbone", {"plugin": "unet_classifier", "preset": "digits"}, spec=unlabelled)
    with pytest.raises(registry.ConfigError, match="classifier"):
        registry.build("backbone", {"plugin": "mlp", "classifier": True}, spec=unlabelled)
    spec = DataSpec((1, 8, 8), num_classes=10)
    objective = registry.build("objective", {"plugin": "noisy_classifier"}, spec=spec, path=path)
    generative = registry.build("backbone", {"plugin": "mlp", "hidden": 8, "depth": 1}, spec=spec)
    with pytest.raises(registry.ConfigError, match=r"\(B, num_classes\)"):
        objective.loss({"model": generative}, {"x": torch.randn(4, 1, 8, 8), "y": torch.arange(4)}, 0)


def reference_attention_pool(pool, x):
    """guided-diffusion's AttentionPool2d.forward with QKVAttention, from its equations."""
    b, c = x.shape[:2]
    x = x.reshape(b, c, -1)
    x = torch.cat([x.mean(-1, keepdim=True), x], -1) + pool.positional_embedding[None]
    qkv = torch.einsum("oc,bct->bot", pool.qkv_proj.weight[:, :, 0], x) + pool.qkv_proj.bias[None, :, None]
    heads, ch = pool.num_heads, c // pool.num_heads
    q, k, v = (part.reshape(b * heads, ch, -1) for part in qkv.chunk(3, dim=1))
    weight = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / math.sqrt(ch), dim=-1)
    a = torch.einsum("bts,bcs->bct", weight, v).reshape(b, c, -1)
    out = torch.einsum("oc,bct->bot", pool.c_proj.weight[:, :, 0], a) + pool.c_proj.bias[None, :, None]
    return out[:, :, 0]


def test_attention_pooling_is_guided_diffusions():
    from plugins.unet.classifier import AttentionPool2d

    torch.manual_seed(0)
    pool = AttentionPool2d(tokens=16, channels=12, head_channels=4, out_dim=5).double()
    x = torch.randn(3, 12, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(pool(x), reference_attention_pool(pool, x), rtol=1e-12, atol=1e-12)


def test_unet_classifier_outputs_logits_of_the_noisy_state_and_its_time():
    spec = DataSpec((1, 8, 8), num_classes=10)
    torch.manual_seed(0)
    model = registry.build("backbone", {"plugin": "unet_classifier", "preset": "digits"}, spec=spec).eval()
    for p in model.parameters():  # leave the zero-initialised convs; perturb so that t reaches the output
        p.data.add_(0.05 * torch.randn_like(p))
    x = torch.randn(4, 1, 8, 8)
    out = model(x, torch.full((4,), 0.3))
    assert out.shape == (4, 10)
    assert not torch.allclose(out, model(x, torch.full((4,), 0.8))), "the time embedding reaches the logits"
    assert torch.equal(out, model(x, torch.full((4,), 0.3), torch.arange(4))), "the label is ignored"
    names = {n.split(".")[0] for n, _ in model.named_parameters()}
    assert names == {"time_embed", "input_blocks", "middle_block", "out"}  # guided-diffusion's names
    assert hasattr(model.out[2], "positional_embedding") and model.out[2].positional_embedding.shape == (64, 17)


def test_short_training_beats_chance_on_noisy_held_out_digits(trained):
    _, summary = trained
    acc, untrained = summary["metrics"], summary["untrained"]
    assert acc["noisy_accuracy/t=0.9"] > 0.6, acc  # chance: 0.1
    assert acc["noisy_accuracy/t=0.9"] > acc["noisy_accuracy/t=0.5"] > acc["noisy_accuracy/t=0.1"] - 0.05, acc
    assert acc["noisy_accuracy/uniform"] > 0.3, acc
    assert untrained["noisy_accuracy/t=0.9"] < 0.3, untrained


class DigitsMixture(torch.nn.Module):
    """The exact epsilon of p(x_0) = sum_c pi_c N(mu_c, diag(v_c)) under the process, at DDIM's integer steps.

    ``x_k | c ~ N(a mu_c, a^2 v_c + s^2)`` with ``a = sqrt(abar_k)``, ``s = sqrt(1 - abar_k)``;
    ``eps_c = s (x - a mu_c) / (a^2 v_c + s^2)``, ``eps = sum_c p(c | x_k) eps_c``.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, abar: torch.Tensor):
        super().__init__()
        flat = x.reshape(x.shape[0], -1).double()
        self.mu = torch.stack([flat[y == c].mean(0) for c in range(10)])
        self.var = torch.stack([flat[y == c].var(0) for c in range(10)]).clamp(min=1e-3)
        self.log_pi = torch.log(torch.bincount(y, minlength=10).double() / y.numel())
        self.abar = abar

    def forward(self, x, t, y=None):
        k = torch.round((1 - t.double()) * T - 1).long()
        a, s = self.abar[k].sqrt()[:, None, None], (1 - self.abar[k]).sqrt()[:, None, None]
        flat = x.reshape(x.shape[0], 1, -1).double()
        var = a ** 2 * self.var[None] + s ** 2
        log_p = self.log_pi - 0.5 * (((flat - a * self.mu[None]) ** 2) / var + var.log()).sum(-1)
        eps_c = s * (flat - a * self.mu[None]) / var
        eps = (torch.softmax(log_p, dim=1)[:, :, None] * eps_c).sum(1)
        return eps.reshape(x.shape).to(x.dtype)


def test_guidance_by_the_trained_classifier_raises_the_requested_class_fraction(trained, tmp_path):
    from plugins.metrics.trained import DigitsCNNConfig, cached_feature_net

    run_dir, _ = trained
    data = registry.build("data", DIGITS)
    spec = data.spec
    judge, _ = cached_feature_net(data, DigitsCNNConfig(train_steps=150, cache_dir=str(tmp_path)))
    held = data.reference(359, torch.Generator().manual_seed(0))
    assert (judge(held["x"]).argmax(1) == held["y"]).float().mean() > 0.85  # the judge knows the digits
    train = next(data.train_batches(1437, seed=0))
    path = registry.build("path", PATH, spec=spec)
    mixture = DigitsMixture(train["x"], train["y"], path.diffusion.tables["alphas_cumprod"])
    solver = registry.build("solver", {"plugin": "ddim", "respacing": "ddim20", "clip_denoised": False}, path=path)
    g = torch.Generator().manual_seed(1)
    x0, y = torch.randn(300, *spec.shape, generator=g), torch.randint(10, (300,), generator=g)

    def hit_rate(scale: float) -> float:
        options = {"classifier": str(run_dir), "classifier_scale": scale} if scale else {}
        objective = registry.build("objective", {"plugin": "ddpm", **options}, spec=spec, path=path)
        x = solver.sample(objective.sampling_model(mixture), x0.clone(), y=y).x
        return float((judge(x.clamp(-1, 1)).argmax(1) == y).float().mean())

    unguided, guided = hit_rate(0.0), hit_rate(4.0)
    assert unguided < 0.25, unguided  # the mixture ignores y: about 1 in 10
    assert guided > unguided + 0.2, (unguided, guided)


def test_a_classifier_of_another_process_or_shape_is_refused(trained, tmp_path):
    run_dir, _ = trained
    spec = DataSpec((1, 8, 8), num_classes=10)

    def build(path_options, spec=spec, **options):
        path = registry.build("path", {**PATH, **path_options}, spec=spec)
        return registry.build("objective", {"plugin": "ddpm", "classifier": str(run_dir), **options}, spec=spec,
                              path=path)

    assert build({}).classifier is not None  # the prediction and variance of the model do not matter
    assert build({"prediction": "v", "variance": "learned_range"}).classifier is not None
    with pytest.raises(registry.ConfigError, match="another process"):
        build({"steps": 500})
    with pytest.raises(registry.ConfigError, match="another process"):
        build({"schedule": "linear"})
    with pytest.raises(registry.ConfigError, match="shape"):
        build({}, spec=DataSpec((1, 4, 4), num_classes=10))
    with pytest.raises(registry.ConfigError, match="classes"):
        build({}, spec=DataSpec((1, 8, 8), num_classes=5))
    with pytest.raises(registry.ConfigError, match="labelled"):
        build({}, spec=DataSpec((1, 8, 8)))
    path = registry.build("path", PATH, spec=spec)
    with pytest.raises(registry.ConfigError, match="not a run directory"):
        registry.build("objective", {"plugin": "ddpm", "classifier": str(tmp_path)}, spec=spec, path=path)
    with pytest.raises(registry.ConfigError, match="classifier_unconditional"):
        registry.build("objective", {"plugin": "ddpm", "classifier_unconditional": True}, spec=spec, path=path)


def test_the_experiment_file_trains_a_classifier_that_guides_ddpm_digits(tmp_path):
    """experiments/ddpm_digits_classifier.toml runs (3 steps here) and its run is a valid classifier of
    experiments/ddpm_digits.toml's process; another step count is refused."""
    from pathlib import Path

    from core.build import build_components
    from core.config import load
    from core.run import run

    root = Path(__file__).resolve().parents[3] / "experiments"
    out = tmp_path / "classifier"
    summary = run(root / "ddpm_digits_classifier.toml", ["trainer.steps=3", "trainer.progress=off", "eval.untrained=false"],
                  out=out)
    assert set(summary["metrics"]) == {f"noisy_accuracy/{k}" for k in ("uniform", "t=0.9", "t=0.5", "t=0.1")}
    assert all(0.0 <= v <= 1.0 for v in summary["metrics"].values())
    guided = build_components(load(root / "ddpm_digits.toml", [f"objective.classifier={out}", "trainer.steps=1"]))
    assert type(guided.objective.classifier).__name__ == "UNetClassifier"
    with pytest.raises(registry.ConfigError, match="another process"):
        build_components(load(root / "ddpm_digits.toml", [f"objective.classifier={out}", "path.steps=500"]))


def test_noisy_accuracy_scores_each_level_at_its_step():
    """A classifier that answers class 0 exactly when its time input is above 0.7, on data of class 0 only:
    accuracy 1 at t = 0.9, 0 at t = 0.5 and 0.1, and the fraction of steps with t_k > 0.7 (k < 299) at
    uniform steps; the states it sees at t = 0.1 are q_sample's (x_0 = 0: std sqrt(1 - abar_k))."""

    class Data:
        def reference(self, n, generator):
            return {"x": torch.zeros(n, 1, 4, 4), "y": torch.zeros(n, dtype=torch.long)}

    spec = DataSpec((1, 4, 4), num_classes=2)
    path = registry.build("path", PATH, spec=spec)
    metric = registry.build("metric", {"plugin": "noisy_accuracy", "times": [0.9, 0.5, 0.1], "num_examples": 4000,
                                       "batch_size": 4000}, spec=spec, path=path)
    seen = []

    class Classifier(torch.nn.Module):
        def forward(self, x, t, y=None):
            seen.append((x, t))
            return torch.stack([(t > 0.7).float(), (t <= 0.7).float()], dim=1)

    acc = metric.evaluate(Classifier(), Data(), torch.Generator().manual_seed(0))
    assert acc["t=0.9"] == 1.0 and acc["t=0.5"] == 0.0 and acc["t=0.1"] == 0.0
    assert abs(acc["uniform"] - 299 / T) < 0.03, acc
    x, t = seen[-1]
    assert torch.all(t == torch.tensor(0.1, dtype=t.dtype))
    abar = float(path.diffusion.tables["alphas_cumprod"][T - int(round(0.1 * T)) - 1])
    assert abs(float(x.std()) - (1 - abar) ** 0.5) < 0.02
    with pytest.raises(registry.ConfigError, match="gaussian_diffusion"):
        registry.build("metric", {"plugin": "noisy_accuracy"}, spec=spec, path=None)
