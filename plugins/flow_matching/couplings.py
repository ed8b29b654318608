r"""Minibatch couplings of source noise and data for flow matching (OT-CFM, SB-CFM).

Independent flow matching pairs each data point ``x_1[i]`` with an independent
source draw ``x_0[i]``. A minibatch coupling re-pairs them: it keeps the data
(and its labels) in place and reorders or resamples the source points,

    x_0'[i] = x_0[j(i)],

so that pairs are close under the squared Euclidean cost
``C[i, j] = |x_1[i] - x_0[j]|^2`` (Tong et al. 2024, "Improving and generalizing
flow-based generative models with minibatch optimal transport"; Pooladian et al. 2023).
Every option draws from one plan ``P`` ``(n, n)`` with uniform marginals ``1/n``:

* ``ot``: the exact optimal assignment ``j = argmin_{perm} sum_i C[i, perm(i)]``
  (POT's ``ot.emd`` when POT is installed, else scipy's ``linear_sum_assignment``;
  for uniform weights both solve the same linear programme, whose optimum is a permutation).
* ``sinkhorn``: the entropic plan ``P = argmin <P, C> - eps H(P)``, computed in the
  log domain (stable for small ``eps``): potentials ``f, g`` iterate

      f_i = -eps logsumexp_j((g_j - C[i, j]) / eps) - eps log n
      g_j = -eps logsumexp_i((f_i - C[i, j]) / eps) - eps log n,      P = exp((f_i + g_j - C) / eps);

  each data point then draws its partner from its row, ``j(i) ~ P[i, :] / sum_j P[i, j]``
  (one uniform per example, inverse CDF), so pairs are distributed as ``P``. As
  ``eps -> 0`` the plan tends to the exact OT plan and its cost to the OT cost.
  With ``eps = 2 sigma^2`` it is the static Schrödinger bridge of Brownian motion
  ``sigma W`` between the two empirical measures (SB-CFM).
* ``class_ot``: ``ot`` within each class label (pairs never cross labels).

Blocks. The plan is computed on consecutive blocks of ``block`` examples of the
(micro-)batch (``block = 0``: the whole batch). The trainer gives each process
and micro-batch a contiguous range of the global batch (`core.rng.shard_positions`)
and draws each example's noise from its own seed, so when ``block`` divides the
micro-batch size every block is the same set of global examples on any number of
processes and with any micro-batch split: the coupling, and so the loss of every
example, is process-count invariant. With ``block = 0`` the coupling is per-rank
minibatch OT (as torchcfm does under DDP): it changes with the split.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

COUPLINGS = ("independent", "ot", "sinkhorn", "class_ot")


def squared_distances(x_1: Tensor, x_0: Tensor) -> Tensor:
    """``C[i, j] = |x_1[i] - x_0[j]|^2`` ``(n, m)`` in float64, for ``x_1 (n, ...)``, ``x_0 (m, ...)``."""
    a = x_1.detach().reshape(x_1.shape[0], -1).to(torch.float64)
    b = x_0.detach().reshape(x_0.shape[0], -1).to(torch.float64)
    return ((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T).clamp_(min=0.0)


def exact_assignment(cost: Tensor) -> Tensor:
    """The optimal permutation ``j (n,)`` (int64) minimising ``sum_i cost[i, j[i]]`` for a square ``cost (n, n)``.

    Uses POT's exact network simplex (``ot.emd``) when POT is installed, else scipy's
    ``linear_sum_assignment``; both are exact, so only ties may pair differently.
    """
    c = cost.detach().cpu().to(torch.float64).numpy()
    try:
        import ot  # POT, optional
    except ImportError:
        ot = None
    if ot is not None:
        n = c.shape[0]
        plan = ot.emd(np.full(n, 1.0 / n), np.full(n, 1.0 / n), c)
        cols = plan.argmax(1)
    else:
        from scipy.optimize import linear_sum_assignment

        _, cols = linear_sum_assignment(c)
    return torch.as_tensor(cols, dtype=torch.int64, device=cost.device)


def sinkhorn_plan(cost: Tensor, eps: float, *, iters: int = 1000, tol: float = 1e-6) -> Tensor:
    """The entropic OT plan ``(n, m)`` (float64, marginals ``1/n`` and ``1/m``) of `cost`.

    When ``max(C) / eps < KERNEL_MAX`` the kernel ``K = exp(-C / eps)`` is representable and the
    scalings ``u = a / (K v)``, ``v = b / (K^T u)`` iterate (``P = diag(u) K diag(v)``, the same fixed point
    as the log-domain updates, one matrix-vector product each). Otherwise log-domain Sinkhorn with epsilon
    scaling: the potentials are warm-started through ``eps_k = max(eps, max(C) 2^-k)`` (each stage until its
    row marginals are within ``sqrt(tol)``), then iterated at `eps`. Both stop when the row marginals are
    within `tol` (L1) of uniform, or after `iters` sweeps (per stage).
    """
    c = cost.to(torch.float64)
    if float(c.max()) / eps < KERNEL_MAX:
        return _sinkhorn_kernel(c, eps, iters, tol)
    f = torch.zeros(c.shape[0], dtype=c.dtype, device=c.device)
    g = torch.zeros(c.shape[1], dtype=c.dtype, device=c.device)
    stage = max(float(c.max()), eps)
    while True:
        stage = max(eps, stage / 2)
        f, g = _sinkhorn_sweeps(c, f, g, stage, iters, tol if stage == eps else math.sqrt(tol))
        if stage == eps:
            return torch.exp((f[:, None] + g[None, :] - c) / eps)


#: Largest ``max(C) / eps`` for the kernel-domain iterations (exp(-300) = 5e-131: far from float64 underflow).
KERNEL_MAX = 300.0


def _sinkhorn_kernel(c: Tensor, eps: float, iters: int, tol: float) -> Tensor:
    """Kernel-domain Sinkhorn scalings (see `sinkhorn_plan`); returns the plan ``(n, m)``."""
    n, m = c.shape
    k = torch.exp(-c / eps)
    u = torch.full((n,), 1.0 / n, dtype=c.dtype, device=c.device)
    v = torch.ones(m, dtype=c.dtype, device=c.device)
    for i in range(iters):
        u = (1.0 / n) / (k @ v)
        v = (1.0 / m) / (k.T @ u)
        if i % 10 == 9 and (u * (k @ v) - 1.0 / n).abs().sum() < tol:
            break
    return u[:, None] * k * v[None, :]


def _sinkhorn_sweeps(c: Tensor, f: Tensor, g: Tensor, eps: float, iters: int, tol: float) -> tuple[Tensor, Tensor]:
    """Log-domain Sinkhorn updates of the potentials ``f (n,), g (m,)`` at one ``eps`` (module docstring)."""
    n, m = c.shape
    log_a, log_b = -math.log(n), -math.log(m)
    for k in range(iters):
        f = eps * (log_a - torch.logsumexp((g[None, :] - c) / eps, dim=1))
        g = eps * (log_b - torch.logsumexp((f[:, None] - c) / eps, dim=0))
        if k % 10 == 9:
            rows = torch.logsumexp((f[:, None] + g[None, :] - c) / eps, dim=1).exp()
            if (rows - 1.0 / n).abs().sum() < tol:
                break
    return f, g


def sample_rows(plan: Tensor, u: Tensor) -> Tensor:
    """For each row ``i`` of `plan` ``(n, m)`` the column drawn from ``plan[i] / sum(plan[i])`` by the uniform ``u[i]``.

    Returns ``(n,)`` int64 (inverse CDF: the first ``j`` whose cumulative mass exceeds ``u[i]``).
    """
    p = plan / plan.sum(1, keepdim=True)
    cdf = torch.cumsum(p, dim=1)
    j = torch.searchsorted(cdf, u.to(cdf.dtype).reshape(-1, 1).to(cdf.device)).reshape(-1)
    return j.clamp_(max=plan.shape[1] - 1)


def block_partner(kind: str, x_1: Tensor, x_0: Tensor, y: Tensor | None, u: Tensor | None, eps: float) -> Tensor:
    """The partner indices ``j (n,)`` within one block (see the module docstring)."""
    if kind == "ot":
        return exact_assignment(squared_distances(x_1, x_0))
    if kind == "sinkhorn":
        return sample_rows(sinkhorn_plan(squared_distances(x_1, x_0), eps), u)
    if kind == "class_ot":
        if y is None:
            raise ValueError("class_ot needs labels y")
        j = torch.empty(x_1.shape[0], dtype=torch.int64, device=x_1.device)
        for label in torch.unique(y):
            idx = torch.nonzero(y == label).reshape(-1)
            j[idx] = idx[exact_assignment(squared_distances(x_1[idx], x_0[idx])).to(idx.device)]
        return j
    raise ValueError(f"unknown coupling {kind!r}; expected one of {COUPLINGS}")


def couple(kind: str, x_1: Tensor, x_0: Tensor, *, y: Tensor | None = None, u: Tensor | None = None,
           eps: float = 0.1, block: int = 0) -> Tensor:
    """The coupled source ``x_0' (n, ...)``: `x_0` reordered (or resampled) so that ``x_0'[i]`` pairs with ``x_1[i]``.

    Args:
        kind: one of `COUPLINGS`.
        x_1: data ``(n, ...)``; x_0: source draws ``(n, ...)``.
        y: labels ``(n,)`` (``class_ot``).
        u: uniforms ``(n,)`` in (0, 1), one per data example (``sinkhorn``).
        eps: the entropic regularisation of ``sinkhorn`` (in units of the squared distance).
        block: couple consecutive blocks of this many examples (0: the whole batch); must divide n.
    """
    if kind == "independent":
        return x_0
    n = x_1.shape[0]
    size = block or n
    if n % size:
        raise ValueError(f"coupling block {block} does not divide the batch of {n} examples")
    parts = []
    for s in range(0, n, size):
        sl = slice(s, s + size)
        j = block_partner(kind, x_1[sl], x_0[sl], None if y is None else y[sl], None if u is None else u[sl], eps)
        parts.append(j + s)
    return x_0[torch.cat(parts).to(x_0.device)]


def coupling_eps(config, spec, path) -> float | None:
    """Check the objective's coupling options against the data and path; the sinkhorn ``eps`` (None otherwise).

    ``config`` is a `FlowMatchingConfig`; raises ConfigError for ``class_ot`` on unlabelled data and
    for ``sinkhorn`` without ``sinkhorn_eps`` on a path that has no entropic ``eps`` of its own.
    """
    from registry import ConfigError

    if config.coupling == "class_ot" and spec.num_classes == 0:
        raise ConfigError("coupling \"class_ot\" pairs within class labels, but the data has none (num_classes = 0); "
                          "use \"ot\"", ("coupling",))
    if config.coupling != "sinkhorn":
        return None
    eps = config.sinkhorn_eps if config.sinkhorn_eps is not None else getattr(path, "entropic_eps", None)
    if eps is None:
        raise ConfigError("coupling \"sinkhorn\" needs sinkhorn_eps (only a brownian interpolant / "
                          "schrodinger_bridge path gives its own, 2 sigma^2)", ("sinkhorn_eps",))
    return float(eps)


def coupled_source(config, eps: float | None, batch, draw, path) -> Tensor:
    """The source ``x_0 (B, ...)`` of a training batch under the objective's coupling.

    Draws the noise per example through ``path.sample_source`` (stream ``"noise"``; ``"coupling"`` for
    sinkhorn's row draws) and couples it
    with ``batch["x"]``; a batch that brings its own ``"x0"`` pairs (reflow) is used as given, and refuses a
    coupling, which would undo its pairs.
    """
    from registry import ConfigError

    x_1, x_0 = batch["x"], batch.get("x0")
    if x_0 is not None:
        if config.coupling != "independent":
            raise ConfigError(f"coupling {config.coupling!r} would re-pair the data's own (x0, x) pairs; use "
                              f"coupling = \"independent\" with paired data (reflow)", ("coupling",))
        return x_0
    x_0 = path.sample_source(x_1.shape, device=x_1.device, dtype=x_1.dtype, draw=draw)
    if config.coupling == "independent":
        return x_0
    n, block = x_1.shape[0], config.coupling_block
    if block and n % block:
        raise ConfigError(f"coupling_block = {block} does not divide the (micro-)batch of {n} examples; choose a "
                          f"divisor of trainer.batch_size / (processes x micro-batches)", ("coupling_block",))
    u = draw.rand((), "coupling", device=x_1.device, dtype=torch.float64) if config.coupling == "sinkhorn" else None
    return couple(config.coupling, x_1, x_0, y=batch.get("y"), u=u, eps=eps or 0.0, block=block)
