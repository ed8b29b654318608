"""``decoded``: any sample metric computed on decoded images instead of latents.

``[[metrics]] plugin = "decoded"`` with ``metric = {plugin = "frechet_distance", ...}`` builds the
inner metric for the latent source's *image* data (its spec and data source: a trained feature
network is trained on the images) and hands it images:

* ``reference = "images"`` (the default, the published protocol): the metric has ``space =
  "observations"`` (`core.interfaces.SampleMetric`), so the runner hands it the generated latents
  decoded (``autoencoder.decode(z)`` clamped to [-1, 1], each rank its own blocks) and the *real*
  held-out images the reference latents were encoded from; the data floor is real against real.
* ``reference = "reconstructions"``: every batch, generated or held-out, is decoded here, so the
  reference is the VAE's reconstruction of the held-out images and the floor reconstruction against
  reconstruction: the generative error alone, without the VAE's.
"""

from __future__ import annotations

from typing import Any, Literal

import attrs
from torch import Tensor

import registry
from registry import ConfigError

from .data import LatentData


@attrs.define
class DecodedConfig:
    """Options of the decoded metric.

    Attributes:
        metric: the inner sample metric, a table with its ``plugin`` and options.
        name: the summary key (default: ``decoded``, made unique with a suffix).
        reference: compare with the real held-out "images" or with their VAE "reconstructions".
    """

    metric: dict[str, Any]
    name: str = ""
    reference: Literal["images", "reconstructions"] = "images"

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.metric, dict) or "plugin" not in self.metric:
            raise ConfigError("expected a table naming a sample metric, e.g. {plugin = \"frechet_distance\"}",
                              ("metric",))
        try:
            self.metric = registry.resolved("metric", self.metric)
        except ConfigError as exc:
            raise exc.within("metric") from None


class Decoded:
    """The inner metric on images: with ``space = "observations"`` the runner hands it images and
    ``update(images, real)`` forwards them; otherwise ``update(z, real)`` calls ``inner.update(decode(z), real)``."""

    def __init__(self, inner: Any, data: LatentData, reference: str = "images"):
        self.inner, self.data = inner, data
        self.space = "observations" if reference == "images" else "model"
        self.higher_is_better = getattr(inner, "higher_is_better", None)

    #: attributes that are the inner metric's (read and written through)
    FORWARDED = ("result_names", "distributed_available_fn")

    def __getattr__(self, name: str) -> Any:
        if name not in Decoded.FORWARDED:
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in Decoded.FORWARDED:
            setattr(self.inner, name, value)
        else:
            object.__setattr__(self, name, value)

    def update(self, samples: Tensor, real: bool) -> None:
        self.inner.update(samples if self.space == "observations" else self.data.decode(samples), real=real)

    def compute(self) -> Any:
        return self.inner.compute()

    def reset(self) -> None:
        self.inner.reset()


def make_decoded(config: DecodedConfig, data: Any) -> Decoded:
    """Metric factory: the inner metric built for the image data behind `data` (a latent source)."""
    if not isinstance(data, LatentData):
        raise ConfigError("the decoded metric needs latent data: [data] plugin = \"latent\"", ("plugin",))
    inner = registry.build("metric", config.metric, spec=data.observation.spec, data=data.observation)
    if hasattr(inner, "evaluate") or not hasattr(inner, "update"):
        raise ConfigError(f"{config.metric['plugin']!r} is not a sample metric (update / compute)", ("metric",))
    return Decoded(inner, data, config.reference)
