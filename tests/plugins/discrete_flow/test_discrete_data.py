"""Data and metrics of the discrete flow experiments: text, quantised 2D data, the mask token, the NLL bound."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

import registry
from core.interfaces import DataSpec
from core.testing.data import check_data_source
from core.testing.metrics import check_model_metric, check_sample_metric
from plugins.data.text import ALPHABET, encode
from plugins.discrete_flow.metrics import DiscreteELBO, ELBOConfig, hidden_positions
from plugins.discrete_flow.path import MixtureDiscretePath
from registry import ConfigError


@pytest.fixture(scope="module")
def text():
    return registry.build("data", {"plugin": "text", "seq_len": 32, "mask_token": True,
                                   "files": ["bisect.py", "heapq.py"]})


def test_text_source_conforms(text):
    check_data_source(text, name="text")
    assert text.spec.shape == (32,) and text.spec.vocab_size == 97 and text.spec.extra["mask_token"] == 96


def test_text_round_trip_and_decoding(text):
    sample = "def f(x):\n    return x  # \u00e9"
    assert text.decode(encode(sample)) == sample[:-1] + "?"
    tokens = encode("abcdef")
    hidden = torch.tensor([False, True, True, False, False, True])
    assert text.decode(tokens, hidden=hidden) == "a\u00abbc\u00bbde\u00abf\u00bb"
    assert text.decode(tokens, hidden=hidden, blank=True) == "a\u00ab\u2588\u2588\u00bbde\u00ab\u2588\u00bb"
    assert text.decode(torch.tensor([96, 0])) == "\u2588\n"
    assert len(ALPHABET) == 96


def test_text_render_writes_samples_and_attachments(text, tmp_path):
    x = text.reference(3, torch.Generator().manual_seed(0))["x"]
    text.attach("infill", "example")
    files = text.render({"x": x}, str(tmp_path / "final"))
    assert files == [str(tmp_path / "final.txt"), str(tmp_path / "final-infill.txt")]
    assert text.decode(x[2]) in (tmp_path / "final.txt").read_text(encoding="utf-8")
    assert (tmp_path / "final-infill.txt").read_text(encoding="utf-8") == "example"


def test_text_config_errors():
    with pytest.raises(ConfigError, match="no file"):
        registry.build("data", {"plugin": "text", "files": ["no_such_module.py"]})
    with pytest.raises(ConfigError, match="seq_len"):
        registry.resolved("data", {"plugin": "text", "seq_len": 1})


def test_toy2d_discrete_conforms_and_quantises():
    data = registry.build("data", {"plugin": "toy2d_discrete", "bins": 128})
    check_data_source(data, name="toy2d_discrete")
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1000, 2, generator=g) * 8 - 4
    k = data.quantize(x)
    assert k.min() >= 0 and k.max() < 128
    assert (data.dequantize(k) - x).abs().max() <= 4 / 128 + 1e-6
    assert torch.equal(data.quantize(data.dequantize(k)), k)
    masked = registry.build("data", {"plugin": "toy2d_discrete", "mask_token": True})
    assert masked.spec.vocab_size == 129 and masked.spec.extra["mask_token"] == 128


def test_with_mask_token_wraps_any_discrete_source():
    data = registry.build("data", {"plugin": "with_mask_token", "data": {"plugin": "digits", "form": "discrete"}})
    check_data_source(data, name="with_mask_token", exact_partition=True)
    assert data.spec.vocab_size == 18 and data.spec.extra["mask_token"] == 17 and data.spec.num_classes == 10
    assert data.config.form == "discrete"  # other attributes pass through
    assert data.num_examples == data.inner.num_examples > 0  # so that epochs = N works on the wrapped source
    resolved = registry.resolved("data", {"plugin": "with_mask_token", "data": {"plugin": "digits", "form": "discrete"}})
    assert resolved["data"]["held_out"] == 0.2  # the wrapped source's defaults are filled in
    with pytest.raises(ConfigError, match="discrete"):
        registry.build("data", {"plugin": "with_mask_token", "data": {"plugin": "digits"}})
    with pytest.raises(ConfigError, match=r"data\.form"):
        registry.resolved("data", {"plugin": "with_mask_token", "data": {"plugin": "digits", "form": "binary"}})


# --------------------------------------------------------------------------- metrics
def test_dequantized_metric_is_in_the_units_of_the_continuous_data():
    data = registry.build("data", {"plugin": "toy2d_discrete"})
    metric = registry.build("metric", {"plugin": "dequantized", "metric": {"plugin": "energy_distance"}},
                            spec=data.spec, data=data)
    check_sample_metric(metric, data.reference(64, torch.Generator().manual_seed(0))["x"], best_value=0.0,
                        other=data.reference(64, torch.Generator().manual_seed(1))["x"] + 3, name="dequantized")
    # energy distance is translation invariant and scales linearly: bin centres = 8/128 * tokens + const
    a = data.reference(300, torch.Generator().manual_seed(2))["x"]
    b = data.reference(300, torch.Generator().manual_seed(3))["x"]
    plain = registry.build("metric", {"plugin": "energy_distance"})
    metric.reset()
    for m in (metric, plain):
        m.update(a, real=True)
        m.update(b, real=False)
    assert metric.compute().item() == pytest.approx(plain.compute().item() * 8 / 128, rel=1e-9)
    with pytest.raises(ConfigError, match="bins"):
        registry.build("metric", {"plugin": "dequantized", "metric": {"plugin": "energy_distance"}},
                       spec=DataSpec(shape=(2,), kind="discrete", vocab_size=4), data=None)


class ExactPosterior(torch.nn.Module):
    """The exact posterior of a one-position data law ``q`` on the mixture path (cond_ot), as logits."""

    def __init__(self, path: MixtureDiscretePath, q: torch.Tensor):
        super().__init__()
        self.path, self.q = path, q
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t, y=None):
        v, n = self.path.vocab_size, self.path.data_vocab
        q = F.pad(self.q, (0, v - n))
        z = x[:, 0]
        p0 = self.path.source_probs(dtype=torch.float64)
        joint = q[None] * (t.double()[:, None] * F.one_hot(z, v).double() + (1 - t.double())[:, None] * p0[z][:, None])
        return torch.log(joint / joint.sum(-1, keepdim=True)).float()[:, None, :]


class OneToken:
    """A data source of single tokens drawn from ``q``."""

    def __init__(self, q: torch.Tensor, vocab: int):
        self.q, self.spec = q, DataSpec(shape=(1,), kind="discrete", vocab_size=vocab)

    def reference(self, n, generator):
        return {"x": torch.multinomial(self.q, n, replacement=True, generator=generator)[:, None]}


@pytest.mark.parametrize("source", ["mask", "uniform"])
def test_elbo_of_the_exact_posterior_bounds_the_entropy(source):
    """One position: with the mask source the bound is tight (equals -log q(x_1) in expectation),
    with the uniform source it is at least the entropy."""
    n = 5
    q = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05], dtype=torch.float64)
    mask = n if source == "mask" else None
    path = MixtureDiscretePath(registry.build("scheduler", {"plugin": "cond_ot"}), n + (mask is not None), source, mask)
    metric = DiscreteELBO(ELBOConfig(num_examples=20000, times=16, batch_size=20000), path)
    out = metric.evaluate(ExactPosterior(path, q), OneToken(q, path.vocab_size), torch.Generator().manual_seed(0))
    entropy = -(q * q.log()).sum().item()
    slack = 4 * out["bits_per_token_stderr"] * math.log(2)
    assert out["nats_per_token"] >= entropy - slack
    if source == "mask":
        assert out["nats_per_token"] == pytest.approx(entropy, abs=slack)
    assert out["bits_per_token"] == pytest.approx(out["nats_per_token"] / math.log(2))


def test_elbo_and_infill_metrics_conform(text):
    spec = text.spec
    torch.manual_seed(0)
    model = registry.build("backbone", {"plugin": "mlp", "hidden": 16, "depth": 1}, spec=spec)
    tables = {"path": {"plugin": "mixture_discrete", "source": "mask"}, "scheduler": {"plugin": "cond_ot"}}
    elbo = registry.build("metric", {"plugin": "discrete_elbo", **tables, "num_examples": 8, "times": 2}, spec=spec,
                          data=text)
    check_model_metric(elbo, model, text, name="discrete_elbo")
    infill = registry.build("metric", {"plugin": "discrete_infill", **tables, "num_examples": 4, "steps": 3},
                            spec=spec, data=text)
    check_model_metric(infill, model, text, name="discrete_infill")
    assert "===== example 3 =====" in text.attached["infill"]
    with pytest.raises(ConfigError, match="path"):
        registry.build("metric", {"plugin": "discrete_elbo"}, spec=spec, data=text)
    with pytest.raises(ConfigError, match=r"path\.source"):
        registry.resolved("metric", {"plugin": "discrete_elbo", "path": {"plugin": "mixture_discrete", "source": "x"}})


def test_hidden_positions():
    g = torch.Generator().manual_seed(0)
    spans = hidden_positions((50, 40), 0.25, g)
    assert torch.all(spans.sum(1) == 10)
    starts = spans.float().argmax(1)
    assert torch.all(spans[torch.arange(50)[:, None], starts[:, None] + torch.arange(10)])
    scattered = hidden_positions((2000, 1, 4, 4), 0.3, g)
    assert abs(scattered.float().mean().item() - 0.3) < 0.02
