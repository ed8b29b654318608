"""CLIP objectives: the contrastive loss, TinyCLIP's affinity mimicking, feature gathering, cached accumulation.

Notation: ``I, T (B, E)`` unit-norm image and text embeddings of this process's
batch, ``I*, T* (N, E)`` those of the global batch (every process, gathered),
``s`` the logit scale. Logits of this process's rows against the global batch::

    A_img = s I T*^T  (B, N)      A_txt = s T I*^T  (B, N)

and the positive of local row ``i`` is global column ``rank * B + i``.

* Contrastive (symmetric InfoNCE, CLIP)::

      L_clip = (CE(A_img, pos) + CE(A_txt, pos)) / 2

* Affinity mimicking (TinyCLIP): the student's affinities learn the teacher's
  (teacher logits ``A'`` from its own embeddings, with its own logit scale or
  the configured ``teacher_logit_scale``)::

      L_aff = (H(softmax(A'_img), A_img) + H(softmax(A'_txt), A_txt)) / 2,
      H(p, a) = mean_rows( -sum_j p_j log softmax(a)_j ) = KL(p || softmax(a)) + H(p)

* ``tinyclip_distill`` minimises ``weight * (alpha * L_aff + (1 - alpha) * L_clip)``
  (TinyCLIP's ``distillation_alpha`` / ``distillation_weight``; ``alpha = 1`` is
  pure affinity mimicking, ``alpha < 1`` mixes in the contrastive loss).

**Gathering.** On several processes, `gather_features` all-gathers every
process's embeddings; the local slice of the result is the local tensor
itself, so gradients reach this process's features (``gather_with_grad``
also sends the other processes' gradients back through the gather, so the
gradient is exactly that of the global loss). One process: a no-op.

**Cached accumulation** (``accum_chunks = K``). The whole step batch is one
loss call: the embeddings of its K chunks are computed without gradients
(the cache), the loss and its gradient with respect to every embedding are
computed once on the full (global) batch, and each chunk is recomputed with
gradients *during the backward pass* and back-propagated with its cached
embedding gradient (`_ChunkReplay`). The loss value and every parameter
gradient equal those of the whole batch at once, every example still sees
all the negatives of the global batch, and only one chunk's activations are
alive at a time (open_clip's accumulation and GradCache, inside the
trainer's single ``backward``). Keep ``trainer.grad_accum = 1`` with it: the
trainer's own micro-batches would each see only their own negatives. On
several processes the cache is gathered like any features (every rank's
chunks are negatives of every row) and the gradients of the cached features
include the other ranks' terms (through the differentiable gather); the
recomputation calls the unwrapped module, outside DistributedDataParallel's
forward, so the replay averages the parameter gradients over the processes
itself: loss and gradients equal those of the global batch on one process
(open_clip's ``--accum-freq`` under DDP).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Literal

import attrs
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from core.interfaces import Batch, DataSpec, Objective
from registry import ConfigError

#: ``loss_fn(image_emb (B, E), text_emb (B, E), logit_scale ()) -> (loss, logs)``
FeatureLoss = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, dict[str, float]]]


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_features(x: Tensor, with_grad: bool = True) -> Tensor:
    """``(B, E)`` local features -> ``(W * B, E)`` global features (rank order); no-op on one process.

    The local slice is `x` itself (so its gradient flows); with `with_grad` the
    gather is differentiable and the other slices send gradients back to their processes.
    """
    rank, world = _world()
    if world == 1:
        return x
    if with_grad:
        import torch.distributed.nn.functional as dist_fn

        parts = list(dist_fn.all_gather(x.contiguous()))
    else:
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.detach().contiguous())
    parts[rank] = x
    return torch.cat(parts)


def clip_logits(image: Tensor, text: Tensor, scale: Tensor | float, gather: bool = True,
                with_grad: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """``(A_img (B, N), A_txt (B, N), positives (B,))`` of the local rows against the global batch."""
    if gather:
        rank = _world()[0]
        all_image, all_text = gather_features(image, with_grad), gather_features(text, with_grad)
    else:
        rank, all_image, all_text = 0, image, text
    positives = torch.arange(image.shape[0], device=image.device) + rank * image.shape[0]
    return scale * image @ all_text.T, scale * text @ all_image.T, positives


def contrastive_loss(image: Tensor, text: Tensor, scale: Tensor | float, gather: bool = True,
                     with_grad: bool = True) -> Tensor:
    """Symmetric InfoNCE ``L_clip`` (module docstring)."""
    a_img, a_txt, pos = clip_logits(image.float(), text.float(), scale, gather, with_grad)
    return (F.cross_entropy(a_img, pos) + F.cross_entropy(a_txt, pos)) / 2


def soft_cross_entropy(logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """``mean_rows(-sum_j softmax(teacher)_j log_softmax(logits)_j)``; the teacher side gets no gradient."""
    target = F.softmax(teacher_logits.detach().float(), dim=-1)
    return -(target * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()


def affinity_loss(image: Tensor, text: Tensor, scale: Tensor | float, teacher_image: Tensor, teacher_text: Tensor,
                  teacher_scale: Tensor | float, gather: bool = True, with_grad: bool = True) -> Tensor:
    """TinyCLIP's affinity mimicking ``L_aff`` (module docstring); the teacher inputs are detached."""
    s_img, s_txt, _ = clip_logits(image.float(), text.float(), scale, gather, with_grad)
    with torch.no_grad():
        t_img, t_txt, _ = clip_logits(teacher_image.float(), teacher_text.float(), teacher_scale, gather, False)
    return (soft_cross_entropy(s_img, t_img) + soft_cross_entropy(s_txt, t_txt)) / 2


