"""off_support: the mass a model puts outside the data's support (checkerboard squares vs blobs)."""

import math

import pytest
import torch

from core import config
from core.trainer import build_components
from registry import ConfigError


def _components(dataset="checkerboard"):
    exp = config.load("experiments/rectified_flow_2d.toml",
                      [f"data.dataset={dataset!r}".replace("'", '"'), 'metrics=[{plugin="off_support"}]'])
    return build_components(exp)


def _reference_in_support(x):
    """The checkerboard of sample_toy2d written out: 2x2 cells of [-4, 4)^2 whose row and column have equal parity."""
    out = []
    for a, b in x.tolist():
        i, j = math.floor(a / 2), math.floor(b / 2)
        out.append(-4 <= a < 4 and -4 <= b < 4 and (i - j) % 2 == 0)
    return torch.tensor(out)


def test_data_has_no_mass_off_support_and_uniform_points_have_half():
    c = _components()
    data = c.data.reference(5000, torch.Generator().manual_seed(0))["x"]
    assert bool(c.data.in_support(data).all())
    metric = c.metrics["off_support"]
    metric.update(data, False)
    assert metric.compute()["fraction"] == 0
    metric.reset()
    square = torch.rand(40000, 2, generator=torch.Generator().manual_seed(1)) * 8 - 4
    metric.update(square, False)
    out = metric.compute()
    assert abs(out["fraction"] - 0.5) < 4 * out["se"]
    assert torch.isclose(out["se"], torch.sqrt(out["fraction"] * (1 - out["fraction"]) / 40000))


def test_support_matches_an_independent_reference():
    c = _components()
    x = torch.randn(3000, 2, generator=torch.Generator().manual_seed(2)) * 3
    assert torch.equal(c.data.in_support(x), _reference_in_support(x))


def test_blurred_squares_are_separated_while_distances_hardly_move():
    """Blurring the squares (a model that rounds corners) shows in off_support far beyond its error bar."""
    c = _components()
    data = c.data.reference(8000, torch.Generator().manual_seed(3))["x"]
    blurred = data + 0.15 * torch.randn(data.shape, generator=torch.Generator().manual_seed(4))
    metric = c.metrics["off_support"]
    metric.update(blurred, False)
    out = metric.compute()
    assert out["fraction"] > 0.05 and out["fraction"] > 20 * out["se"]


def test_data_without_a_bounded_support_is_a_config_error():
    with pytest.raises(ConfigError, match="known support"):
        _components("moons")
