"""flowforge-sde: stochastic sampling of flow models (an example of an external flowforge plugin).

This module is what the entry point ``flowforge_sde = "flowforge_sde"`` names.
It implements the ``flowforge_register`` hook and imports nothing heavy: the
factory and the config class are given as ``"module:attribute"`` strings and
imported only when an experiment builds the solver.
"""

from registry import hookimpl

#: The flowforge plugin API this package is written for (see docs/plugins.md, "Versioning").
FLOWFORGE_API = 1


@hookimpl
def flowforge_register(register):
    register("solver", "euler_maruyama", "flowforge_sde.sampler:build", "flowforge_sde.sampler:SDEConfig",
             doc="stochastic sampler: Euler-Maruyama on the SDE with the probability-flow ODE's marginals")
