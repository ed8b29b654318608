"""Continuous flow matching: schedulers, the affine path, objectives and ODE solvers."""

from registry import hookimpl

FLOWFORGE_API = 1


@hookimpl
def flowforge_register(register):
    register("scheduler", "cond_ot", "plugins.flow_matching.schedulers:CondOTScheduler", None,
             doc="rectified flow / conditional OT: alpha_t = t, sigma_t = 1 - t")
    register("path", "affine", "plugins.flow_matching.paths:build_affine", None,
             doc="x_t = alpha_t x_1 + sigma_t x_0 over any scheduler, Gaussian source")
    register("objective", "velocity_mse", "plugins.flow_matching.objectives:VelocityMSE",
             "plugins.flow_matching.objectives:VelocityMSEConfig",
             doc="flow matching: E || u_theta(x_t, t) - (d_alpha x_1 + d_sigma x_0) ||^2")
    register("solver", "ode", "plugins.flow_matching.solvers:ODESolver", "plugins.flow_matching.solvers:ODEConfig",
             doc="fixed-step ODE solver: euler, midpoint, heun, rk4")
