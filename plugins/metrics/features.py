"""Feature extractors, a component kind (``feature_extractor``), and the feature options of the metrics.

A feature extractor maps examples ``x (B, *spec.shape)`` (floats in [-1, 1], or
token ids for discrete data) to features ``(B, F)``. It is built through the
registry like any component, from a table whose ``plugin`` names it; three come
with flowforge:

* ``digits_cnn``: a small network trained on the run's own training split and
  cached (`plugins.metrics.trained`); the default.
* ``inception``: InceptionV3's pool3 features from a local weights file
  (`plugins.metrics.inception`).
* ``raw``: the flattened examples themselves (2D toy data, latents, tests).

A third-party extractor is any object called as ``extractor(x) -> (B, F)``; an
attribute ``identity`` (JSON-able) names what determines its features, and only
an extractor with one gets its reference statistics cached on disk
(`plugins.metrics.refcache`).

Discrete examples (token ids ``0..V-1``) are mapped to floats as
``2 v / (V - 1) - 1`` before a built-in network sees them (``V`` without a mask
token added for the mask source), which for the digits is exactly the
continuous form ``v / 8 - 1``.

Which extractor a metric uses (`build_extractor`): its ``features`` option (a
name or a table, resolved with the extractor's defaults when the experiment is
validated), else the older options (``feature_extractor = "trained" |
"inception" | "raw"`` with ``weights`` and the training options, which map to
``digits_cnn``, ``inception`` and ``raw``) when any differs from its default,
else the experiment's ``[feature_extractor]`` section, else ``digits_cnn`` with
its defaults. With ``features`` set, ``feature_extractor`` and ``weights`` are
refused and the older training options are not used.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import attrs
import torch
from torch import Tensor, nn

from core.interfaces import DataSource, DataSpec
from registry import ConfigError

#: The older ``feature_extractor`` names and the plugins they stand for.
LEGACY_NAMES = {"trained": "digits_cnn", "inception": "inception", "raw": "raw"}
#: The older options that configure the trained network (with ``cache_dir``).
TRAINING_KEYS = ("feature_dim", "train_steps", "train_batch_size", "train_lr", "feature_seed")

FEATURE_OPTIONS_DOC = """
        features: the feature extractor: a feature_extractor plugin name ("digits_cnn", "inception",
            "raw", or a third-party one) or a table with its options, e.g. {plugin = "inception",
            weights = "/path/to/pt_inception-2015-12-05-6726825d.pth"}. Default: the experiment's
            [feature_extractor] section, else "digits_cnn".
        cache_reference: cache the reference set's statistics on disk, keyed by a fingerprint of
            the reference examples and the extractor's identity (only extractors with an identity).
        cache_dir: where reference statistics (reference/) and, for the older options, trained
            networks (features/) are cached (default $FLOWFORGE_CACHE, else
            $XDG_CACHE_HOME/flowforge, else ~/.cache/flowforge).
        feature_extractor: older form of features: "trained" (digits_cnn), "inception" or "raw".
        weights: older form: the InceptionV3 weights file for feature_extractor = "inception".
        feature_dim: older form (not used with features): digits_cnn's feature_dim.
        train_steps: older form (not used with features): digits_cnn's train_steps.
        train_batch_size: older form (not used with features): digits_cnn's train_batch_size.
        train_lr: older form (not used with features): digits_cnn's train_lr.
        feature_seed: older form (not used with features): digits_cnn's feature_seed."""


