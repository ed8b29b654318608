"""The ``zeroshot`` metric: CLIP's zero-shot protocol, sharded over processes.

For the first ``n`` held-out pairs (the whole held-out split by default; a
``seed``-ed subset of ``num_examples`` otherwise, the same on every process)
with images ``x_i``, captions ``c_i`` and labels ``y_i``:

* **classifier**: for class ``k`` with name ``name_k`` and templates ``t_1..t_T``
  (the 80 OpenAI ImageNet templates, CIFAR-10's 18, the data's own, or a file;
  `plugins.tinyclip.prompts`)::

      w_k = normalize( (1/T) sum_j normalize(encode_text(t_j.format(name_k))) )     (C, E)

  ``top1`` / ``top5``: the share of images whose label is among the 1 / 5 classes of
  highest ``<normalize(encode_image(x_i)), w_k>``.
* **retrieval** between the images and the distinct captions (a caption repeated by
  templated data is in the gallery once; with unique captions these are the usual
  recalls): ``i2t_rK`` — the share of images whose own caption is among the K captions
  most similar to it; ``t2i_rK`` — the share of distinct captions with one of their
  images among the K most similar images; K in ``recall_at`` (1, 5, 10).

Sharding: images, captions and the ``C x T`` prompts are cut into blocks of
``batch_size`` (`core.collectives.blocks`); each process embeds its blocks, the
embeddings are gathered in global order and every process computes the same
numbers (so 1 and N processes agree). The model runs in eval mode without
gradients. Values are fractions in [0, 1].
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.collectives import Group, blocks
from core.interfaces import DataSource
from registry import ConfigError

from . import prompts
from .zeroshot import retrieval_recall, topk_accuracy


@attrs.define
class ZeroShotProtocolConfig:
    """Options of the ``zeroshot`` metric.

    Attributes:
        templates: "data" (the data's own prompts), "openai_imagenet" (80), "cifar10" (18), or a file
            of templates, one a line with one ``{}``.
        classes: "data" (the data's class names), "imagenet" (OpenAI CLIP's 1000), "cifar10", "digits",
            "shapes", or a file of class names in label order.
        num_examples: held-out pairs evaluated (0: the whole held-out split).
        batch_size: images, captions or prompts per forward pass (and per shard block).
        seed: seed of the subset when num_examples is smaller than the held-out split.
        recall_at: the K of the retrieval recalls R@K.
    """

    templates: str = "data"
    classes: str = "data"
    num_examples: int = 0
    batch_size: int = 256
    seed: int = 0
    recall_at: list[int] = attrs.Factory(lambda: [1, 5, 10])

    def __attrs_post_init__(self) -> None:
        if self.num_examples < 0:
            raise ConfigError(f"expected a non-negative integer (0: all), got {self.num_examples}", ("num_examples",))
        if self.batch_size < 1:
            raise ConfigError(f"expected a positive integer, got {self.batch_size}", ("batch_size",))
        if not self.recall_at or min(self.recall_at) < 1:
            raise ConfigError(f"expected positive integers, got {self.recall_at}", ("recall_at",))
        if self.templates != "data":
            prompts.templates(self.templates)  # fail at configuration time, not after training
        if self.classes != "data":
            prompts.class_names(self.classes)


def embed_sharded(encode: Callable[[Tensor], Tensor], rows: Callable[[int, int], Tensor], n: int, batch_size: int,
                  group: Group, device: torch.device) -> Tensor:
    """``(n, E)`` unit-norm ``encode(rows(a, b))`` over blocks ``[a, b)``, this process's blocks embedded
    here and every block gathered in global order (float32, CPU)."""
    mine = [F.normalize(encode(rows(a, b).to(device)).float(), dim=-1).cpu()
            for a, b in blocks(n, batch_size, group.rank, group.world_size)]
    return group.gather_cat(torch.cat(mine) if mine else torch.empty(0))


def classifier(model: nn.Module, tokenizer, class_names: list[str], templates: list[str], batch_size: int,
               group: Group, device: torch.device) -> Tensor:
    """``(C, E)``: per class, the normalised mean of its prompts' normalised text embeddings."""
    texts = [t.format(name) for name in class_names for t in templates]
    emb = embed_sharded(model.encode_text, lambda a, b: tokenizer.encode(texts[a:b]), len(texts), batch_size,
                        group, device)
    return F.normalize(emb.view(len(class_names), len(templates), -1).mean(1), dim=-1)


def first_of_each(tokens: Tensor) -> tuple[Tensor, Tensor]:
    """``(first (G,), group (N,))``: the distinct rows of ``tokens (N, L)``, as the index of each one's first
    occurrence, and each row's distinct-row index."""
    _, group = torch.unique(tokens, dim=0, return_inverse=True)
    first = torch.full((int(group.max()) + 1,), len(tokens), dtype=torch.long)
    return first.scatter_reduce(0, group, torch.arange(len(tokens)), reduce="amin"), group


def _held_out_size(data: DataSource, requested: int) -> int:
    held_out = getattr(data, "held_out", None)
    if isinstance(held_out, dict) and held_out:
        total = len(next(iter(held_out.values())))
        return min(requested, total) if requested else total
    if not requested:
        raise ConfigError("this data source does not expose its held-out size; set num_examples", ("num_examples",))
    return requested


class ZeroShotProtocol:
    """The ``zeroshot`` ModelMetric; see the module docstring."""

    def __init__(self, config: ZeroShotProtocolConfig | None = None):
        self.config = config or ZeroShotProtocolConfig()

    def _prompts(self, extra: dict) -> tuple[list[str], list[str]]:
        cfg = self.config
        names = list(extra.get("class_names") or []) if cfg.classes == "data" else prompts.class_names(cfg.classes)
        templates = list(extra.get("templates") or []) if cfg.templates == "data" else prompts.templates(cfg.templates)
        return names, templates

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: DataSource, generator: torch.Generator | None = None
                 ) -> dict[str, float]:
        """The metrics of the module docstring (`generator` is unused: the protocol is deterministic)."""
        extra = dict(data.spec.extra or {})
        tokenizer = extra.get("tokenizer")
        if tokenizer is None:
            raise ConfigError("zeroshot needs a data source with a tokenizer (spec.extra['tokenizer']), e.g. "
                              "clip_shapes, clip_digits or clip_pairs")
        cfg, group = self.config, Group()
        n = _held_out_size(data, cfg.num_examples)
        device = next(iter(model.parameters()), torch.zeros(())).device
        cache: dict[tuple[int, int], dict[str, Tensor]] = {}

        def part(a: int, b: int) -> dict[str, Tensor]:
            if (a, b) not in cache:
                cache[(a, b)] = data.reference_slice(n, cfg.seed, a, b)
            return cache[(a, b)]

        was_training = model.training
        model.eval()
        try:
            images = embed_sharded(model.encode_image, lambda a, b: part(a, b)["image"], n, cfg.batch_size, group,
                                   device)
            captions = embed_sharded(model.encode_text, lambda a, b: part(a, b)["text"], n, cfg.batch_size, group,
                                     device)
            mine = [part(a, b) for a, b in blocks(n, cfg.batch_size, group.rank, group.world_size)]
            tokens = group.gather_cat(torch.cat([p["text"] for p in mine]) if mine else torch.empty(0, dtype=torch.long))
            out: dict[str, float] = {}
            names, templates = self._prompts(extra)
            if names and templates and "label" in data.reference_slice(n, cfg.seed, 0, 1):  # same on every rank
                labels = group.gather_cat(torch.cat([p["label"] for p in mine]) if mine else torch.empty(0))
                scores = images @ classifier(model, tokenizer, names, templates, cfg.batch_size, group, device).T
                out["top1"], out["top5"] = topk_accuracy(scores, labels, 1), topk_accuracy(scores, labels, 5)
            first, caption_of = first_of_each(tokens)
            sims = images @ captions[first].T  # (n images, distinct captions)
            distinct = torch.arange(len(first))
            out.update({f"i2t_r{k}": retrieval_recall(sims, caption_of, distinct, k) for k in cfg.recall_at})
            out.update({f"t2i_r{k}": retrieval_recall(sims.T, distinct, caption_of, k) for k in cfg.recall_at})
            return out
        finally:
            model.train(was_training)


def make_zeroshot(config: ZeroShotProtocolConfig | None = None) -> ZeroShotProtocol:
    """Metric factory for ``plugin = "zeroshot"``."""
    return ZeroShotProtocol(config)
