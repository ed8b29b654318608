"""Error vs NFE of the diffusion solvers on an exact Gaussian model, next to diffusers' schedulers.

    python benchmarks/diffusion_nfe.py                # markdown table
    python benchmarks/diffusion_nfe.py --json

Data ``x0 ~ N(mu, diag(c^2))`` (``D = 16`` dimensions, ``mu`` in [-0.5, 0.5], ``c`` in [0.05, 0.5]) under
DDPM's linear schedule, ``T = 1000``. The epsilon model is exact: at a VE noise level ``s`` (linear in
the fractional training step between the table's entries, as every grid here does), with
``alpha = 1/sqrt(1+s^2)``, ``sigma = s alpha``, ``eps(x) = sigma (x - alpha mu) / (alpha^2 c^2 + sigma^2)``.
The probability-flow ODE then has a closed-form solution: with ``xbar = x / alpha``,
``xbar - mu`` scales as ``sqrt(c^2 + s^2)``, so from a solver's first noise level ``s_0``

    x0 = mu + (xbar_0 - mu) c / sqrt(c^2 + s_0^2).

Every solver starts from the same VP state ``x_init ~ N(0, I)`` (diffusers' VE schedulers from
``x_init * sqrt(1 + s_0^2)``) and the error is the RMS of ``x - x0`` over ``--samples`` samples and the
dimensions, against the exact solution from that solver's own ``s_0``. diffusers' Euler and Heun
evaluate the model at their own current sigma (Heun's intermediate timesteps come from a log-sigma
inversion that a step-interpolated model would read as another sigma). diffusers' schedulers run in
float64 (`tests/diffusers_float64.py`), flowforge's too, so the numbers are the methods' errors.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from _common import ROOT, emit, table  # noqa: F401  (puts the repository on sys.path)

import registry  # noqa: E402
from core.interfaces import DataSpec  # noqa: E402
from tests.diffusers_float64 import Float64Scheduler  # noqa: E402

T, D, NFES = 1000, 16, (5, 10, 20, 50)


class Gaussian:
    """The exact epsilon of the data model at a fractional training step (see the module docstring)."""

    def __init__(self, sigmas: np.ndarray, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.mu = torch.rand(D, generator=g, dtype=torch.float64) - 0.5
        self.c = 0.05 + 0.45 * torch.rand(D, generator=g, dtype=torch.float64)
        self.sigmas = sigmas
        self.calls = 0

    def eps(self, x: torch.Tensor, step) -> torch.Tensor:
        """At a (fractional) training step: ``s`` linear in the step between the table's entries."""
        return self.eps_at(x, np.interp(np.asarray(step, dtype=np.float64), np.arange(T), self.sigmas))

    def eps_at(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """At the VE noise level `sigma` (scalar or ``(B,)``)."""
        self.calls += 1
        s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1)
        a = 1 / torch.sqrt(1 + s ** 2)
        sv = s * a
        return sv * (x - a * self.mu) / (a ** 2 * self.c ** 2 + sv ** 2)

    def exact(self, x_init: torch.Tensor, s0: float) -> torch.Tensor:
        xbar = x_init * (1 + s0 ** 2) ** 0.5
        return self.mu + (xbar - self.mu) * self.c / (self.c ** 2 + s0 ** 2) ** 0.5


def flowforge(model: Gaussian, x: torch.Tensor, plugin: str, steps: int, **options) -> tuple[float, int]:
    path = registry.build("path", {"plugin": "gaussian_diffusion", "schedule": "linear", "steps": T,
                                   "variance": "fixed_small"}, spec=DataSpec((D,)))
    opts = {"respacing": f"ddim{steps}", "clip_denoised": False} if plugin == "ddim" else {"steps": steps}
    solver = registry.build("solver", {"plugin": plugin, **opts, **options}, path=path)
    field = lambda x_t, t, y=None: model.eps(x_t, ((1 - t.double()) * T - 1).numpy())  # noqa: E731
    out = solver.sample(field, x)
    if plugin in ("ddim", "ode"):  # ode: the probability flow from t = 0, the last training step
        ab = float(path.diffusion.tables["alphas_cumprod"][-1 if plugin == "ode" else solver.diffusion.timestep_map[-1]])
        s0 = ((1 - ab) / ab) ** 0.5
    else:
        s0 = float(solver.sigmas[0])
    return rms(out.x - model.exact(x, s0)), out.nfe


