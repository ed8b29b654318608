"""Metrics comparing generated samples with held-out data (raw-space distances and feature-space metrics)."""

from registry import hookimpl

FLOWFORGE_API = 1


@hookimpl
def flowforge_register(register):
    register("metric", "energy_distance", "plugins.metrics.distances:make_energy_distance", None,
             doc="energy distance (V-statistic) between generated and held-out samples; lower is better",
             default=True)
    register("metric", "sliced_wasserstein", "plugins.metrics.distances:make_sliced_wasserstein",
             "plugins.metrics.distances:SlicedWassersteinConfig",
             doc="sliced 1-Wasserstein distance over random projections; lower is better")
    register("metric", "frechet_distance", "plugins.metrics.feature_metrics:make_frechet_distance",
             "plugins.metrics.features:FeatureConfig",
             doc="Frechet distance of Gaussians fitted to features (FID with Inception); lower is better")
    register("metric", "kid", "plugins.metrics.feature_metrics:make_kid", "plugins.metrics.feature_metrics:KIDConfig",
             doc="kernel distance: unbiased squared MMD of features, cubic polynomial kernel; lower is better")
    register("metric", "precision_recall", "plugins.metrics.feature_metrics:make_precision_recall",
             "plugins.metrics.feature_metrics:PrecisionRecallConfig",
             doc="precision and recall of generated samples (k-NN manifolds in feature space); higher is better")
    register("metric", "off_support", "plugins.metrics.support:make_off_support", None,
             doc="fraction of generated samples outside the data's known support (floor 0) with its standard error")
