"""Guidance interval and CFG rescale (core.guidance), for the ddpm and flow-matching objectives; the rescale is
checked against diffusers' rescale_noise_cfg."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import registry
from core.guidance import ClassifierFreeGuidance, guide, guided
from core.interfaces import DataSpec
from registry import ConfigError

SPEC = DataSpec((2, 4), num_classes=3)


class Labelled(nn.Module):
    """A model whose output depends on x, t and the label (null label 3); counts the rows it sees."""

    def __init__(self, channels=2):
        super().__init__()
        self.channels, self.rows = channels, []

    def forward(self, x, t, y=None):
        self.rows.append(x.shape[0])
        out = torch.sin(x * (1.0 + y[:, None, None].to(x))) + t[:, None, None]
        return out.repeat(1, self.channels // x.shape[1], 1)


def parts(model, x, t, y):
    null = torch.full_like(y, 3)
    return model(x, t, y), model(x, t, null)


@pytest.mark.parametrize("w, phi", [(1.5, 0.7), (4.0, 1.0), (0.5, 0.0)])
def test_rescale_is_diffusers_rescale_noise_cfg(w, phi):
    from diffusers.guiders.guider_utils import rescale_noise_cfg

    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64), torch.randn(5, 3, 4, 4, generator=g,
                                                                                       dtype=torch.float64)
    theirs = uncond + (1.0 + w) * (cond - uncond)  # diffusers' guidance_scale is 1 + w
    torch.testing.assert_close(guide(cond, uncond, w, phi), rescale_noise_cfg(theirs, cond, phi), rtol=1e-12,
                               atol=1e-12)


def test_rescale_one_gives_the_conditional_std():
    g = torch.Generator().manual_seed(1)
    cond, uncond = torch.randn(4, 10, generator=g), torch.randn(4, 10, generator=g)
    torch.testing.assert_close(guide(cond, uncond, 3.0, 1.0).std(dim=1), cond.std(dim=1))


def test_interval_guides_inside_and_is_conditional_outside():
    model = Labelled()
    x = torch.randn(4, 2, 4, dtype=torch.float64)
    t = torch.tensor([0.1, 0.3, 0.6, 0.9], dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1])
    out = ClassifierFreeGuidance(model, 2.0, 3, interval=(0.25, 0.6))(x, t, y)
    cond, uncond = parts(model, x, t, y)
    expected = torch.where(torch.tensor([False, True, True, False])[:, None, None], 3 * cond - 2 * uncond, cond)
    torch.testing.assert_close(out, expected)


def test_interval_skips_the_unconditional_half_when_no_example_is_inside():
    model = Labelled()
    x, y = torch.randn(4, 2, 4), torch.tensor([0, 1, 2, 1])
    out = ClassifierFreeGuidance(model, 2.0, 3, interval=(0.5, 0.6))(x, torch.full((4,), 0.9), y)
    assert model.rows == [4]
    torch.testing.assert_close(out, model(x, torch.full((4,), 0.9), y))


def build_ddpm(variance="fixed_large", **options):
    path = registry.build("path", {"plugin": "gaussian_diffusion", "schedule": "cosine", "steps": 40,
                                   "variance": variance}, spec=SPEC)
    return registry.build("objective", {"plugin": "ddpm", **options}, spec=SPEC, path=path)


def build_flow(**options):
    scheduler = registry.build("scheduler", {"plugin": "cond_ot"})
    path = registry.build("path", {"plugin": "affine"}, scheduler=scheduler)
    return registry.build("objective", {"plugin": "flow_matching", **options}, spec=SPEC, path=path,
                          scheduler=scheduler)


@pytest.mark.parametrize("build", [build_ddpm, build_flow])
def test_objectives_apply_interval_and_rescale(build):
    objective = build(guidance_interval=[0.2, 0.8], guidance_rescale=0.5)
    model = Labelled()
    field = objective.sampling_model(guided(model, 2.0, SPEC.num_classes))
    x, y = torch.randn(3, 2, 4, dtype=torch.float64), torch.tensor([0, 1, 2])
    t = torch.tensor([0.1, 0.5, 0.7], dtype=torch.float64)
    cond, uncond = parts(model, x, t, y)
    inside = torch.tensor([False, True, True])[:, None, None]
    torch.testing.assert_close(field(x, t, y), torch.where(inside, guide(cond, uncond, 2.0, 0.5), cond))


def test_learned_variance_rescales_only_the_mean_channels():
    objective = build_ddpm("learned_range", guidance_rescale=1.0)
    model = Labelled(channels=4)
    field = objective.sampling_model(guided(model, 2.0, SPEC.num_classes))
    x, y, t = torch.randn(3, 2, 4), torch.tensor([0, 1, 2]), torch.full((3,), 0.5)
    out = field(x, t, y)
    cond, uncond = parts(model, x, t, y)
    torch.testing.assert_close(out[:, :2], guide(cond[:, :2], uncond[:, :2], 2.0, 1.0))
    torch.testing.assert_close(out[:, 2:], cond[:, 2:])


@pytest.mark.parametrize("build", [build_ddpm, build_flow])
@pytest.mark.parametrize("options, key", [({"guidance_interval": [0.6, 0.2]}, "guidance_interval"),
                                          ({"guidance_rescale": 1.5}, "guidance_rescale")])
def test_bad_guidance_options_are_config_errors(build, options, key):
    with pytest.raises(ConfigError) as info:
        build(**options)
    assert key in str(info.value)
