"""Metrics comparing generated samples with held-out data."""

from registry import hookimpl

FLOWFORGE_API = 1


@hookimpl
def flowforge_register(register):
    register("metric", "energy_distance", "plugins.metrics.distances:make_energy_distance", None,
             doc="energy distance (V-statistic) between generated and held-out samples; lower is better")
    register("metric", "sliced_wasserstein", "plugins.metrics.distances:make_sliced_wasserstein",
             "plugins.metrics.distances:SlicedWassersteinConfig",
             doc="sliced 1-Wasserstein distance over random projections; lower is better")
