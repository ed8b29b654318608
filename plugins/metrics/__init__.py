"""Metrics comparing generated samples with held-out data (raw-space distances and feature-space metrics),
and the ``feature_extractor`` kind the feature-space metrics use (section ``[feature_extractor]``: the
experiment's default extractor)."""

from registry import hookimpl

FLOWFORGE_API = 1


@hookimpl
def flowforge_register_kinds(register_kind):
    register_kind("feature_extractor", needs=("spec", "data"),
                  doc="maps examples (B, ...) to features (B, F) for feature-space metrics; [feature_extractor] "
                      "is the experiment's default for metrics without a features option")


@hookimpl
def flowforge_register(register):
    register("feature_extractor", "digits_cnn", "plugins.metrics.trained:make_digits_cnn",
             "plugins.metrics.trained:DigitsCNNConfig",
             doc="a small CNN (an MLP for non-images) trained on the run's training split and cached; the default")
    register("feature_extractor", "inception", "plugins.metrics.inception:make_inception",
             "plugins.metrics.inception:InceptionConfig",
             doc="InceptionV3 pool3 features (2048-d, FID's network) from a local weights file, never downloaded")
    register("feature_extractor", "raw", "plugins.metrics.features:make_raw", None,
             doc="the flattened examples themselves")
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