@attrs.define
class FeatureConfig:
    features: str | dict[str, Any] = ""
    cache_reference: bool = True
    cache_dir: str = ""
    feature_extractor: Literal["trained", "inception", "raw"] = "trained"
    weights: str = ""
    feature_dim: int = 128
    train_steps: int = 1000
    train_batch_size: int = 128
    train_lr: float = 1e-3
    feature_seed: int = 0

    def __attrs_post_init__(self) -> None:
        for key in ("feature_dim", "train_steps", "train_batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"expected a positive integer, got {getattr(self, key)!r}", (key,))
        if self.train_lr <= 0:
            raise ConfigError(f"expected a positive number, got {self.train_lr!r}", ("train_lr",))
        if self.features:
            self.features = _resolved_features(self.features)
        if self.features and (self.feature_extractor != "trained" or self.weights):
            key = "feature_extractor" if self.feature_extractor != "trained" else "weights"
            raise ConfigError(f"{key} is the older form of features; give one of them (with features set, the "
                              f"extractor's options go in its table, e.g. features = {{plugin = \"inception\", "
                              f"weights = \"w.pth\"}})", (key,))


def _resolved_features(value: str | dict[str, Any]) -> dict[str, Any]:
    """The ``features`` table with every default of its extractor filled in; ConfigError at ``features``."""
    import registry

    mapping = {"plugin": value} if isinstance(value, str) else dict(value)
    if "plugin" not in mapping:
        raise ConfigError("the features table needs a plugin key (a feature_extractor plugin)", ("features",))
    try:
        return registry.resolved("feature_extractor", mapping)
    except ConfigError as exc:
        raise exc.within("features") from None


FeatureConfig.__doc__ = ("Options of frechet_distance (shared by every feature-space metric).\n\n    Attributes:"
                         + FEATURE_OPTIONS_DOC)


def to_float(x: Tensor, spec: DataSpec) -> Tensor:
    """Examples as float32: token ids ``v`` of discrete data become ``2 v / (V - 1) - 1``, with ``V`` the
    data's vocabulary (without a mask token added for the mask source, ``spec.extra["mask_token"]``)."""
    if spec.kind == "discrete":
        levels = spec.vocab_size - (1 if "mask_token" in spec.extra else 0)
        return x.float() * (2.0 / max(1, levels - 1)) - 1.0
    return x.float()


def default_cache_dir() -> Path:
    """``$FLOWFORGE_CACHE``, else ``$XDG_CACHE_HOME/flowforge``, else ``~/.cache/flowforge``."""
    if os.environ.get("FLOWFORGE_CACHE"):
        return Path(os.environ["FLOWFORGE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "flowforge"


def spec_identity(spec: DataSpec) -> dict[str, Any]:
    """What of the data's spec changes an extractor's input (shape, kind, vocabulary), as plain data."""
    return {"shape": list(spec.shape), "kind": spec.kind, "vocab_size": spec.vocab_size,
            "mask_token": "mask_token" in spec.extra}


class FeatureExtractor(nn.Module):
    """Maps examples ``(B, *spec.shape)`` to features ``(B, F)`` (float64, on the examples' device).

    Never leaves evaluation mode and keeps no gradients. A network runs on this process's GPU when
    there is one, in chunks of `batch_size` examples. ``identity`` (None unless given) is what determines
    the features besides the examples: the plugin name, the data's spec and the given mapping (weights
    hash, network key); the reference cache keys on it.
    """

    def __init__(self, body: nn.Module | None, spec: DataSpec, name: str, batch_size: int = 1024,
                 identity: dict[str, Any] | None = None):
        super().__init__()
        self.body, self.spec, self.name, self.batch_size = body, spec, name, batch_size
        self.identity = None if identity is None else {"plugin": name, "spec": spec_identity(spec), **identity}

    def train(self, mode: bool = True) -> FeatureExtractor:  # never leaves evaluation mode
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        h = to_float(x, self.spec)
        if self.body is None:
            return h.reshape(h.shape[0], -1).double()
        device = next(self.body.parameters()).device
        if device.type == "cpu" and torch.cuda.is_available():
            device = torch.device("cuda", torch.cuda.current_device())
            self.body.to(device)
        out = [self.body(chunk.to(device)).reshape(len(chunk), -1).double().to(x.device)
               for chunk in h.split(self.batch_size)]
        return torch.cat(out)


def make_raw(spec: DataSpec) -> FeatureExtractor:
    """Feature-extractor factory for ``plugin = "raw"``: the flattened examples, ``(B, prod(shape))``."""
    return FeatureExtractor(None, spec, "raw", identity={})


def _legacy_options(config: FeatureConfig) -> list[str]:
    """The older extractor options of `config` that differ from their defaults."""
    defaults = FeatureConfig()
    return [k for k in ("feature_extractor", "weights", *TRAINING_KEYS) if getattr(config, k) != getattr(defaults, k)]


def extractor_mapping(config: FeatureConfig) -> tuple[dict[str, Any], bool]:
    """(the feature_extractor table `config` asks for, whether it asks explicitly); see the module docstring."""
    if config.features:
        return dict(config.features), True
    name = LEGACY_NAMES[config.feature_extractor]
    if name == "digits_cnn":
        mapping = {"plugin": name, **{k: getattr(config, k) for k in TRAINING_KEYS}, "cache_dir": config.cache_dir}
    elif name == "inception":
        mapping = {"plugin": name, **({"weights": config.weights} if config.weights else {})}
    else:
        mapping = {"plugin": name}
    return mapping, bool(_legacy_options(config))


def build_extractor(config: FeatureConfig, spec: DataSpec, data: DataSource | None = None,
                    default: Any = None) -> Any:
    """The feature extractor a metric's options ask for, built through the registry (`default`: the
    experiment's ``[feature_extractor]``, used when the options name none). ConfigError at key ``features``."""
    import registry

    mapping, explicit = extractor_mapping(config)
    if default is not None and not explicit:
        return default
    try:
        return registry.build("feature_extractor", mapping, spec=spec, data=data)
    except ConfigError as exc:
        raise exc.within("features") from None