# --------------------------------------------------------------------------- cached accumulation
def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel (or similar) wrapper."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def _autocast_state(device_type: str) -> tuple[bool, torch.dtype]:
    return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


class _ChunkReplay(torch.autograd.Function):
    """Forward: a zero scalar connected to the parameters. Backward: recompute each chunk's embeddings
    with gradients, back-propagate the cached embedding gradients (and the logit scale's) into the
    parameters, and, when `sync`, average the parameter gradients over the processes (what
    DistributedDataParallel's hooks would have done had the chunks gone through its forward)."""

    @staticmethod
    def forward(ctx, module, chunks, grad_scale, autocast, sync, *params):
        ctx.module, ctx.chunks, ctx.grad_scale, ctx.autocast, ctx.sync = module, chunks, grad_scale, autocast, sync
        return torch.zeros((), device=params[0].device if params else None)

    @staticmethod
    def backward(ctx, grad_out):
        params = [p for p in ctx.module.parameters() if p.requires_grad]
        total = [torch.zeros_like(p) for p in params]
        enabled, dtype = ctx.autocast
        for image, text, grad_image, grad_text in ctx.chunks:
            with torch.enable_grad(), torch.autocast(image.device.type, dtype=dtype, enabled=enabled):
                emb_image, emb_text = ctx.module.encode_image(image), ctx.module.encode_text(text)
            grads = torch.autograd.grad([emb_image, emb_text], params,
                                        [(grad_image * grad_out).to(emb_image.dtype),
                                         (grad_text * grad_out).to(emb_text.dtype)], allow_unused=True)
            _add(total, grads)
        if ctx.grad_scale is not None:
            with torch.enable_grad():
                scale = ctx.module.scale()
            if scale.requires_grad:
                _add(total, torch.autograd.grad(scale, params, ctx.grad_scale * grad_out, allow_unused=True))
        if ctx.sync:
            flat = torch.cat([g.reshape(-1) for g in total])
            dist.all_reduce(flat)
            flat /= dist.get_world_size()
            total = [g.view_as(p) for g, p in zip(flat.split([p.numel() for p in params]), params)]
        ctx.chunks = None
        return (None, None, None, None, None, *total)


def _add(total: list[Tensor], grads) -> None:
    for acc, g in zip(total, grads):
        if g is not None:
            acc.add_(g)


def cached_loss(model: nn.Module, image: Tensor, text: Tensor, loss_fn: FeatureLoss,
                chunks: int) -> tuple[Tensor, dict[str, float]]:
    """``loss_fn`` of the whole batch, computed in `chunks` chunks with one chunk's activations alive at a time.

    Returns a scalar whose value and parameter gradients equal those of
    ``loss_fn(*model(image, text))`` (see the module docstring). On several processes with a
    DistributedDataParallel-wrapped `model`, the replayed gradients are averaged over the
    processes inside the backward pass, so the result equals one process with the global batch.
    """
    module = unwrap(model)
    if chunks <= 1:
        return loss_fn(*model(image, text))
    if image.shape[0] < chunks:
        raise ValueError(f"a batch of {image.shape[0]} cannot be cut into {chunks} chunks")
    sync = _world()[1] > 1 and module is not model
    images, texts = image.chunk(chunks), text.chunk(chunks)
    with torch.no_grad():
        cache_image = torch.cat([module.encode_image(c) for c in images])
        cache_text = torch.cat([module.encode_text(c) for c in texts])
        scale = module.scale()
    leaves = [cache_image.requires_grad_(), cache_text.requires_grad_(), scale.detach().requires_grad_()]
    loss, logs = loss_fn(*leaves)
    grad_image, grad_text, grad_scale = torch.autograd.grad(loss, leaves, allow_unused=True)
    params = [p for p in module.parameters() if p.requires_grad]
    sizes = [len(c) for c in images]
    replay = list(zip(images, texts, grad_image.split(sizes), grad_text.split(sizes)))
    autocast = _autocast_state(image.device.type)
    return loss.detach() + _ChunkReplay.apply(module, replay, grad_scale, autocast, sync, *params), logs


