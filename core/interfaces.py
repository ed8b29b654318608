"""The interfaces every flowforge component implements.

Conventions (see DESIGN.md):

* Time ``t`` is continuous in [0, 1]; ``t = 0`` is the source (noise, mask),
  ``t = 1`` is data. Plugins whose literature counts otherwise convert inside.
* Data ``x`` is ``(B, ...)``; ``t`` is a ``(B,)`` float tensor wherever a model
  sees it. Discrete data is a LongTensor of token ids ``(B, ...)``; discrete
  models return logits ``(B, ..., V)``.
* Backbones are called as ``model(x, t, y=None)``; ``y`` is a ``(B,)`` class
  label and the null label (for classifier-free guidance) is ``num_classes``.
* Every random draw takes a ``torch.Generator`` or uses torch's global RNG,
  which the trainer seeds per process and checkpoints.

How components are built: ``registry.build(kind, mapping, **context)`` calls a
plugin's factory as ``factory(config, **context)``, passing only the context
keywords the factory's signature names. The runner offers, per kind:

=============  ==============================================================
kind           context keywords offered by the runner
=============  ==============================================================
``data``       (none)
``scheduler``  ``spec``
``path``       ``spec``, ``scheduler``
``backbone``   ``spec``
``objective``  ``spec``, ``scheduler``, ``path``
``solver``     ``spec``, ``scheduler``, ``path``
``metric``     ``spec``, ``data``, ``scheduler``, ``path``
``launcher``   (none)
``logger``     ``run_dir``, ``experiment``
=============  ==============================================================

A plugin-declared kind is offered the names it ``needs`` (see core/build.py).

Sections other than ``data``, ``backbone``, ``objective`` and ``trainer`` are
optional: a run without ``solver`` generates nothing (e.g. CLIP distillation).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple, Protocol, runtime_checkable

import attrs
import torch
from torch import Tensor, nn

#: A batch is a mapping of named tensors. Generative data uses ``"x"`` (data,
#: ``(B, ...)``) and optionally ``"y"`` (class labels, ``(B,)``); other tasks
#: use their own keys (CLIP: ``"image"``, ``"text"``).
Batch = Mapping[str, Tensor]


@attrs.frozen
class DataSpec:
    """What a data source produces; backbones and objectives size themselves from it.

    Attributes:
        shape: shape of one example, e.g. ``(2,)`` or ``(1, 8, 8)``.
        kind: ``"continuous"`` (float data, typically scaled to [-1, 1]) or
            ``"discrete"`` (LongTensor token ids in ``[0, vocab_size)``).
        num_classes: number of class labels (0: unconditional data).
        vocab_size: number of token values for discrete data.
        extra: free-form facts a data plugin wants to pass on (e.g. tokenizer info).
    """

    shape: tuple[int, ...]
    kind: str = "continuous"
    num_classes: int = 0
    vocab_size: int = 0
    extra: Mapping[str, Any] = attrs.field(factory=dict)


# --------------------------------------------------------------------------- schedulers
@attrs.frozen
class SchedulerOutput:
    """``alpha_t``, ``sigma_t`` and their time derivatives, each shaped like ``t``."""

    alpha_t: Tensor
    sigma_t: Tensor
    d_alpha_t: Tensor
    d_sigma_t: Tensor


class Scheduler(abc.ABC):
    """Coefficients of an affine probability path ``x_t = alpha_t x_1 + sigma_t x_0``.

    ``x_0`` is the source sample (e.g. standard Gaussian noise) and ``x_1`` the
    data. A scheduler must satisfy ``alpha_0 = 0, sigma_0 = 1`` and
    ``alpha_1 = 1, sigma_1 = 0`` (or the limits of VP schedules) and have
    ``alpha_t / sigma_t`` increasing in ``t``.
    """

    @abc.abstractmethod
    def __call__(self, t: Tensor) -> SchedulerOutput:
        """Coefficients at times ``t`` (any shape; outputs have the same shape and dtype)."""

    @abc.abstractmethod
    def snr_inverse(self, snr: Tensor) -> Tensor:
        """The time ``t`` at which ``alpha_t / sigma_t == snr`` (inverse of the signal-to-noise ratio)."""


class ConvexScheduler(Scheduler):
    """A scheduler with ``alpha_t = kappa_t`` and ``sigma_t = 1 - kappa_t`` (mixture paths use ``kappa``)."""

    @abc.abstractmethod
    def kappa_inverse(self, kappa: Tensor) -> Tensor:
        """The time ``t`` at which ``kappa_t == kappa``."""


# --------------------------------------------------------------------------- paths
@attrs.frozen
class PathSample:
    """A draw from a conditional probability path.

    Attributes:
        x_0: source sample ``(B, ...)``.
        x_1: data sample ``(B, ...)``.
        t: times ``(B,)``.
        x_t: the point on the path ``(B, ...)``.
        target: what the model regresses on, for the path's default prediction
            (for affine paths the conditional velocity ``dx_t/dt``).
    """

    x_0: Tensor
    x_1: Tensor
    t: Tensor
    x_t: Tensor
    target: Tensor


class Path(abc.ABC):
    """A probability path from the source ``p_0`` (t=0) to the data ``p_1`` (t=1)."""

    @abc.abstractmethod
    def sample(self, x_0: Tensor, x_1: Tensor, t: Tensor) -> PathSample:
        """Sample ``x_t ~ p_t(. | x_0, x_1)`` for ``x_0, x_1`` of shape ``(B, ...)`` and ``t`` of shape ``(B,)``."""

    @abc.abstractmethod
    def sample_source(self, shape: Sequence[int], generator: torch.Generator | None = None,
                      device: torch.device | str | None = None, *, dtype: torch.dtype | None = None,
                      draw: Any = None) -> Tensor:
        """Draw ``x_0 ~ p_0`` of the given full shape ``(B, ...)`` (Gaussian noise, mask tokens, ...).

        Every objective draws its source here. `draw` is a training batch's ``core.rng.for_batch``:
        with it each example's draw is keyed by its seed (process-count invariant), without it the draw
        comes from `generator`. `dtype` is the floating dtype of a continuous source (default float32).
        """


# --------------------------------------------------------------------------- solvers
#: What solvers integrate: ``field(x, t, y) -> Tensor`` with ``x (B, ...)``, ``t (B,)``.
Field = Callable[..., Tensor]


@attrs.frozen
class SolverResult:
    """The output of `Solver.sample`.

    Attributes:
        x: the final state ``(B, ...)`` (at ``t = 1`` for generation).
        nfe: number of model evaluations made (a batch counts once).
        trajectory: ``(K, B, ...)`` intermediate states including the first
            and last, when requested; otherwise None.
        times: ``(K,)`` times of the trajectory states, when requested.
    """

    x: Tensor
    nfe: int
    trajectory: Tensor | None = None
    times: Tensor | None = None


class Solver(abc.ABC):
    """Integrates a model from the source to the data (or along a given time grid)."""

    @abc.abstractmethod
    def sample(self, model: Field, x_init: Tensor, *, y: Tensor | None = None,
               generator: torch.Generator | None = None, intermediates: bool = False) -> SolverResult:
        """Transport ``x_init (B, ...)`` from t=0 to t=1 under ``model(x, t, y)``.

        Solvers call the model with ``t`` expanded to shape ``(B,)``.
        """


# --------------------------------------------------------------------------- training
class Binned(NamedTuple):
    """A logged value (of `Objective.loss`): the mean of `values` by equal-width bins of `positions`.

    Logged as ``key/i`` = the mean of the log interval's values whose position lies in
    ``[i / bins, (i + 1) / bins)`` (position 1 in the last bin): the sum of those values over their
    count, every example weighing the same however they fell into micro-batches and steps. A bin no
    value fell in during the interval is left out of that record. The trainer only keeps the tensors
    during the interval and bins them when it logs: no op per step.

    Attributes:
        values: ``(B,)`` detached, e.g. each example's loss.
        positions: ``(B,)`` detached, in [0, 1], e.g. each example's time ``t``.
        bins: the number of bins K.
    """

    values: Tensor
    positions: Tensor
    bins: int

    def totals(self) -> tuple[Tensor, Tensor]:
        """``(sums (K,), counts (K,))``: the summed values and their number in each bin, without a device sync."""
        k = self.bins
        idx = (self.positions * k).long().clamp_(0, k - 1)
        if idx.device.type == "cpu":  # fewest ops; on an accelerator bincount reads idx.max() back (a sync)
            return torch.bincount(idx, weights=self.values, minlength=k), torch.bincount(idx, minlength=k)
        sums = torch.zeros(k, device=idx.device, dtype=self.values.dtype).index_add_(0, idx, self.values)
        return sums, torch.zeros(k, device=idx.device, dtype=torch.long).index_add_(0, idx, torch.ones_like(idx))


class Objective(abc.ABC):
    """A training loss. Holds any state the loss needs (time samplers, loss history).

    ``prediction`` names what the trained model outputs (``"velocity"``, ``"epsilon"``, ``"x1"``, ...,
    None when the question does not apply): the one place metrics and tools read it from, whichever
    section of the experiment set it.
    """

    prediction: str | None = None

    @abc.abstractmethod
    def loss(self, models: Mapping[str, nn.Module], batch: Batch,
             step: int) -> tuple[Tensor, dict[str, float | Tensor]]:
        """The scalar loss for one (micro-)batch and a dict of values to log.

        Logged values are Python floats, detached 0-d tensors, detached 1-D
        tensors ``v`` (logged as ``key/0`` ... ``key/(n-1)``), or `Binned` means.
        Tensors are averaged on the device over the log interval and read back
        once per interval, so logging them costs no device synchronisation per
        step.

        Args:
            models: ``{"model": the trained network}`` (possibly wrapped for
                data parallelism); objectives may add their own (a teacher).
            batch: this process's (micro-)batch.
            step: the optimizer step being computed (0-based).
        """

    def sampling_model(self, model: nn.Module) -> Field:
        """What the solver should integrate for this objective's trained model.

        Default: the model itself. Objectives whose model predicts something the
        solver does not expect (e.g. epsilon for an ODE solver that wants a
        velocity) return a converting wrapper.
        """
        return model

    def state_dict(self) -> dict[str, Any]:
        """State to checkpoint (e.g. a loss history); empty by default."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what `state_dict` returned."""


