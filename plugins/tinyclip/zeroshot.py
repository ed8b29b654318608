"""Zero-shot classification and image-text retrieval of a CLIP model on held-out pairs.

For ``n`` held-out pairs (drawn with the evaluation generator) and the data's
classes and prompt templates (``spec.extra["class_names"]``,
``spec.extra["templates"]``, or this metric's own ``templates``):

* **classification**: each class's text embedding is the normalised mean of
  the normalised embeddings of its prompts (``template.format(class_name)``);
  an image's prediction ranks the classes by cosine similarity.
  ``top1`` / ``top5``: the share of images whose label is among the first 1 / 5
  (``top5`` is 1 when there are at most 5 classes).
* **retrieval** between the ``n`` images and the distinct captions among
  their ``n`` captions (templated data repeats captions; each distinct one is
  in the gallery once): ``i2t_r1`` / ``i2t_r5``: the share of images whose own
  caption is among the 1 / 5 captions most similar to the image;
  ``t2i_r1`` / ``t2i_r5``: the share of distinct captions for which an image
  with that caption is among the 1 / 5 most similar images. With one caption
  per image these are the usual recall@K.

Values are fractions in [0, 1]. The model must have ``encode_image`` and
``encode_text``; it is evaluated in eval mode without gradients.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.interfaces import DataSource
from core.nn import model_device
from registry import ConfigError


@attrs.define
class ZeroShotConfig:
    """Options of the ``zero_shot`` metric.

    Attributes:
        num_examples: held-out pairs evaluated (at most the held-out set's size).
        batch_size: images or captions per forward pass.
        templates: prompt templates with one ``{}`` (empty: the data's own).
    """

    num_examples: int = 1000
    batch_size: int = 500
    templates: list[str] = attrs.Factory(list)

    def __attrs_post_init__(self) -> None:
        for key in ("num_examples", "batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"expected a positive integer, got {getattr(self, key)!r}", (key,))
        for t in self.templates:
            if t.count("{}") != 1:
                raise ConfigError(f"each template needs exactly one '{{}}', got {t!r}", ("templates",))


def _embed(fn, x: Tensor, batch_size: int, device: torch.device) -> Tensor:
    return F.normalize(torch.cat([fn(x[i:i + batch_size].to(device)).float().cpu()
                                  for i in range(0, len(x), batch_size)]), dim=-1)


def class_embeddings(model: nn.Module, tokenizer, class_names: Sequence[str], templates: Sequence[str],
                     batch_size: int = 500, device: torch.device | str = "cpu") -> Tensor:
    """``(C, E)``: per class, the normalised mean of its prompts' normalised text embeddings."""
    prompts = [t.format(name) for name in class_names for t in templates]
    emb = _embed(model.encode_text, tokenizer.encode(prompts), batch_size, torch.device(device))
    return F.normalize(emb.view(len(class_names), len(templates), -1).mean(1), dim=-1)


def topk_accuracy(scores: Tensor, labels: Tensor, k: int) -> float:
    """Share of rows of ``scores (N, C)`` whose label is among the `k` highest scores."""
    k = min(k, scores.shape[1])
    return (scores.topk(k, dim=1).indices == labels[:, None]).any(1).float().mean().item()


def retrieval_recall(sims: Tensor, query_group: Tensor, item_group: Tensor, k: int) -> float:
    """Share of queries (rows of ``sims (Q, M)``) with an item of their own group among the `k` most similar."""
    k = min(k, sims.shape[1])
    top = sims.topk(k, dim=1).indices
    return (item_group[top] == query_group[:, None]).any(1).float().mean().item()


class ZeroShot:
    """The ``zero_shot`` ModelMetric; see the module docstring."""

    def __init__(self, config: ZeroShotConfig | None = None):
        self.config = config or ZeroShotConfig()

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: DataSource, generator: torch.Generator) -> dict[str, float]:
        extra = dict(data.spec.extra or {})
        tokenizer = extra.get("tokenizer")
        if tokenizer is None:
            raise ConfigError("zero_shot needs a data source with a tokenizer (spec.extra['tokenizer']), "
                              "e.g. clip_shapes, clip_digits or clip_pairs")
        cfg = self.config
        held_out = getattr(data, "held_out", None)  # TensorDataSource: use a small held-out set whole, never repeated
        n = min(cfg.num_examples, len(held_out["image"])) if isinstance(held_out, dict) else cfg.num_examples
        batch = data.reference(n, generator)
        device = model_device(model)
        was_training = model.training
        model.eval()
        try:
            images = _embed(model.encode_image, batch["image"], cfg.batch_size, device)
            distinct, group = torch.unique(batch["text"], dim=0, return_inverse=True)
            texts = _embed(model.encode_text, distinct, cfg.batch_size, device)
            out: dict[str, float] = {}
            class_names, templates = extra.get("class_names") or [], cfg.templates or extra.get("templates") or []
            if class_names and templates and "label" in batch:
                classes = class_embeddings(model, tokenizer, class_names, templates, cfg.batch_size, device)
                scores = images @ classes.T
                out["top1"] = topk_accuracy(scores, batch["label"], 1)
                out["top5"] = topk_accuracy(scores, batch["label"], 5)
            sims = images @ texts.T  # (n images, distinct captions); image i's caption is distinct[group[i]]
            caption_ids = torch.arange(len(distinct))
            for k in (1, 5):
                out[f"i2t_r{k}"] = retrieval_recall(sims, group, caption_ids, k)
            for k in (1, 5):
                out[f"t2i_r{k}"] = retrieval_recall(sims.T, caption_ids, group, k)
            return out
        finally:
            model.train(was_training)


def make_zero_shot(config: ZeroShotConfig | None = None) -> ZeroShot:
    """Metric factory for ``plugin = "zero_shot"``."""
    return ZeroShot(config)
