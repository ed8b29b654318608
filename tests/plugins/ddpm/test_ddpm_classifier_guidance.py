"""Classifier guidance: with the exact classifier of noisy states and scale 1, the guided unconditional model is
the exact class-conditional model (Bayes' rule), for epsilon, x_start and v predictions; learned-variance channels
are untouched. Data: two Gaussian classes, every quantity in closed form here."""

from __future__ import annotations

import pytest
import torch

import registry
from core.interfaces import DataSpec
from plugins.ddpm.classifier_guidance import ClassifierGuidance

T = 100
MEANS = torch.tensor([[0.6, -0.4], [-0.5, 0.3]], dtype=torch.float64)
C = 0.3


def process(prediction, variance="fixed_small"):
    path = registry.build("path", {"plugin": "gaussian_diffusion", "schedule": "cosine", "steps": T,
                                   "prediction": prediction, "variance": variance}, spec=DataSpec((2,)))
    return path.diffusion


def coefficients(d, t):
    k = torch.round((1 - t) * T - 1).long()
    ab = d.tables["alphas_cumprod"][k][:, None]
    return ab.sqrt(), (1 - ab).sqrt()


def conditional(d, x, t):
    """(eps_y for both classes (2, B, D), p(y | x_t) (B, 2)): x_t | y ~ N(a m_y, (a^2 C^2 + s^2) I)."""
    a, s = coefficients(d, t)
    var = a ** 2 * C ** 2 + s ** 2
    eps = torch.stack([s * (x - a * m) / var for m in MEANS])
    logits = torch.stack([-((x - a * m) ** 2).sum(1, keepdim=True) / (2 * var) for m in MEANS], dim=-1)[:, 0]
    return eps, torch.softmax(logits, dim=-1), logits


def as_prediction(d, x, t, eps):
    a, s = coefficients(d, t)
    x0 = (x - s * eps) / a
    return {"epsilon": eps, "x_start": x0, "v": a * eps - s * x0}[d.prediction]


@pytest.mark.parametrize("prediction", ["epsilon", "x_start", "v"])
def test_exact_classifier_turns_the_unconditional_model_into_the_conditional_one(prediction):
    d = process(prediction)

    def unconditional(x, t, y=None):  # the mixture's epsilon: the posterior-weighted class epsilons
        eps, post, _ = conditional(d, x, t)
        return as_prediction(d, x, t, (post.T[:, :, None] * eps).sum(0))

    def classifier(x, t):
        return conditional(d, x, t)[2]

    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 2, generator=g, dtype=torch.float64)
    t = 1 - (torch.randint(T, (16,), generator=g).double() + 1) / T
    y = torch.randint(2, (16,), generator=g)
    guided = ClassifierGuidance(unconditional, classifier, d, 1.0)(x, t, y)
    eps_y = conditional(d, x, t)[0][y, torch.arange(16)]
    torch.testing.assert_close(guided, as_prediction(d, x, t, eps_y), rtol=1e-9, atol=1e-9)


def test_scale_zero_and_learned_variance_channels():
    d = process("epsilon", "learned_range")
    out = torch.randn(4, 4, dtype=torch.float64)
    model = lambda x, t, y=None: out  # noqa: E731
    classifier = lambda x, t: (x ** 2).sum(1, keepdim=True) * torch.tensor([1.0, -1.0], dtype=x.dtype)  # noqa: E731
    x, t, y = torch.randn(4, 2, dtype=torch.float64), torch.full((4,), 0.5, dtype=torch.float64), torch.tensor([0, 1, 0, 1])
    assert torch.equal(ClassifierGuidance(model, classifier, d, 0.0)(x, t, y), out)
    guided = ClassifierGuidance(model, classifier, d, 2.0)(x, t, y)
    assert torch.equal(guided[:, 2:], out[:, 2:]) and not torch.allclose(guided[:, :2], out[:, :2])


def test_ancestral_sampling_shifts_the_mean_by_scale_times_variance_times_gradient():
    """guided-diffusion's p_sample with cond_fn (condition_mean): mean + s Sigma grad log p(y | x_k). With the kept
    steps {0, T-1} ("2") and fixed_large, the first step's Sigma is beta' = 1 - abar_{T-1} / abar_0; a linear
    classifier ``logits = x W`` has ``grad log p(y | x) = W_y - sum_c softmax(x W)_c W_c``."""
    path = registry.build("path", {"plugin": "gaussian_diffusion", "schedule": "cosine", "steps": T,
                                   "variance": "fixed_large"}, spec=DataSpec((2,)))
    solver = registry.build("solver", {"plugin": "ddpm_ancestral", "respacing": "2", "clip_denoised": False},
                            path=path)
    w = torch.tensor([[1.0, -0.5, 0.2], [0.3, 0.8, -1.0]], dtype=torch.float64)
    model = lambda x, t, y=None: 0.3 * x  # noqa: E731
    classifier = lambda x, t: x @ w  # noqa: E731
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 2, generator=g, dtype=torch.float64), torch.randint(3, (8,), generator=g)

    def first_step(field):
        out = solver.sample(field, x, y=y, generator=torch.Generator().manual_seed(1), intermediates=True)
        return out.trajectory[1]

    scale = 2.5
    shifted = first_step(ClassifierGuidance(model, classifier, path.diffusion, scale)) - first_step(model)
    abar = path.diffusion.tables["alphas_cumprod"]
    sigma2 = 1 - abar[T - 1] / abar[0]
    grad = w.T[y] - torch.softmax(x @ w, dim=-1) @ w.T
    torch.testing.assert_close(shifted, scale * sigma2 * grad, rtol=1e-9, atol=1e-12)