class DataSource(abc.ABC):
    """Training and evaluation data for one process's shard.

    Training batches are indexed by optimizer step so that a resumed run sees
    exactly the batches an uninterrupted one would.
    """

    spec: DataSpec
    #: Size of the training split, or None for an endless source (epochs need it).
    num_examples: int | None = None

    @abc.abstractmethod
    def train_batches(self, batch_size: int, *, seed: int, start_step: int = 0,
                      rank: int = 0, world_size: int = 1) -> Iterator[Batch]:
        """Yield this rank's batches for steps ``start_step, start_step + 1, ...`` forever.

        ``batch_size`` is the per-process (micro-)batch size. Deterministic in
        (seed, step, rank, world_size).
        """

    @abc.abstractmethod
    def reference(self, n: int, generator: torch.Generator) -> Batch:
        """``n`` held-out examples (never trained on), drawn with `generator`.

        Two calls with independent generators give two independent samples:
        the runner uses them for the data-vs-data floor of sample metrics.
        """

    def reference_slice(self, n: int, seed: int, start: int, stop: int) -> Batch:
        """Examples ``start .. stop - 1`` of ``reference(n, torch.Generator().manual_seed(seed))``.

        Evaluation reads one global reference selection in blocks, each rank its own, so the set is the
        same on any number of processes. This default draws the whole selection and slices it (``O(n)``
        per call); sources that index a held-out split override it to read only those rows.
        """
        batch = self.reference(n, torch.Generator().manual_seed(seed))
        return {k: v[start:stop] for k, v in batch.items()}

    def render(self, batch: Batch, path: str) -> list[str]:
        """Save a picture of (generated) examples to ``path`` (a file name without
        extension); return the files written. Default: nothing."""
        return []

    def decode(self, x: Tensor) -> Tensor:
        """Examples ``x`` as the observations they stand for, shaped `observation_spec` (what
        ``flowforge sample --npz / --png-folder`` writes). Default: ``x`` itself; a latent source decodes
        latents ``(B, c, h, w)`` to images ``(B, C, H, W)``."""
        return x

    @property
    def observation_spec(self) -> DataSpec:
        """The spec of `decode`'s output. Default: `spec`."""
        return self.spec

    @property
    def evaluation_data(self) -> "DataSource":
        """The source whose training split a metric's trained feature network learns from (``digits_cnn``).
        Default: this source; a source of generated examples (``reflow_pairs``: a teacher's samples) names
        the real data it stands for, so every stage of a pipeline is scored in the same feature space."""
        return self

    def observations(self, batch: Batch) -> Tensor:
        """The observations ``(B, *observation_spec.shape)`` of the examples `batch`: ``batch["observation"]``
        when the source gives it (a latent source's held-out examples carry the real images they encode),
        else ``decode(batch["x"])`` (generated examples). What metrics with ``space = "observations"``
        compare (see `SampleMetric`)."""
        seen = batch.get("observation")
        return seen if seen is not None else self.decode(batch["x"])


