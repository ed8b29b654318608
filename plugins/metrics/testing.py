"""The conformance check of the ``feature_extractor`` kind, for first- and third-party extractors."""

from __future__ import annotations

import json
from typing import Any

import torch

from core.interfaces import DataSpec


def _examples(spec: DataSpec, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if spec.kind == "discrete":
        return torch.randint(spec.vocab_size, (n, *spec.shape), generator=g)
    return torch.rand(n, *spec.shape, generator=g) * 2 - 1


def check_feature_extractor(extractor: Any, spec: DataSpec, n: int = 6, atol: float = 1e-5) -> None:
    """Assert what the feature metrics rely on, for examples ``(n, *spec.shape)`` of `spec`.

    * ``extractor(x)`` is a finite floating tensor ``(n, F)`` with the same ``F`` for any batch;
    * each row depends only on its own example: a batch of one gives that example's row (to `atol`),
      and the same examples give the same features (deterministic);
    * ``identity``, when the extractor has one, is JSON-serialisable (it keys the reference cache).
    """
    x = _examples(spec, n, seed=0)
    f = extractor(x)
    assert isinstance(f, torch.Tensor) and f.is_floating_point(), f"features must be a float tensor, got {type(f)}"
    assert f.ndim == 2 and f.shape[0] == n, f"features must be (B, F) = ({n}, F), got {tuple(f.shape)}"
    assert bool(torch.isfinite(f).all()), "features must be finite"
    torch.testing.assert_close(extractor(x), f, rtol=0, atol=0, msg="the same examples must give the same features")
    single = extractor(x[1:2])
    assert single.shape == (1, f.shape[1]), f"one example must give (1, {f.shape[1]}), got {tuple(single.shape)}"
    torch.testing.assert_close(single.double(), f[1:2].double(), rtol=1e-4, atol=atol,
                               msg="a row must depend on its example alone (no batch statistics)")
    identity = getattr(extractor, "identity", None)
    if identity is not None:
        json.dumps(identity)
