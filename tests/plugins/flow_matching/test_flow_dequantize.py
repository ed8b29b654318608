"""Dequantised bits per dimension (plugins/flow_matching/dequantize.py) against a Gaussian's closed form.

Reference: for a density ``N(mu, s^2)`` on the [-1, 1] scale and a level ``k`` whose bin has centre ``c`` and
width ``d = 2 / 256``, ``E_u[-log p(x~)] = log(s sqrt(2 pi)) + ((c - mu)^2 + d^2 / 12) / (2 s^2)`` (the mean and
variance of the uniform on the bin), and the level's exact probability is the normal mass of the bin.
"""

from __future__ import annotations

import math

import pytest
import torch

import registry
from core.data import TensorDataSource
from core.interfaces import DataSpec
from plugins.flow_matching.analytic import GaussianFlow
from plugins.flow_matching.dequantize import dequantize, dequantized_bits_per_dim, to_levels
from plugins.flow_matching.scheduler import CondOTScheduler


def test_levels_round_trip_the_data_scaling():
    k = torch.arange(256)
    assert torch.equal(to_levels(k / 127.5 - 1), k)
    x = dequantize(k, torch.full((256,), 0.5, dtype=torch.float64), dtype=torch.float64)
    assert torch.allclose(x, 2 * (k.double() + 0.5) / 256 - 1) and float(x.min()) > -1 and float(x.max()) < 1


def test_dequantised_bpd_of_a_gaussian_matches_the_closed_form_and_bounds_the_discrete_nll():
    mu, s, d = 0.1, 0.3, 2 / 256
    levels = torch.tensor([60, 128, 140, 200])
    u = torch.rand(200000, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = dequantize(levels.expand(200000, 4), u, dtype=torch.float64)
    log_p = -0.5 * ((x - mu) / s) ** 2 - math.log(s * math.sqrt(2 * math.pi))  # per dimension
    bpd = dequantized_bits_per_dim(log_p.mean(0), 1)  # (4,): each level as 1-dimensional data
    centre = 2 * (levels.double() + 0.5) / 256 - 1
    closed = (math.log(s * math.sqrt(2 * math.pi)) + ((centre - mu) ** 2 + d * d / 12) / (2 * s * s)) / math.log(2) + 7
    assert torch.allclose(bpd, closed, atol=2e-4)
    lo, hi = 2 * levels.double() / 256 - 1, 2 * (levels.double() + 1) / 256 - 1
    normal = torch.distributions.Normal(torch.tensor(mu, dtype=torch.float64), torch.tensor(s, dtype=torch.float64))
    discrete = -torch.log2(normal.cdf(hi) - normal.cdf(lo))
    # Jensen: an upper bound, tight to second order in d (gap ~ (c - mu)^2 d^2 / (24 s^4 ln 2) bits)
    gap = closed - discrete
    assert (gap >= -1e-12).all() and (gap < ((centre - mu) ** 2 * d * d / (24 * s ** 4 * math.log(2))) * 1.5 + 1e-6).all()


def test_likelihood_metric_reports_the_dequantised_bpd():
    """The metric on 8-bit levels of Gaussian data, with the exact field: its bpd is the closed-form density's
    dequantised bpd of the same dequantised points (7 bits above the undequantised scale)."""
    g = torch.Generator().manual_seed(1)
    mean, cov = torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64), torch.diag(torch.tensor([0.09, 0.16, 0.04],
                                                                                               dtype=torch.float64))
    flow = GaussianFlow(mean, cov, CondOTScheduler())
    held = (to_levels(flow.sample(32, g).clamp(-1, 1)) / 127.5 - 1).to(torch.float64)
    data = TensorDataSource({"x": held}, {"x": held}, DataSpec(shape=(3,)))
    metric = registry.build("metric", {"plugin": "likelihood", "dequantize": True, "num_samples": 32,
                                       "dtype": "float64", "rtol": 1e-9, "atol": 1e-9}, spec=data.spec)
    got = metric.evaluate(flow, data, torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(5)  # the same draws: the reference selection, then the dequantisation
    ref = data.reference(32, gen)["x"]
    x = dequantize(to_levels(ref), torch.rand(ref.shape, generator=gen, dtype=torch.float64), dtype=torch.float64)
    expected = dequantized_bits_per_dim(flow.log_prob(x), 3).mean()
    assert got["bpd"] == pytest.approx(float(expected), abs=1e-5)
    plain = registry.build("metric", {"plugin": "likelihood", "num_samples": 32, "dtype": "float64"}, spec=data.spec)
    assert got["bpd"] - plain.evaluate(flow, data, torch.Generator().manual_seed(5))["bpd"] == pytest.approx(7, abs=0.2)
