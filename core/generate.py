"""Generation and evaluation: the loops shared by the trainer and the CLI.

``generate`` draws ``x_0 ~ p_0`` from the path, and integrates the objective's
sampling field (optionally guided) with the solver. ``evaluate`` feeds
generated and held-out examples to the experiment's metrics; under several
processes each rank generates its own blocks of the one global set and the
samples are gathered before the metrics see them, so every number is the same
on 1, 2 or 8 processes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .collectives import Group, blocks, local_metrics, sync_allowed
from .data import derive_seed
from .data import generator as make_generator
from .build import Components
from .config import metric_names  # noqa: F401 - importable here as before
from .guidance import guided
from .interfaces import Batch, DataSource, SampleMetric, space_of


@torch.no_grad()
def generate(components: Components, model: nn.Module, n: int, generator: torch.Generator, *,
             labels: Tensor | None = None, guidance_scale: float = 0.0, batch_size: int = 1000,
             device: torch.device | str = "cpu") -> tuple[Batch, int]:
    """Generate `n` examples with ``model``.

    Returns ({"x": (n, ...), "y": (n,) when class-conditional}, model evaluations per batch).
    Class labels are drawn uniformly with `generator` unless `labels` are given.
    """
    spec, path, solver = components.spec, components.path, components.solver
    if solver is None or path is None:
        raise ValueError("this experiment has no [solver] and [path]: it cannot generate")
    was_training = model.training
    model.eval()
    if spec.num_classes > 0 and labels is None:
        labels = torch.randint(spec.num_classes, (n,), generator=generator)
    field = components.objective.sampling_model(guided(model, guidance_scale, spec.num_classes))
    xs, nfe = [], 0
    for start in range(0, n, batch_size):
        stop = min(n, start + batch_size)
        x0 = path.sample_source((stop - start, *spec.shape), generator=generator).to(device)
        y = labels[start:stop].to(device) if labels is not None else None
        result = solver.sample(field, x0, y=y, generator=generator)
        xs.append(result.x.cpu())
        nfe = result.nfe
    model.train(was_training)
    out: dict[str, Tensor] = {"x": torch.cat(xs) if xs else torch.empty(0, *spec.shape)}
    if labels is not None:
        out["y"] = labels
    return out, nfe


def _to_floats(name: str, value: Any) -> dict[str, float]:
    if isinstance(value, Mapping):
        return {f"{name}/{k}": float(v) for k, v in value.items()}
    return {name: float(value)}


def sample_metrics_of(components: Components) -> dict[str, SampleMetric]:
    """The metrics that compare generated with held-out samples (model metrics have ``evaluate``)."""
    return {k: m for k, m in components.metrics.items() if isinstance(m, SampleMetric) and not hasattr(m, "evaluate")}


def _compute_sample_metrics(metrics: Mapping[str, SampleMetric], real: Tensor, fake: Tensor,
                            group: Group, observed: tuple[Tensor, Tensor] | None = None) -> dict[str, float]:
    """Every metric on the gathered ``real`` and ``fake`` (the same on every rank), or on their observations
    `observed` = (real, fake) for the metrics with ``space = "observations"``: computed once, on rank 0,
    without the metrics' own cross-process synchronisation, and broadcast."""
    out: dict[str, float] = {}
    if group.is_main:
        with local_metrics():
            for name, metric in metrics.items():
                if hasattr(metric, "distributed_available_fn"):
                    metric.distributed_available_fn = sync_allowed
                a, b = observed if observed is not None and space_of(metric) == "observations" else (real, fake)
                metric.reset()
                metric.update(a, real=True)
                metric.update(b, real=False)
                out.update(_to_floats(name, metric.compute()))
                metric.reset()
    return group.broadcast(out)


