"""A time-conditioned MLP backbone for low-dimensional data (2D points, flattened small images)."""

from registry import hookimpl

FLOWFORGE_API = 1


@hookimpl
def flowforge_register(register):
    register("backbone", "mlp", "plugins.mlp.model:make_mlp", "plugins.mlp.model:MLPConfig",
             doc="time-conditioned MLP (continuous or discrete data, optional class labels)", default=True)
