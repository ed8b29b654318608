"""Continuous flow matching: schedulers, the affine path, objectives, ODE solvers, likelihoods.

Components (``flowforge plugins --options NAME`` lists each one's options):

* schedulers ``cond_ot``, ``polynomial``, ``cosine``, ``vp``, ``linear_vp`` (scheduler.py)
* path ``affine`` with velocity / epsilon / x_1 conversions (path.py); paths ``interpolant``
  (stochastic interpolants) and ``schrodinger_bridge`` (SB-CFM) (interpolants.py)
* minibatch couplings of the objective: ``ot``, ``sinkhorn``, ``class_ot`` (couplings.py)
* objectives ``flow_matching`` and its older name ``velocity_mse`` (objective.py)
* solver ``ode``: euler, midpoint, heun, rk4, dopri5, dopri8; uniform, EDM or explicit grids;
  sampling under another scheduler (solver.py, transforms.py)
* path ``geodesic`` (Riemannian flow matching on the sphere, flat torus or R^D; geodesic.py, manifolds.py)
  and its solver ``riemannian_ode`` (riemannian.py)
* solver ``sde``: Euler-Maruyama and stochastic Heun with SiT's diffusion choices (sde.py)
* metrics ``likelihood`` (NLL / bits per dim, likelihood.py; ``dequantize`` for 8-bit images,
  dequantize.py) and ``few_step`` (a sample
  metric under another solver, e.g. one step; metrics.py)
"""

from registry import hookimpl

FLOWFORGE_API = 1

_M = "plugins.flow_matching."


@hookimpl
def flowforge_register(register):
    register("scheduler", "cond_ot", _M + "scheduler:make_cond_ot", None,
             doc="rectified flow / conditional OT: alpha_t = t, sigma_t = 1 - t", default=True)
    register("scheduler", "polynomial", _M + "scheduler:make_polynomial", _M + "scheduler:PolynomialConfig",
             doc="polynomial convex: alpha_t = t^n, sigma_t = 1 - t^n")
    register("scheduler", "cosine", _M + "scheduler:make_cosine", None,
             doc="cosine: alpha_t = sin(pi t / 2), sigma_t = cos(pi t / 2)")
    register("scheduler", "vp", _M + "scheduler:make_vp", _M + "scheduler:VPConfig",
             doc="variance preserving SDE schedule with linear beta(beta_min, beta_max)")
    register("scheduler", "linear_vp", _M + "scheduler:make_linear_vp", None,
             doc="linear variance preserving: alpha_t = t, sigma_t = sqrt(1 - t^2)")
    register("path", "affine", _M + "path:make_affine", None,
             doc="x_t = alpha_t x_1 + sigma_t x_0 over any scheduler, Gaussian source; prediction conversions",
             default=True)
    register("objective", "flow_matching", _M + "objective:make_flow_matching", _M + "objective:FlowMatchingConfig",
             doc="flow matching with a velocity, epsilon or x1 target, loss weighting and time samplers")
    register("objective", "velocity_mse", _M + "objective:make_velocity_mse", _M + "objective:VelocityMSEConfig",
             doc="flow matching: E || u_theta(x_t, t) - (d_alpha x_1 + d_sigma x_0) ||^2 (same as flow_matching)",
             default=True)
    register("path", "interpolant", _M + "interpolants:make_interpolant", _M + "interpolants:InterpolantConfig",
             doc="stochastic interpolant x_t = alpha_t x_1 + sigma_t x_0 + gamma_t z (Albergo & Vanden-Eijnden)")
    register("path", "schrodinger_bridge", _M + "interpolants:make_schrodinger_bridge",
             _M + "interpolants:SchrodingerConfig",
             doc="SB-CFM: x_t = t x_1 + (1 - t) x_0 + sigma sqrt(t (1 - t)) z; pair with coupling = \"sinkhorn\"")
    register("solver", "ode", _M + "solver:make_ode", _M + "solver:ODEConfig",
             doc="ODE solver: euler, midpoint, heun, rk4 (fixed steps), dopri5, dopri8 (adaptive)", default=True)
    register("solver", "sde", _M + "sde:make_sde", _M + "sde:SDEConfig",
             doc="SDE sampler: Euler-Maruyama or stochastic Heun, SiT's diffusions, last-step denoising")
    register("path", "geodesic", _M + "geodesic:make_geodesic", _M + "geodesic:GeodesicConfig",
             doc="Riemannian FM: x_t = exp_{x_0}(kappa_t log_{x_0} x_1) on the sphere, flat torus or R^D")
    register("solver", "riemannian_ode", _M + "riemannian:make_riemannian_ode", _M + "riemannian:RiemannianODEConfig",
             doc="ODE solver on a geodesic path's manifold: euler, midpoint, heun, rk4 steps by exp map / projection")
    register("metric", "likelihood", _M + "likelihood:make_likelihood", _M + "likelihood:LikelihoodConfig",
             doc="negative log-likelihood / bits per dim of held-out data (exact or Hutchinson divergence)")
    register("metric", "few_step", _M + "metrics:make_few_step", _M + "metrics:FewStepConfig",
             doc="a sample metric of the model under its own solver (default: one euler step)")