def _reference(data: DataSource, n: int, seed: int, parts: list[tuple[int, int]], group: Group, *keys: Any,
               observed: bool = False) -> tuple[Tensor, Tensor | None]:
    """Rows ``0 .. n - 1`` of one global held-out selection (seeded by `seed` and `keys`), each rank reading
    its `parts`, gathered in global order: the same set on any number of processes. Returns (examples,
    their observations when `observed`, else None)."""
    selection = derive_seed(seed, *keys)
    xs, seen = [], []
    for a, b in parts:
        batch = data.reference_slice(n, selection, a, b)
        xs.append(batch["x"])
        if observed:
            seen.append(data.observations(batch))
    x = group.gather_cat(torch.cat(xs) if xs else torch.empty(0))
    return x, (group.gather_cat(torch.cat(seen) if seen else torch.empty(0)) if observed else None)


def reference_examples(data: DataSource, n: int, seed: int, *, batch_size: int = 1000, rank: int = 0,
                       world_size: int = 1) -> Tensor:
    """The `n` held-out examples ``(n, ...)`` that `evaluate` compares `n` generated ones with (seed `seed`),
    read in blocks of `batch_size` shared by the ranks and gathered: the same on any number of processes."""
    group = Group(rank, world_size)
    return _reference(data, n, seed, blocks(n, batch_size, rank, world_size), group, "eval-reference")[0]


def evaluate(components: Components, model: nn.Module, n: int, seed: int, *, rank: int = 0, world_size: int = 1,
             guidance_scale: float = 0.0, batch_size: int = 1000, device: torch.device | str = "cpu") -> dict[str, float]:
    """Every metric of the experiment for `model`: `n` generated vs `n` held-out examples (sample metrics)
    and the model metrics.

    The `n` examples are cut into blocks of `batch_size`; block ``[a, b)`` is generated from its own
    generator (seeded by `seed` and `a`) and compared with rows ``a .. b - 1`` of one global held-out
    selection, and the ranks share whole blocks (`core.collectives.blocks`). So the generated and the
    reference sets, and hence every sample metric, do not depend on the number of processes.
    """
    out: dict[str, float] = {}
    sample_metrics = sample_metrics_of(components)
    if sample_metrics and components.can_generate:
        group, data = Group(rank, world_size), components.data
        parts = blocks(n, batch_size, rank, world_size)
        observed = any(space_of(m) == "observations" for m in sample_metrics.values())
        fake = [generate(components, model, b - a, make_generator(seed, "eval-generate", a),
                         guidance_scale=guidance_scale, batch_size=batch_size, device=device)[0]["x"] for a, b in parts]
        seen = [data.observations({"x": x}) for x in fake] if observed else []  # each rank decodes its blocks
        fake_all = group.gather_cat(torch.cat(fake) if fake else torch.empty(0))
        real_all, real_seen = _reference(data, n, seed, parts, group, "eval-reference", observed=observed)
        pair = (real_seen, group.gather_cat(torch.cat(seen) if seen else torch.empty(0))) if observed else None
        out.update(_compute_sample_metrics(sample_metrics, real_all, fake_all, group, pair))
    for name, metric in components.metrics.items():
        if hasattr(metric, "evaluate"):
            out.update(_to_floats(name, metric.evaluate(model, components.data, make_generator(seed, "eval-model", rank))))
    return out


def floor(components: Components, n: int, seed: int, *, rank: int = 0, world_size: int = 1,
          batch_size: int = 1000) -> dict[str, float]:
    """Sample metrics between two independent held-out selections of size `n`: the best a model can score.
    Like `evaluate`, the same on any number of processes."""
    sample_metrics = sample_metrics_of(components)
    if not sample_metrics:
        return {}
    group = Group(rank, world_size)
    parts = blocks(n, batch_size, rank, world_size)
    observed = any(space_of(m) == "observations" for m in sample_metrics.values())
    a, a_seen = _reference(components.data, n, seed, parts, group, "floor-a", observed=observed)
    b, b_seen = _reference(components.data, n, seed, parts, group, "floor-b", observed=observed)
    return _compute_sample_metrics(sample_metrics, a, b, group, (a_seen, b_seen) if observed else None)
