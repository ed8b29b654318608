"""Reflow (Liu et al. 2023, "Flow straight and fast"): couplings from a trained flow.

A trained rectified flow (1-RF) transports noise ``x_0`` to ``x_1 = ODE(x_0)``.
Training a new flow on the *coupled* pairs ``(x_0, x_1)`` instead of
independent ones gives the 2-rectified flow (2-RF), whose paths are straighter,
so few-step and one-step (one euler step: ``x_1 = x_0 + u(x_0, 0)``) samples
improve. Repeating gives k-RF.

``reflow_pairs`` is a data source: ``run = "runs/my-1rf"`` names a finished
run directory, loaded with `core.runs.load_run` (its components rebuilt, the
latest checkpoint's EMA weights or raw weights loaded), and ``num_pairs``
couplings are generated with the run's own ``[solver]`` (keys of ``solver``
override it, e.g. ``{method = "rk4", steps = 50}``) and sampling field (``objective.sampling_model``, optionally
guided). Class-conditional runs draw labels uniformly and generate
``x_1 | y``. The pairs are cached in
``<run>/reflow/pairs-<key>.pt`` (``key`` hashes everything that determines
them), so a second experiment reuses them.

Training batches are ``{"x": x_1, "x0": x_0}`` (plus ``"y"``): flow-matching
objectives use ``batch["x0"]`` as the source when present. Held-out reference
examples come from the original run's data source, so sample metrics compare
with the true data, not with the 1-RF's samples; so does the training data of a
metric's trained feature network (`DataSource.evaluation_data`), so the 1-RF and its
reflows are scored in one feature space.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import attrs
import torch

from core import checkpoint as ckpt
from core.data import TensorDataSource
from core.data import generator as make_generator
from core.interfaces import Batch, DataSource
from core.runs import LoadedRun, load_run, solver_overrides
from registry import ConfigError


@attrs.define
class ReflowPairsConfig:
    """Options of the reflow_pairs data source.

    Attributes:
        run: the run directory of the trained flow to rectify (holds config.toml and checkpoints/).
        num_pairs: number of (noise, sample) couplings generated.
        batch_size: couplings generated per solver call.
        solver: keys overriding the run's [solver] section for generation (e.g. {method = "rk4", steps = 50}).
        guidance_scale: classifier-free guidance scale for class-conditional runs.
        use_ema: use the checkpoint's EMA weights (when it has them).
        seed: seed of the noise (and labels) of the couplings.
        device: where to generate: "auto" (CUDA when available), "cpu" or "cuda".
        cache: reuse / write the cached pairs file in the run directory.
    """

    run: str
    num_pairs: int = 20000
    batch_size: int = 5000
    solver: dict[str, Any] = attrs.Factory(dict)
    guidance_scale: float = 0.0
    use_ema: bool = True
    seed: int = 0
    device: str = "auto"
    cache: bool = True

    def __attrs_post_init__(self) -> None:
        if self.num_pairs < 1:
            raise ConfigError(f"expected a positive integer, got {self.num_pairs}", ("num_pairs",))
        if self.batch_size < 1:
            raise ConfigError(f"expected a positive integer, got {self.batch_size}", ("batch_size",))
        if "plugin" in self.solver:
            raise ConfigError("overrides the run's solver options; the plugin stays the run's", ("solver", "plugin"))


def load_source(config: ReflowPairsConfig) -> LoadedRun:
    """The run to rectify (`core.runs.load_run`), with the ``solver`` overrides, on ``config.device``."""
    try:
        return load_run(config.run, solver_overrides(**config.solver), ema=config.use_ema, device=config.device)
    except ConfigError as exc:
        raise ConfigError(f"cannot load the run to rectify ({exc}); train the flow to rectify first, "
                          f"e.g. python -m core.run experiments/reflow_2d_1rf.toml", ("run",)) from None


class ReflowPairs(TensorDataSource):
    """See the module docstring. ``spec`` is the original run's data spec."""

    def __init__(self, config: ReflowPairsConfig):
        self.config = config
        loaded = load_source(config)
        exp, components, ckpt_path = loaded.exp, loaded.components, loaded.checkpoint
        if components.solver is None or components.path is None:
            raise ConfigError(f"run {config.run} has no [solver] and [path]: it cannot generate couplings", ("run",))
        self.source: DataSource = components.data
        key = {
            "checkpoint": ckpt_path.name, "checkpoint_bytes": ckpt_path.stat().st_size,
            "solver": exp.components["solver"], "path": exp.components.get("path"),
            "scheduler": exp.components.get("scheduler"), "num_pairs": config.num_pairs,
            "guidance_scale": config.guidance_scale, "use_ema": config.use_ema, "seed": config.seed,
        }
        digest = hashlib.blake2b(json.dumps(key, sort_keys=True, default=str).encode(), digest_size=8).hexdigest()
        self.cache_file = Path(config.run) / "reflow" / f"pairs-{digest}.pt"
        pairs = self._load_cache() if config.cache else None
        if pairs is None:
            pairs = self._generate(components, loaded.model, loaded.device)
            if config.cache:
                ckpt.save_atomic(pairs, self.cache_file)
        self.pairs = pairs
        train = {"x": pairs["x1"], "x0": pairs["x0"]}
        if "y" in pairs:
            train["y"] = pairs["y"]
        super().__init__(train, train, components.spec)

    def _load_cache(self) -> dict[str, torch.Tensor] | None:
        if not self.cache_file.is_file():
            return None
        try:
            pairs = torch.load(self.cache_file, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - a broken cache is regenerated
            return None
        if not isinstance(pairs, dict) or len(pairs.get("x0", ())) != self.config.num_pairs:
            return None
        return pairs

    @torch.no_grad()
    def _generate(self, components, model, device: torch.device) -> dict[str, torch.Tensor]:
        from core.guidance import guided

        c, spec = self.config, components.spec
        g = make_generator(c.seed, "reflow-pairs")
        labels = torch.randint(spec.num_classes, (c.num_pairs,), generator=g) if spec.num_classes > 0 else None
        field = components.objective.sampling_model(guided(model, c.guidance_scale, spec.num_classes))
        x0s, x1s = [], []
        for start in range(0, c.num_pairs, c.batch_size):
            stop = min(c.num_pairs, start + c.batch_size)
            x0 = components.path.sample_source((stop - start, *spec.shape), generator=g)
            y = labels[start:stop].to(device) if labels is not None else None
            out = components.solver.sample(field, x0.to(device), y=y, generator=g)
            x0s.append(x0.cpu())
            x1s.append(out.x.float().cpu())
        pairs = {"x0": torch.cat(x0s).float(), "x1": torch.cat(x1s)}
        if labels is not None:
            pairs["y"] = labels
        return pairs

    def reference(self, n: int, generator: torch.Generator) -> Batch:
        """Held-out examples of the original run's data (the true data, not the rectified flow's samples)."""
        return self.source.reference(n, generator)

    def reference_slice(self, n: int, seed: int, start: int, stop: int) -> Batch:
        """Rows ``start .. stop - 1`` of the original data's global reference selection (what the runner's
        sample metrics read; the couplings' own ``x_1`` are the rectified flow's samples, not data)."""
        return self.source.reference_slice(n, seed, start, stop)

    @property
    def evaluation_data(self) -> DataSource:
        """The original run's data: feature networks of the metrics learn from real examples, not from the
        teacher's samples, so the 1-RF and its reflows are scored in one feature space."""
        return self.source.evaluation_data

    def render(self, batch: Batch, path: str) -> list[str]:
        return self.source.render(batch, path)


def make_reflow_pairs(config: ReflowPairsConfig) -> ReflowPairs:
    """Data factory for ``plugin = "reflow_pairs"``."""
    return ReflowPairs(config)