def diffusers_run(model: Gaussian, x: torch.Tensor, name: str, steps: int, **options) -> tuple[float, int]:
    import diffusers

    cls = getattr(diffusers, name)
    s = Float64Scheduler(cls, num_train_timesteps=T, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                         prediction_type="epsilon", **options)
    s.set_timesteps(steps)
    if hasattr(s, "sigmas") and name not in ("DDIMScheduler",):
        s0 = float(s.sigmas[0])
    else:
        ab = float(s.alphas_cumprod[int(s.timesteps[0])])
        s0 = ((1 - ab) / ab) ** 0.5
    ve = name in ("EulerDiscreteScheduler", "HeunDiscreteScheduler")
    sample = x * (1 + s0 ** 2) ** 0.5 if ve else x.clone()
    calls = model.calls
    for t in s.timesteps:
        inp = s.scale_model_input(sample, t)  # sets the VE schedulers' step_index
        # the VE schedulers' model sees their own sigma (Heun's intermediate timesteps are log-sigma inverted)
        eps = model.eps_at(inp, float(s.sigmas[s.step_index])) if ve else model.eps(inp, float(t))
        sample = s.step(eps, t, sample).prev_sample
    return rms(sample - model.exact(x, s0)), model.calls - calls


def rms(e: torch.Tensor) -> float:
    return float(e.pow(2).mean().sqrt())


#: (label, flowforge plugin and options, diffusers scheduler and options, steps for an NFE budget)
SOLVERS = [
    ("DDIM", ("ddim", {}), ("DDIMScheduler", {"clip_sample": False, "set_alpha_to_one": True}), None),
    ("DPM-Solver++ 2M", ("dpm_solver", {"order": 2}), ("DPMSolverMultistepScheduler", {"solver_order": 2}), None),
    ("DPM-Solver++ 3M", ("dpm_solver", {"order": 3}), ("DPMSolverMultistepScheduler", {"solver_order": 3}), None),
    ("DPM-Solver++ 2M Karras", ("dpm_solver", {"order": 2, "karras_sigmas": True}),
     ("DPMSolverMultistepScheduler", {"solver_order": 2, "use_karras_sigmas": True}), None),
    ("DPM-Solver++ 2S", ("dpm_solver", {"order": 2, "multistep": False}),
     ("DPMSolverSinglestepScheduler", {"solver_order": 2}), None),
    ("UniPC bh1", ("unipc", {"solver_type": "bh1"}), ("UniPCMultistepScheduler", {"solver_type": "bh1"}), None),
    ("UniPC bh2", ("unipc", {"solver_type": "bh2"}), ("UniPCMultistepScheduler", {"solver_type": "bh2"}), None),
    ("Euler", ("euler", {}), ("EulerDiscreteScheduler", {}), None),
    ("Heun", ("heun", {}), ("HeunDiscreteScheduler", {}), lambda nfe: (nfe + 1) // 2),
    ("ode midpoint (probability flow in t)", ("ode", {"method": "midpoint"}), None, lambda nfe: max(nfe // 2, 1)),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    import diffusers

    sigmas = np.sqrt(1 / np.cumprod(1 - np.linspace(1e-4, 0.02, T)) - 1)
    model = Gaussian(sigmas)
    x = torch.randn(args.samples, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    rows, figures = [], {}
    for label, (plugin, ff_opts), reference, to_steps in SOLVERS:
        for nfe in NFES:
            steps = to_steps(nfe) if to_steps else nfe
            ours, our_nfe = flowforge(model, x, plugin, steps, **ff_opts)
            if reference is None:
                rows.append([label, our_nfe, ours, "-", "-", "-"])
                figures[f"{label}/{nfe}"] = {"flowforge": ours, "nfe": our_nfe}
                continue
            theirs, their_nfe = diffusers_run(model, x, reference[0], steps, **reference[1])
            rows.append([label, our_nfe, ours, their_nfe, theirs, ours / theirs])
            figures[f"{label}/{nfe}"] = {"flowforge": ours, "diffusers": theirs, "nfe": our_nfe, "nfe_diffusers": their_nfe}
    text = table(["solver", "NFE", "flowforge RMS error", "diffusers NFE", f"diffusers {diffusers.__version__}",
                  "ratio"], rows)
    emit(figures, text, args.json)


if __name__ == "__main__":
    main()