# --------------------------------------------------------------------------- objectives
@attrs.define
class ContrastiveConfig:
    """Options of ``clip_contrastive``.

    Attributes:
        accum_chunks: compute each step's batch in this many chunks with cached features
            (the loss and gradients of the whole batch; 1: one pass).
        gather: gather features across processes (local rows against the global batch).
        gather_with_grad: back-propagate through the gather (exact global-batch gradients).
    """

    accum_chunks: int = 1
    gather: bool = True
    gather_with_grad: bool = True

    def __attrs_post_init__(self) -> None:
        if self.accum_chunks < 1:
            raise ConfigError(f"expected a positive integer, got {self.accum_chunks!r}", ("accum_chunks",))


def _log_scale(scale: Tensor) -> dict[str, float]:
    return {"logit_scale": float(scale.detach())}


class ClipContrastive(Objective):
    """``clip_contrastive``: the symmetric InfoNCE loss of CLIP (module docstring)."""

    def __init__(self, config: ContrastiveConfig):
        self.config = config

    def feature_loss(self, image: Tensor, text: Tensor, scale: Tensor) -> tuple[Tensor, dict[str, float]]:
        return contrastive_loss(image, text, scale, self.config.gather, self.config.gather_with_grad), _log_scale(scale)

    def loss(self, models: Mapping[str, nn.Module], batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        return cached_loss(models["model"], batch["image"], batch["text"], self.feature_loss, self.config.accum_chunks)


@attrs.define
class DistillConfig(ContrastiveConfig):
    """Options of ``tinyclip_distill`` (and those of ``clip_contrastive``).

    Attributes:
        teacher: a run directory, checkpoint file or Hugging Face CLIP directory (required).
        teacher_weights: "ema" or "model" weights of a flowforge checkpoint.
        teacher_logit_scale: the teacher's logit scale for its affinities (0: its own learned scale).
        alpha: share of the affinity loss; 1 - alpha goes to the contrastive loss.
        weight: scale of the whole loss.
        accum_chunks: compute each step's batch in this many chunks with cached features (1: one pass).
        gather: gather student and teacher features across processes (affinities over the global batch).
        gather_with_grad: back-propagate through the gather (exact global-batch gradients).
    """

    teacher: str = ""
    teacher_weights: Literal["ema", "model"] = "ema"
    teacher_logit_scale: float = 0.0
    alpha: float = 1.0
    weight: float = 1.0

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        if not self.teacher:
            raise ConfigError("required: a teacher run directory, checkpoint or Hugging Face CLIP directory",
                              ("teacher",))
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"expected a number in [0, 1], got {self.alpha!r}", ("alpha",))
        if self.teacher_logit_scale < 0:
            raise ConfigError(f"expected a non-negative number (0: the teacher's own), got {self.teacher_logit_scale!r}",
                              ("teacher_logit_scale",))


class TinyCLIPDistill(ClipContrastive):
    """``tinyclip_distill``: affinity mimicking from a frozen teacher, optionally mixed with the contrastive loss."""

    def __init__(self, config: DistillConfig, spec: DataSpec, teacher: nn.Module | None = None):
        super().__init__(config)
        self.config: DistillConfig = config
        if teacher is None:
            from .load import load_clip

            teacher = load_clip(config.teacher, spec, weights=config.teacher_weights, key="teacher")
        self.teacher = teacher.eval().requires_grad_(False)
        self._teacher_out: tuple[Tensor, Tensor] | None = None

    def teacher_scale(self) -> Tensor | float:
        return self.config.teacher_logit_scale or self.teacher.scale()

    def feature_loss(self, image: Tensor, text: Tensor, scale: Tensor) -> tuple[Tensor, dict[str, float]]:
        cfg = self.config
        t_image, t_text = self._teacher_out
        logs = _log_scale(scale)
        loss = torch.zeros((), device=image.device)
        if cfg.alpha > 0:
            aff = affinity_loss(image, text, scale, t_image, t_text, self.teacher_scale(), cfg.gather, cfg.gather_with_grad)
            loss = loss + cfg.alpha * aff
            logs["affinity"] = float(aff.detach())
        if cfg.alpha < 1:
            clip = contrastive_loss(image, text, scale, cfg.gather, cfg.gather_with_grad)
            loss = loss + (1 - cfg.alpha) * clip
            logs["contrastive"] = float(clip.detach())
        return cfg.weight * loss, logs

    def loss(self, models: Mapping[str, nn.Module], batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        image, text = batch["image"], batch["text"]
        if next(self.teacher.parameters()).device != image.device:
            self.teacher.to(image.device)
        self.teacher.eval()
        with torch.no_grad():
            self._teacher_out = (self.teacher.encode_image(image), self.teacher.encode_text(text))
        try:
            return cached_loss(models["model"], image, text, self.feature_loss, self.config.accum_chunks)
        finally:
            self._teacher_out = None


def make_clip_contrastive(config: ContrastiveConfig) -> ClipContrastive:
    """Objective factory for ``plugin = "clip_contrastive"``."""
    return ClipContrastive(config)


def make_tinyclip_distill(config: DistillConfig, spec: DataSpec, teacher: nn.Module | None = None) -> TinyCLIPDistill:
    """Objective factory for ``plugin = "tinyclip_distill"``."""
    return TinyCLIPDistill(config, spec, teacher)
