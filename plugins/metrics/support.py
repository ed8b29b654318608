"""Mass outside the data's support: what a scatter plot shows and a distance can hide.

For a data source that knows where its density is positive (``in_support(x) -> (N,) bool``, e.g.
the checkerboard), the metric is the fraction of generated samples that fall outside it,

    p_off = #{i : x_i not in supp(p_data)} / N,        se = sqrt(p_off (1 - p_off) / N),

whose data floor is exactly 0. A model that rounds the checkerboard's squares into blobs spills
mass over the cell edges and corners; energy distance and sliced Wasserstein, averaging over all
pairs, barely move. Reported as ``off_support/fraction`` and its binomial standard error ``off_support/se``.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from registry import ConfigError


class OffSupport(Metric):
    higher_is_better = False
    full_state_update = False

    def __init__(self, in_support, **kwargs):
        super().__init__(**kwargs)
        self.in_support = in_support
        self.add_state("outside", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, samples: Tensor, real: bool) -> None:
        if real:
            return  # the support is known in closed form: no reference sample needed
        inside = self.in_support(samples.detach().reshape(samples.shape[0], -1).cpu())
        self.outside += (~inside).sum().double()
        self.count += inside.numel()

    def compute(self) -> dict[str, Tensor]:
        if self.count == 0:
            raise ValueError("off_support needs generated samples")
        p = self.outside / self.count
        return {"fraction": p, "se": torch.sqrt(p * (1 - p) / self.count)}


def make_off_support(data) -> OffSupport:
    """Metric factory for ``plugin = "off_support"``; the data source must know its support."""
    probe = getattr(data, "in_support", None)
    if probe is None or probe(torch.zeros(1, *data.spec.shape)) is None:
        raise ConfigError(f"off_support needs a data set with a bounded, known support (in_support); "
                          f"{type(data).__name__} has none", ("plugin",))
    return OffSupport(probe)
