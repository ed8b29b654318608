"""The mlp backbone's input positional encoding (``input_freqs``, ``input_scale``)."""

from __future__ import annotations

import math

import pytest
import torch

from core.interfaces import DataSpec
from plugins.mlp.model import MLP, MLPConfig
from registry import ConfigError


def test_default_is_the_plain_input():
    model = MLP(MLPConfig(hidden=8, depth=1, time_dim=4), DataSpec(shape=(2,)))
    assert model.layers[0].in_features == 2 + 4
    assert "freqs" not in model.state_dict()  # old checkpoints still load


def test_encoding_widens_the_input_and_uses_sin_cos_of_doubling_frequencies():
    config = MLPConfig(hidden=8, depth=2, time_dim=4, input_freqs=3, input_scale=2.0)
    model = MLP(config, DataSpec(shape=(2,)))
    assert model.layers[0].in_features == 2 * (1 + 2 * 3) + 4
    assert torch.allclose(model.freqs, torch.tensor([0.5, 1.0, 2.0]))
    seen = {}
    model.layers[0].register_forward_pre_hook(lambda m, inp: seen.setdefault("h", inp[0]))
    x = torch.tensor([[math.pi, 0.0]])
    assert model(x, torch.tensor([0.5])).shape == (1, 2)
    h = seen["h"][0, :14]
    args = torch.tensor([math.pi * 0.5, math.pi, 2 * math.pi, 0.0, 0.0, 0.0])  # per coordinate, then frequency
    assert torch.allclose(h, torch.cat([x[0], torch.sin(args), torch.cos(args)]), atol=1e-6)


def test_invalid_options_are_refused():
    with pytest.raises(ConfigError):
        MLPConfig(input_freqs=-1)
    with pytest.raises(ConfigError):
        MLPConfig(input_scale=0.0)
    with pytest.raises(ConfigError):
        MLP(MLPConfig(input_freqs=2), DataSpec(shape=(4,), kind="discrete", vocab_size=3))
