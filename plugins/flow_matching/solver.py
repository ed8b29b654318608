"""ODE solvers for ``dx/dt = u(x, t)``, by default from t=0 (noise) to t=1 (data).

Fixed-step explicit Runge-Kutta methods on a time grid ``t_0 < t_1 < ... < t_N``
with ``h = t_{k+1} - t_k`` and ``f(x, t) = u(x, t, y)``:

* euler (order 1, 1 evaluation/step):   ``x + h f(x, t)``
* midpoint (order 2, 2 evaluations):    ``x + h f(x + h/2 f(x, t), t + h/2)``
* heun (order 2, 2 evaluations):        ``x + h/2 (k1 + k2)``, ``k2 = f(x + h k1, t + h)``
* rk4 (order 4, 4 evaluations):         the classical ``(k1 + 2 k2 + 2 k3 + k4) / 6``

Adaptive Dormand-Prince methods (dopri5, dopri8; torchdiffeq) control the
local error to ``atol + rtol |x|``; their evaluation count depends on the field.

The time grid is uniform (``steps`` intervals from ``t0`` to ``t1``), EDM's rho
schedule (``grid = "edm"``: Karras et al. 2022, eq. 5, noise levels
``sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho``
mapped to times by the scheduler's ``snr_inverse(1 / sigma_i)``, with the ends
pinned to ``t0`` and ``t1``), or any explicit list ``times``.

``sampling_scheduler`` samples a velocity model trained under the experiment's
``[scheduler]`` along another scheduler's path, without retraining
(`transforms.ScheduleTransformedModel`).

The fixed-step loop is kept to one fused ``x + h k`` update per evaluation:
every time tensor is precomputed as a view, step sizes are Python floats.
With ``compile = true`` one whole step (its model evaluations and the update)
is a `torch.compile` graph, built once per model and method and replayed for
every step: the update and the model's elementwise work fuse into its kernels.
With ``cuda_graph = true`` (CUDA inputs) the whole integration, every step of
it, is captured once as a CUDA graph per (model, input shape, grid) and later
calls replay it: one launch per ``sample`` call instead of one per kernel.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any, Literal

import attrs
import torch
from torch import Tensor

from core.interfaces import Field, Scheduler, Solver, SolverResult
from registry import ConfigError


@attrs.frozen
class Tableau:
    """An explicit Runge-Kutta method as its Butcher tableau, with ``b = weights / denominator``.

    One step from ``(x, t)`` with step ``h`` evaluates, for stages ``i = 0 .. s-1``,

        k_i = f(x + h sum_{j<i} a[i][j] k_j,  t + c[i] h)

    and returns ``x + (h / denominator) * sum_i weights[i] k_i``. Both the eager loop
    (`integrate_fixed`) and the compiled step (`rk_step`) evaluate this one definition.

    Attributes:
        a: the strictly lower-triangular stage coefficients, one row per stage (row 0 is empty).
        c: the stage times as fractions of the step.
        weights: the integer weights of the final combination.
        denominator: what the weights are divided by (``b_i = weights[i] / denominator``).
        order: the method's order of accuracy.
    """

    a: tuple[tuple[float, ...], ...]
    c: tuple[float, ...]
    weights: tuple[float, ...]
    denominator: float
    order: int

    @property
    def stages(self) -> int:
        return len(self.c)


#: The fixed-step methods (see the module docstring).
TABLEAUS: dict[str, Tableau] = {
    "euler": Tableau(a=((),), c=(0.0,), weights=(1.0,), denominator=1.0, order=1),
    "midpoint": Tableau(a=((), (0.5,)), c=(0.0, 0.5), weights=(0.0, 1.0), denominator=1.0, order=2),
    "heun": Tableau(a=((), (1.0,)), c=(0.0, 1.0), weights=(1.0, 1.0), denominator=2.0, order=2),
    "rk4": Tableau(a=((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)), c=(0.0, 0.5, 0.5, 1.0),
                   weights=(1.0, 2.0, 2.0, 1.0), denominator=6.0, order=4),
}
STAGES = {name: tab.stages for name, tab in TABLEAUS.items()}
ORDER = {**{name: tab.order for name, tab in TABLEAUS.items()}, "dopri5": 5, "dopri8": 8}
ADAPTIVE = ("dopri5", "dopri8")
METHODS = (*STAGES, *ADAPTIVE)


@attrs.define
class ODEConfig:
    """Options of the ode solver.

    Attributes:
        method: euler, midpoint, heun, rk4 (fixed steps) or dopri5, dopri8 (adaptive, atol/rtol).
        steps: number of grid intervals (model evaluations = steps x stages for fixed-step methods;
            for adaptive methods only the number of states returned with intermediates).
        t0: start time (0: the source).
        t1: end time (1: the data).
        grid: "uniform" or "edm" (Karras et al.'s rho schedule of noise levels, mapped to times).
        times: an explicit strictly monotone time grid; overrides grid, steps, t0 and t1.
        rho: exponent of the edm grid (7 in EDM; larger puts more steps near the data).
        sigma_min: smallest noise level (sigma_t / alpha_t) of the edm grid.
        sigma_max: largest noise level of the edm grid.
        atol: absolute tolerance of adaptive methods.
        rtol: relative tolerance of adaptive methods.
        time_shift: SD3's shift s of the uniform grid, t' = t / (t + s (1 - t)) (1: none; s > 1 spends
            more steps near the noise).
        sampling_scheduler: sample along this scheduler's path instead of the training one: a
            scheduler plugin name (e.g. "cosine") or a table (e.g. {plugin = "polynomial", n = 2}).
        compile: run each fixed step as one torch.compile graph (model evaluations + update; compiled
            once per model, the first call pays the compilation). Fixed-step methods only.
        cuda_graph: on CUDA inputs, capture the whole fixed-step integration (with the compiled step
            when compile = true) as one CUDA graph, replayed by every later call with the same model,
            input shape and grid (CPU inputs integrate as usual). The model must not read values back
            to the host (no .item(), no branches on tensor values) and its parameters may change only
            in place (an EMA update or load_state_dict is seen by the replay). Fixed-step methods only.
    """

    method: Literal["euler", "midpoint", "heun", "rk4", "dopri5", "dopri8"] = "midpoint"
    steps: int = 20
    t0: float = 0.0
    t1: float = 1.0
    grid: Literal["uniform", "edm"] = "uniform"
    times: list[float] | None = None
    rho: float = 7.0
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    atol: float = 1e-5
    rtol: float = 1e-5
    time_shift: float = 1.0
    sampling_scheduler: str | dict[str, Any] | None = None
    compile: bool = False
    cuda_graph: bool = False

    def __attrs_post_init__(self) -> None:
        for flag in ("compile", "cuda_graph"):
            if getattr(self, flag) and self.method in ADAPTIVE:
                raise ConfigError(f"{flag} applies to the fixed-step methods {tuple(STAGES)}, not {self.method!r}",
                                  (flag,))
        if self.steps < 1:
            raise ConfigError(f"expected a positive integer, got {self.steps}", ("steps",))
        if self.times is not None:
            ts = list(self.times)
            diffs = [b - a for a, b in itertools.pairwise(ts)]
            if len(ts) < 2 or not (all(d > 0 for d in diffs) or all(d < 0 for d in diffs)):
                raise ConfigError(f"expected at least two strictly increasing (or decreasing) times, got {ts}",
                                  ("times",))
        elif self.t0 == self.t1:
            raise ConfigError(f"t1 must differ from t0 = {self.t0}", ("t1",))
        if self.grid == "edm":
            if not 0 < self.sigma_min < self.sigma_max:
                raise ConfigError(f"expected 0 < sigma_min < sigma_max, got sigma_min={self.sigma_min}, "
                                  f"sigma_max={self.sigma_max}", ("sigma_min",))
            if self.rho <= 0:
                raise ConfigError(f"expected a positive number, got {self.rho}", ("rho",))
            if self.times is None and self.t1 < self.t0:
                raise ConfigError("the edm grid runs forward in time (t0 < t1)", ("grid",))
        if self.time_shift <= 0:
            raise ConfigError(f"expected a positive shift, got {self.time_shift}", ("time_shift",))
        if self.time_shift != 1.0 and (self.times is not None or self.grid == "edm"):
            raise ConfigError("time_shift shifts the uniform grid; not with times or grid = \"edm\"", ("time_shift",))
        if self.atol <= 0 or self.rtol <= 0:
            raise ConfigError("tolerances must be positive", ("atol" if self.atol <= 0 else "rtol",))

    @property
    def num_intervals(self) -> int:
        return len(self.times) - 1 if self.times is not None else self.steps


# --------------------------------------------------------------------------- grids
def shift_times(t: Tensor, shift: float) -> Tensor:
    """SD3's timestep shift (Esser et al. 2024, eq. 23) in flowforge time: ``t' = t / (t + s (1 - t))``.

    With the noise level ``sigma = 1 - t`` (diffusers' FlowMatchEulerDiscreteScheduler, sigma = 1 is
    noise) this is its ``sigma' = s sigma / (1 + (s - 1) sigma)``; ``s > 1`` moves times towards the
    noise (SD3 uses s = 3 at 1024^2). Keeps 0 and 1 fixed; shapes and dtype of `t`.
    """
    if shift == 1.0:
        return t
    return t / (t + shift * (1.0 - t))


def uniform_grid(t0: float, t1: float, steps: int, *, device=None, dtype=torch.float32) -> Tensor:
    """``steps + 1`` equally spaced times from `t0` to `t1`."""
    return torch.linspace(t0, t1, steps + 1, device=device, dtype=dtype)


def edm_sigmas(steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> Tensor:
    """EDM's ``steps`` noise levels (float64), from `sigma_max` down to `sigma_min` (Karras et al. eq. 5)."""
    i = torch.arange(steps, dtype=torch.float64)
    frac = i / max(steps - 1, 1)
    hi, lo = sigma_max ** (1.0 / rho), sigma_min ** (1.0 / rho)
    return (hi + frac * (lo - hi)) ** rho


def edm_grid(steps: int, scheduler: Scheduler | None, t0: float = 0.0, t1: float = 1.0, *, sigma_min: float = 0.002,
             sigma_max: float = 80.0, rho: float = 7.0, device=None, dtype=torch.float32) -> Tensor:
    """``steps + 1`` times: ``t0``, then ``snr_inverse(1 / sigma_i)`` for the EDM levels ``i = 1 .. steps - 1``, then ``t1``.

    The noise level of an affine path is ``sigma_t / alpha_t`` (``1 / snr``);
    without a scheduler the cond_ot map ``t = 1 / (1 + sigma)`` is used.
    """
    sig = edm_sigmas(steps, sigma_min, sigma_max, rho)[1:]
    snr = 1.0 / sig
    inner = scheduler.snr_inverse(snr) if scheduler is not None else snr / (1.0 + snr)
    inner = inner.clamp(min(t0, t1), max(t0, t1))
    grid = torch.cat([torch.tensor([t0], dtype=torch.float64), inner, torch.tensor([t1], dtype=torch.float64)])
    return grid.to(device=device, dtype=dtype)


# --------------------------------------------------------------------------- integration
def integrate_fixed(f: Field, x: Tensor, grid: Tensor, method: str, y: Tensor | None = None,
                    intermediates: bool = False, device_grid: Tensor | None = None) -> tuple[Tensor, list[Tensor] | None]:
    """Integrate ``dx/dt = f(x, t, y)`` along `grid` ``(N+1,)`` with a fixed-step method.

    Differentiable (no ``no_grad`` here). Returns ``(x at grid[-1], [x at every grid time] or None)``.
    The model is always called with ``t`` of shape ``(B,)`` (a view of one precomputed tensor) and each
    evaluation costs one fused update. Step sizes are taken from `grid` as Python floats (pass a CPU
    float64 grid to avoid a device synchronisation and rounding of the steps); the model sees
    the times in ``x``'s device and floating dtype; `device_grid` passes that copy of `grid` ready-made
    (as a CUDA graph capture needs: no host-to-device copy inside the captured region).
    """
    if method not in TABLEAUS:
        raise ValueError(f"unknown fixed-step method {method!r}; expected one of {tuple(TABLEAUS)}")
    tab = TABLEAUS[method]
    batch, n = x.shape[0], grid.shape[0] - 1
    hs = (grid[1:] - grid[:-1]).tolist()
    grid = device_grid if device_grid is not None else grid.to(device=x.device, dtype=floating(x))
    times = {c: stage_times(grid, c)[:, None].expand(n, batch) for c in set(tab.c)}
    traj = [x] if intermediates else None
    for k in range(n):
        x = tableau_step(tab, f, x, [times[c][k] for c in tab.c], hs[k], y, _add_scaled)
        if traj is not None:
            traj.append(x)
    return x, traj


def _add_scaled(u: Tensor, k: Tensor, h: float, coef: float, div: float) -> Tensor:
    """``u + (coef h / div) k`` as one fused ``torch.add`` (a Python float step)."""
    return torch.add(u, k, alpha=coef * h / div)


def _add_scaled_tensor(u: Tensor, k: Tensor, h: Tensor, coef: float, div: float) -> Tensor:
    """``u + (coef h / div) k`` for a tensor step ``h`` (broadcastable against `u`)."""
    return u + (coef * h / div) * k


def stage_times(grid: Tensor, c: float) -> Tensor:
    """``(N,)`` times ``t_k + c (t_{k+1} - t_k)`` of a stage of every step of `grid` ``(N+1,)``
    (the grid points themselves for c = 0 and 1, the midpoints ``(t_k + t_{k+1}) / 2`` for c = 1/2)."""
    if c == 0.0:
        return grid[:-1]
    if c == 1.0:
        return grid[1:]
    if c == 0.5:
        return (grid[:-1] + grid[1:]) * 0.5
    return grid[:-1] + c * (grid[1:] - grid[:-1])


def tableau_step(tab: Tableau, f: Field, x: Tensor, times: Sequence[Tensor], h, y: Tensor | None,
                 add_scaled=_add_scaled) -> Tensor:
    """One step of `tab` from `x` with step `h` and the stage times ``times[i]`` ``(B,)``.

    ``add_scaled(u, k, h, coef, div) = u + (coef h / div) k``: a fused ``torch.add`` for a Python
    float `h` (the eager loop), tensor arithmetic for a tensor `h` (the compiled step).
    """
    ks: list[Tensor] = []
    for row, t in zip(tab.a, times):
        u = x
        for j, a in enumerate(row):
            if a != 0.0:
                u = add_scaled(u, ks[j], h, a, 1.0)
        ks.append(f(u, t, y))
    return add_scaled(x, weighted_sum(ks, tab.weights), h, 1.0, tab.denominator)


def weighted_sum(ks: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """``sum_i weights[i] ks[i]``: the unit-weight terms first, in order, then the others (zeros skipped)."""
    ones = [k for k, w in zip(ks, weights) if w == 1.0]
    rest = [(k, w) for k, w in zip(ks, weights) if w not in (0.0, 1.0)]
    if not ones:
        (first, w), rest = rest[0], rest[1:]
        acc = first * w
    elif len(ones) == 1:
        acc = ones[0].clone() if rest else ones[0]
    else:
        acc = ones[0] + ones[1]
        for k in ones[2:]:
            acc.add_(k)
    for k, w in rest:
        acc.add_(k, alpha=w)
    return acc


def integrate_compiled(step, x: Tensor, grid: Tensor, y: Tensor | None = None,
                       intermediates: bool = False, device_grid: Tensor | None = None
                       ) -> tuple[Tensor, list[Tensor] | None]:
    """`integrate_fixed` with a compiled ``step(x, t, h, y)`` (see `compiled_step`) replayed along `grid`.

    Every step gets fresh contiguous ``t`` ``(B,)`` and ``h`` ``()`` tensors in ``x``'s device and dtype,
    so one graph serves every step of any grid (no recompilation per step size or time).
    """
    times = device_grid if device_grid is not None else grid.to(device=x.device, dtype=floating(x))
    steps = times[1:] - times[:-1]
    traj = [x] if intermediates else None
    for k in range(grid.shape[0] - 1):
        x = step(x, times[k].expand(x.shape[0]).contiguous(), steps[k].clone(), y)
        if traj is not None:
            traj.append(x)
    return x, traj


def floating(x: Tensor) -> torch.dtype:
    """The dtype times are given to the model in: `x`'s if floating, else float32."""
    return x.dtype if x.dtype.is_floating_point else torch.float32


class GraphedIntegration:
    """One fixed-step integration captured as a CUDA graph and replayed.

    ``integrate(x, y) -> (x_end, trajectory or None)`` is run twice on a side stream (warm-up: cuBLAS
    workspaces, torch.compile) and then captured on static copies of ``x`` and ``y``. A call copies its
    inputs into those, replays the graph and returns clones of the static outputs. The graph reads the
    model's parameters at their addresses, so in-place updates of them are seen; new tensors are not.
    """

    def __init__(self, integrate, x: Tensor, y: Tensor | None):
        self.integrate = integrate  # keeps alive what the graph reads (the field, a device copy of the grid)
        self.x, self.y = x.clone(), None if y is None else y.clone()
        side, main = torch.cuda.Stream(x.device), torch.cuda.current_stream(x.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            for _ in range(2):
                integrate(self.x, self.y)
        main.wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out, self.traj = integrate(self.x, self.y)

    def __call__(self, x: Tensor, y: Tensor | None) -> tuple[Tensor, list[Tensor] | None]:
        self.x.copy_(x)
        if y is not None:
            self.y.copy_(y)
        self.graph.replay()
        return self.out.clone(), None if self.traj is None else [s.clone() for s in self.traj]


def compiled_step(method: str, f: Field):
    """``step(x, t, h, y) = rk_step(method, f, x, t, h, y)`` as one `torch.compile` graph (static shapes)."""
    def step(x: Tensor, t: Tensor, h: Tensor, y: Tensor | None) -> Tensor:
        return rk_step(method, f, x, t, h, y)

    return torch.compile(step, dynamic=False)


def rk_step(method: str, f: Field, x: Tensor, t: Tensor, h: Tensor, y: Tensor | None) -> Tensor:
    """One step of a fixed-step `method` (its `TABLEAUS` entry) from ``(x, t)`` with step ``h``
    (``(B,)``-broadcastable tensors)."""
    if method not in TABLEAUS:
        raise ValueError(f"unknown method {method!r}")
    tab = TABLEAUS[method]
    hb = h.reshape(-1, *([1] * (x.ndim - 1))) if h.ndim else h
    times = [t if c == 0.0 else t + c * h for c in tab.c]
    return tableau_step(tab, f, x, times, hb, y, _add_scaled_tensor)


def integrate_adaptive(f: Field, x: Tensor, grid: Tensor, method: str = "dopri5", y: Tensor | None = None, *,
                       atol: float = 1e-5, rtol: float = 1e-5) -> tuple[Tensor, int]:
    """Integrate with torchdiffeq's adaptive `method`; returns ``(states at every grid time (K, B, ...), nfe)``.

    The model is only evaluated at times between ``grid[0]`` and ``grid[-1]``.
    """
    from torchdiffeq import odeint

    batch = x.shape[0]
    calls = [0]

    def func(t: Tensor, state: Tensor) -> Tensor:
        calls[0] += 1
        return f(state, t.expand(batch), y)

    grid = grid.to(x.dtype)
    # step_t: land exactly on the final time; torchdiffeq otherwise steps past it and interpolates back,
    # evaluating the model outside [t0, t1] (e.g. beyond the data at t > 1).
    states = odeint(func, x, grid, method=method, atol=atol, rtol=rtol, options={"step_t": grid[-1:]})
    return states, calls[0]


# --------------------------------------------------------------------------- the solver plugin
class ODESolver(Solver):
    """Integrates ``model(x, t, y)`` from the source to the data; see the module docstring.

    Args:
        config: the options.
        scheduler: the experiment's scheduler (for the edm grid and ``sampling_scheduler``).
    """

    def __init__(self, config: ODEConfig | None = None, scheduler: Scheduler | None = None, path: Any = None):
        self.config = config or ODEConfig()
        self.scheduler = scheduler
        self.velocity_field = getattr(path, "velocity_field", None)  # a path whose models are not velocities
        self.sampling_scheduler: Scheduler | None = None
        self._compiled: dict[tuple[int, str], Any] = {}  # (id(model), method) -> compiled step
        self._graphed: tuple[tuple, Field, GraphedIntegration] | None = None  # (key, model, graph): the last one
        spec = self.config.sampling_scheduler
        if spec is not None:
            if scheduler is None:
                raise ConfigError("sampling_scheduler needs the experiment's [scheduler] (the one the model was "
                                  "trained with)", ("sampling_scheduler",))
            import registry

            mapping = {"plugin": spec} if isinstance(spec, str) else dict(spec)
            try:
                self.sampling_scheduler = registry.build("scheduler", mapping)
            except ConfigError as exc:
                raise exc.within("sampling_scheduler") from None

    @property
    def nfe_per_sample(self) -> int | None:
        """Model evaluations per `sample` call (None for adaptive methods)."""
        c = self.config
        return c.num_intervals * STAGES[c.method] if c.method in STAGES else None

    def time_grid(self, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
        """The grid of times ``(N+1,)`` the solver steps through (and returns with intermediates)."""
        c = self.config
        if c.times is not None:
            return torch.tensor(c.times, dtype=torch.float64).to(device=device, dtype=dtype)
        if c.grid == "edm":
            return edm_grid(c.steps, self.sampling_scheduler or self.scheduler, c.t0, c.t1, sigma_min=c.sigma_min,
                            sigma_max=c.sigma_max, rho=c.rho, device=device, dtype=dtype)
        if c.time_shift == 1.0:
            return uniform_grid(c.t0, c.t1, c.steps, device=device, dtype=dtype)
        return shift_times(uniform_grid(c.t0, c.t1, c.steps, device=device, dtype=torch.float64), c.time_shift).to(dtype)

    def field(self, model: Field) -> Field:
        """What is integrated: `model`, the path's velocity of it (a path with ``velocity_field``, e.g. the
        probability flow of gaussian_diffusion), or its schedule-transformed version with ``sampling_scheduler``."""
        if self.velocity_field is not None:
            return self.velocity_field(model)
        if self.sampling_scheduler is None:
            return model
        from .transforms import ScheduleTransformedModel

        return ScheduleTransformedModel(model, self.scheduler, self.sampling_scheduler)

    @torch.no_grad()
    def sample(self, model: Field, x_init: Tensor, *, y: Tensor | None = None,
               generator: torch.Generator | None = None, intermediates: bool = False) -> SolverResult:
        dtype = x_init.dtype if x_init.dtype.is_floating_point else torch.float32
        f, method = self.field(model), self.config.method
        if method in STAGES:
            exact = self.time_grid("cpu", torch.float64)
            if self.config.compile:
                key = (id(model), method)
                if key not in self._compiled:
                    self._compiled = {key: compiled_step(method, f)}  # one model at a time: no stale graphs
                step = self._compiled[key]

                def integrate(x, y, device_grid=None):
                    return integrate_compiled(step, x, exact, y, intermediates, device_grid)
            else:
                def integrate(x, y, device_grid=None):
                    return integrate_fixed(f, x, exact, method, y, intermediates, device_grid)
            if self.config.cuda_graph and x_init.is_cuda:
                x, traj = self._graph(model, integrate, x_init, exact, y, intermediates)
            else:
                x, traj = integrate(x_init, y)
            return SolverResult(x=x, nfe=(exact.shape[0] - 1) * STAGES[method],
                                trajectory=torch.stack(traj) if traj is not None else None,
                                times=exact.to(x_init.device, dtype) if intermediates else None)
        grid = self.time_grid(x_init.device, dtype)
        out_grid = grid if intermediates else grid[[0, -1]]
        states, nfe = integrate_adaptive(f, x_init, out_grid, method, y, atol=self.config.atol, rtol=self.config.rtol)
        return SolverResult(x=states[-1], nfe=nfe, trajectory=states if intermediates else None,
                            times=grid if intermediates else None)

    def _graph(self, model: Field, integrate, x: Tensor, exact: Tensor, y: Tensor | None, intermediates: bool):
        """Replay (capturing first, when the model, the grid or an input's layout changed) the CUDA graph of
        `integrate`. The cache holds the model itself, so its identity cannot be reused by another one."""
        key = (tuple(exact.tolist()), intermediates, x.shape, x.dtype, x.device,
               None if y is None else (y.shape, y.dtype))
        if self._graphed is None or self._graphed[0] != key or self._graphed[1] is not model:
            self._graphed = None  # release the old graph's memory pool before capturing the new one
            device_grid = exact.to(device=x.device, dtype=floating(x))
            graphed = GraphedIntegration(lambda x_, y_: integrate(x_, y_, device_grid), x, y)
            self._graphed = (key, model, graphed)
        return self._graphed[2](x, y)


def make_ode(config: ODEConfig, scheduler: Scheduler | None = None, path: Any = None, spec: Any = None) -> ODESolver:
    """Solver factory for ``plugin = "ode"``: continuous data; a path with ``velocity_field`` converts its
    model's output (then without ``grid = "edm"``, which needs a [scheduler])."""
    name = f"the [path] {type(path).__name__}"
    if spec is not None and spec.kind != "continuous":
        raise ConfigError(f"the ode solver integrates continuous states; {name} has {spec.kind} data "
                          f"(use its own solver, e.g. discrete_euler)", ("plugin",))
    if getattr(path, "manifold", None) is not None:
        raise ConfigError(f"{name} lies on the {path.manifold.name} manifold: the ode solver's Euclidean steps "
                          f"would leave it; use plugin = \"riemannian_ode\"", ("plugin",))
    if hasattr(path, "velocity_field") and config.grid == "edm" and config.times is None:
        raise ConfigError(f"the ode solver's edm grid needs a [scheduler]; {name} has its own schedule: use "
                          f"grid = \"uniform\", times, or the diffusion solvers' karras_sigmas", ("grid",))
    return ODESolver(config, scheduler, path)


def solve(model: Field, x_init: Tensor, *, method: str = "midpoint", steps: int = 20, y: Tensor | None = None,
          intermediates: bool = False, **options: Any) -> SolverResult:
    """Convenience: ``ODESolver(ODEConfig(method=..., steps=..., **options)).sample(model, x_init, ...)``."""
    return ODESolver(ODEConfig(method=method, steps=steps, **options)).sample(model, x_init, y=y,
                                                                             intermediates=intermediates)


__all__: Sequence[str] = [
    "METHODS",
    "ORDER",
    "STAGES",
    "TABLEAUS",
    "Tableau",
    "ODEConfig",
    "ODESolver",
    "GraphedIntegration",
    "compiled_step",
    "edm_grid",
    "edm_sigmas",
    "integrate_adaptive",
    "integrate_compiled",
    "integrate_fixed",
    "rk_step",
    "solve",
    "tableau_step",
    "uniform_grid",
]