@runtime_checkable
class SampleMetric(Protocol):
    """A metric comparing generated samples to reference data (a torchmetrics.Metric).

    ``update(samples, real)`` accumulates a batch of generated (``real=False``)
    or reference (``real=True``) examples ``(B, ...)``; ``compute()`` returns a
    float tensor or a dict of them. ``higher_is_better`` says which way is good.

    A metric with the attribute ``space = "observations"`` is handed observations instead of the
    model's examples (`DataSource.observations`): the decoded generated latents, and the real
    held-out images behind the reference latents, so a latent run's FID is against real images.
    Without it (``space = "model"``) it sees the examples the model generates.
    """

    higher_is_better: bool | None

    def update(self, samples: Tensor, real: bool) -> None: ...

    def compute(self) -> Tensor | dict[str, Tensor]: ...

    def reset(self) -> None: ...


def space_of(metric: Any) -> str:
    """``"observations"`` for a metric that compares observations (see `SampleMetric`), else ``"model"``."""
    return getattr(metric, "space", "model")


@runtime_checkable
class ModelMetric(Protocol):
    """A metric computed from the model and the data directly (zero-shot accuracy, bits/dim).

    ``evaluate(model, data, generator) -> dict[str, float]``.
    """

    def evaluate(self, model: nn.Module, data: DataSource, generator: torch.Generator) -> dict[str, float]: ...


