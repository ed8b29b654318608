"""The `unet` and `dit` backbones pass the backbone conformance kit (core/testing/backbones.py)
for every kind of data they take."""

from __future__ import annotations

import pytest
import torch

import registry
from core.interfaces import DataSpec
from core.testing.backbones import check_backbone


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


DIGITS = DataSpec(shape=(1, 8, 8), num_classes=10)
CASES = [
    ("unet", {"preset": "digits", "num_res_blocks": 1}, DIGITS, None),
    ("unet", {"preset": "digits", "num_res_blocks": 1, "learn_sigma": True, "resblock_updown": True},
     DataSpec(shape=(3, 8, 8)), (6, 8, 8)),
    ("unet", {"preset": "digits", "num_res_blocks": 1},
     DataSpec(shape=(1, 8, 8), kind="discrete", vocab_size=17, num_classes=10), None),
    ("dit", {"preset": "DiT-digits", "depth": 2}, DIGITS, None),
    ("dit", {"preset": "DiT-digits", "depth": 2, "learn_sigma": True}, DataSpec(shape=(4, 16, 16)), (8, 16, 16)),
    ("dit", {"preset": "DiT-digits", "depth": 2},
     DataSpec(shape=(3, 8, 8), kind="discrete", vocab_size=17, num_classes=10), None),
    ("dit", {"preset": "DiT-digits", "depth": 2, "patch_size": 1},
     DataSpec(shape=(24,), kind="discrete", vocab_size=30), None),
]


@pytest.mark.parametrize("plugin,options,spec,out_shape", CASES,
                         ids=[f"{c[0]}-{c[2].kind}-{'x'.join(map(str, c[2].shape))}" for c in CASES])
def test_backbone_conformance(plugin, options, spec, out_shape):
    torch.manual_seed(0)
    model = registry.build("backbone", {"plugin": plugin, **options}, spec=spec)
    check_backbone(model, spec, name=plugin, out_shape=out_shape)
