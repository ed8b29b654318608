"""Conditional discrete flow matching with classifier-free guidance, on both discrete paths.

One position, two classes with token laws q_0, q_1 and the null label's law (q_0 + q_1) / 2. For
one position the exact posterior is known in closed form on both paths (masked mixture: the data
law while masked, the token itself once revealed; metric path with ``add_likelihood``: logits
log q by Bayes' rule), so the model is exact and what is tested is the conditioning and guidance
machinery: unguided samples follow q_y, and guided ones the tilted law q_y^(1+w) / q_null^w
(normalised; exact for one masked position, whose one jump draws from the guided posterior, and
measured to agree as closely on the metric path), which moves mass towards the tokens that q_y
favours over the null law, the more the larger the scale.
"""

from __future__ import annotations

import pytest
import torch

import registry
from core.guidance import guided
from plugins.discrete_flow.metric_path import MetricInducedPath, token_distances
from plugins.discrete_flow.path import MixtureDiscretePath

V = 6
Q = torch.tensor([[0.30, 0.25, 0.20, 0.15, 0.06, 0.04],
                  [0.04, 0.06, 0.15, 0.20, 0.25, 0.30]], dtype=torch.float64)
Q_NULL = Q.mean(0)


class ExactConditional(torch.nn.Module):
    """Logits ``log q_y`` (``y = 2`` the null label) of one position, padded for a mask token."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.table = torch.cat([Q, Q_NULL[None]]).log().float()

    def forward(self, x, t, y):
        logits = torch.full((x.shape[0], 1, self.vocab), -1e9)
        logits[..., :V] = self.table[y][:, None, :]
        return logits


def make_path(kind: str):
    if kind == "mask":
        return MixtureDiscretePath(registry.build("scheduler", {"plugin": "cond_ot"}), V + 1, "mask", V)
    return MetricInducedPath(token_distances("absolute", V), 1.0, 1.0, add_likelihood=True)


@pytest.mark.parametrize("kind", ["mask", "metric"])
def test_guidance_sharpens_the_class_and_no_guidance_samples_its_law(kind):
    path = make_path(kind)
    solver = registry.build("solver", {"plugin": "discrete_euler", "steps": 64, "categorical_dtype": "float64"},
                            path=path)
    n = 6000
    y = torch.ones(n, dtype=torch.long)  # class 1 favours the high tokens
    favoured = (Q[1] > Q_NULL)  # tokens 3, 4, 5
    shares = {}
    for scale in (0.0, 1.0, 3.0):
        model = guided(ExactConditional(path.vocab_size), scale, num_classes=2)
        g = torch.Generator().manual_seed(0)
        x = solver.sample(model, path.sample_source((n, 1), generator=g), y=y, generator=g).x[:, 0]
        assert int(x.max()) < V  # never the mask
        freq = torch.bincount(x, minlength=V).double() / n
        shares[scale] = freq[favoured].sum().item()
        tilted = Q[1] ** (1 + scale) / Q_NULL**scale
        assert (freq - tilted / tilted.sum()).abs().max() < 0.03  # 5 sigma of a count of 6000 is about 0.03
    assert Q[1][favoured].sum() - 0.03 < shares[0.0] < shares[1.0] < shares[3.0]
    assert shares[3.0] > 0.95