#: Metrics are SampleMetric (a torchmetrics.Metric where one fits) or ModelMetric.
Metric = SampleMetric | ModelMetric


class Launcher(abc.ABC):
    """Runs a training entry point on one or many processes.

    The entry point is a picklable top-level function called as
    ``entry(accelerator, *args)`` on every process, where ``accelerator`` is an
    ``accelerate.Accelerator`` built from ``accelerator_kwargs``. The launcher
    returns rank 0's return value. The entry point's last positional argument
    is its ``resume`` flag: a launcher that restarts work (a job requeued after
    preemption) calls it again with that argument set to True.
    """

    @abc.abstractmethod
    def launch(self, entry: Callable[..., Any], *args: Any, accelerator_kwargs: Mapping[str, Any]) -> Any:
        """Run ``entry(accelerator, *args)`` on every process; return rank 0's result."""


class Logger(abc.ABC):
    """Receives every record the run writes to metrics.jsonl (``[[loggers]]``; main process only).

    Built with ``run_dir`` (the run directory, a `pathlib.Path`) and ``experiment``
    (the resolved experiment as a dict) offered.
    """

    @abc.abstractmethod
    def log(self, step: int, values: Mapping[str, Any]) -> None:
        """One record: the step and the record's other keys (mostly floats; None where undefined)."""

    def close(self) -> None:
        """The run is over (or failed): flush and release files. The default does nothing."""


#: A backbone factory: ``factory(config, spec=DataSpec) -> nn.Module`` whose
#: module is called as ``model(x, t, y=None)``. Continuous data: output shaped
#: like ``x`` (times 2 channels with learned sigma). Discrete: logits ``(B, ..., V)``.
Backbone = Callable[..., nn.Module]
