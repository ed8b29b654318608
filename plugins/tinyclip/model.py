"""The CLIP backbone: a ViT image tower and a causal transformer text tower.

Image tower (``visual``), for images ``(B, C, H, W)`` with ``H = W = image_size``::

    patches = conv_{p x p, stride p}(image)              (B, N, D)   N = (image_size / p)^2
    x = [class_embedding, patches] + positional_embedding (B, N+1, D)
    x = blocks(ln_pre(x));  e = proj(ln_post(x[:, 0]))    (B, E)

Text tower (``text``), for token ids ``(B, L)``::

    x = token_embedding(tokens) + positional_embedding[:L]  (B, L, D)
    x = ln_final(causal_blocks(x));  e = proj(x[b, eot_b])   (B, E)

where ``eot_b`` is the first position of the end-of-text token in row ``b``
(``text_pool = "argmax"``: the position of the largest token id, as OpenAI's
CLIP and Hugging Face's legacy configs do). Every block is pre-norm::

    x = x + proj(attention(ln_1(x)));  x = x + fc2(act(fc1(ln_2(x))))

with multi-head attention from ``F.scaled_dot_product_attention`` over a fused
``qkv`` projection whose ``3 * width`` output rows are ordered
``[q | k | v]``, each ``heads x head_dim`` (the layout of open_clip's
``in_proj_weight``; weight inheritance slices it per head).

``encode_image`` and ``encode_text`` return L2-normalised embeddings
``(B, E)``; ``forward(image, text) -> (image_emb, text_emb, logit_scale)``
with ``logit_scale = exp(log_scale)`` (a learnable scalar initialised to
``log(1 / 0.07)``, clamped to at most 100 as in CLIP).

The backbone is not a generative model and is not called as ``model(x, t, y)``.
"""

from __future__ import annotations

import math
from typing import Literal

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from core.interfaces import DataSpec
from registry import ConfigError

MAX_LOGIT_SCALE = 100.0


@attrs.define
class CLIPConfig:
    """Options of the ``clip`` backbone.

    Attributes:
        embed_dim: size of the joint (normalised) embedding.
        width: width of both towers unless ``vision_width`` / ``text_width`` say otherwise.
        depth: number of blocks of both towers unless ``vision_depth`` / ``text_depth`` say otherwise.
        heads: attention heads of both towers unless ``vision_heads`` / ``text_heads`` say otherwise
            (0: ``width // 32``, at least 1).
        mlp_ratio: hidden size of each block's MLP as a multiple of its width.
        vision_width: image-tower width (0: ``width``).
        vision_depth: image-tower blocks (0: ``depth``).
        vision_heads: image-tower heads (0: ``heads``).
        text_width: text-tower width (0: ``width``).
        text_depth: text-tower blocks (0: ``depth``).
        text_heads: text-tower heads (0: ``heads``).
        patch_size: side of the square image patches; must divide the image size.
        image_size: image side (0: from the data).
        context_length: text positions (0: from the data's tokenizer).
        vocab_size: token vocabulary (0: from the data).
        activation: "gelu" or "quick_gelu" (x * sigmoid(1.702 x), OpenAI's CLIP).
        text_pool: "eot" (the first end-of-text token) or "argmax" (the largest token id).
        eot_token: id of the end-of-text token (-1: from the data, else the largest id).
        logit_scale_init: initial log of the logit scale (log(1/0.07) = 2.6593).
        fixed_logit_scale: fix the logit scale to this value (not its log) for the whole run: the
            parameter holds log(value) and is not trained, also after weight inheritance
            (TinyCLIP's ``--logit-scale 50``, which refills it after every step; 0: learned).
        gradient_checkpointing: recompute each block's activations in the backward pass (less memory).
        inherit_from: a run directory, a checkpoint file or a Hugging Face CLIP directory whose
            weights initialise this model by weight inheritance (empty: random initialisation).
        inherit_weights: "ema" or "model" weights of a flowforge checkpoint.
        inherit_vision_layers: teacher image-tower blocks to keep, one per student block
            (empty: every k-th block from the first, k = teacher depth // student depth).
        inherit_text_layers: teacher text-tower blocks to keep (empty: every k-th).
    """

    embed_dim: int = 64
    width: int = 64
    depth: int = 2
    heads: int = 0
    mlp_ratio: float = 4.0
    vision_width: int = 0
    vision_depth: int = 0
    vision_heads: int = 0
    text_width: int = 0
    text_depth: int = 0
    text_heads: int = 0
    patch_size: int = 4
    image_size: int = 0
    context_length: int = 0
    vocab_size: int = 0
    activation: Literal["gelu", "quick_gelu"] = "gelu"
    text_pool: Literal["eot", "argmax"] = "eot"
    eot_token: int = -1
    logit_scale_init: float = math.log(1 / 0.07)
    fixed_logit_scale: float = 0.0
    gradient_checkpointing: bool = False
    inherit_from: str = ""
    inherit_weights: Literal["ema", "model"] = "ema"
    inherit_vision_layers: list[int] = attrs.Factory(list)
    inherit_text_layers: list[int] = attrs.Factory(list)

    def __attrs_post_init__(self) -> None:
        for key in ("embed_dim", "width", "depth", "patch_size"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"expected a positive integer, got {getattr(self, key)!r}", (key,))
        for key in ("heads", "vision_width", "vision_depth", "vision_heads", "text_width", "text_depth",
                    "text_heads", "image_size", "context_length", "vocab_size"):
            if getattr(self, key) < 0:
                raise ConfigError(f"expected a non-negative integer (0: default), got {getattr(self, key)!r}", (key,))
        if self.mlp_ratio <= 0:
            raise ConfigError(f"expected a positive number, got {self.mlp_ratio!r}", ("mlp_ratio",))
        if not 0 <= self.fixed_logit_scale <= MAX_LOGIT_SCALE:
            raise ConfigError(f"expected a number in [0, {MAX_LOGIT_SCALE:g}] (0: learned), got "
                              f"{self.fixed_logit_scale!r}", ("fixed_logit_scale",))


@attrs.frozen
class TowerDims:
    """The resolved size of one tower.

    ``patch_size``, ``image_size`` and ``channels`` are used by the image tower;
    ``vocab_size`` and ``context_length`` by the text tower.
    """

    width: int
    depth: int
    heads: int
    mlp_width: int
    patch_size: int = 0
    image_size: int = 0
    channels: int = 0
    vocab_size: int = 0
    context_length: int = 0

    @property
    def head_dim(self) -> int:
        return self.width // self.heads


@attrs.frozen
class CLIPDims:
    """Everything that fixes a CLIP model's architecture (what inheritance and adapters compare)."""

    vision: TowerDims
    text: TowerDims
    embed_dim: int
    activation: str = "gelu"
    text_pool: str = "eot"
    eot_token: int = -1
    layer_norm_eps: float = 1e-5

    @property
    def eot(self) -> int:
        """The end-of-text id (``eot_token``; -1 means the largest id, ``vocab_size - 1``)."""
        return self.eot_token if self.eot_token >= 0 else self.text.vocab_size - 1


def resolve_dims(config: CLIPConfig, spec: DataSpec) -> CLIPDims:
    """The architecture of `config` for data `spec` (defaults taken from the data)."""
    extra = dict(spec.extra or {})
    if len(spec.shape) != 3:
        raise ConfigError(f"the clip backbone needs images (C, H, W); the data's examples have shape {spec.shape}")
    channels, height, width_px = spec.shape
    image_size = config.image_size or height
    if height != width_px or height != image_size:
        raise ConfigError(f"the data's images are {height}x{width_px} but the model expects {image_size}x{image_size}",
                          ("image_size",))
    if image_size % config.patch_size:
        raise ConfigError(f"patch_size {config.patch_size} must divide the image size {image_size}", ("patch_size",))
    context_length = config.context_length or int(extra.get("context_length", 0))
    vocab_size = config.vocab_size or spec.vocab_size
    if context_length <= 0:
        raise ConfigError("the data gives no context length (spec.extra['context_length']); set it", ("context_length",))
    if vocab_size <= 0:
        raise ConfigError("the data gives no vocabulary size; set it", ("vocab_size",))

    def tower(prefix: str, **extra_dims: int) -> TowerDims:
        width = getattr(config, f"{prefix}_width") or config.width
        depth = getattr(config, f"{prefix}_depth") or config.depth
        heads = getattr(config, f"{prefix}_heads") or config.heads or max(1, width // 32)
        if width % heads:
            raise ConfigError(f"the {prefix} width {width} must divide by its {heads} heads", (f"{prefix}_heads",))
        return TowerDims(width, depth, heads, max(1, round(width * config.mlp_ratio)), **extra_dims)

    eot = config.eot_token if config.eot_token >= 0 else int(extra.get("eot_token", vocab_size - 1))
    return CLIPDims(
        vision=tower("vision", patch_size=config.patch_size, image_size=image_size, channels=channels),
        text=tower("text", vocab_size=vocab_size, context_length=context_length),
        embed_dim=config.embed_dim, activation=config.activation, text_pool=config.text_pool, eot_token=eot)


# --------------------------------------------------------------------------- layers
class QuickGELU(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"gelu": nn.GELU, "quick_gelu": QuickGELU}


class Attention(nn.Module):
    """Multi-head self-attention, ``(B, N, D) -> (B, N, D)``, fused ``qkv`` rows ordered [q | k | v]."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor, causal: bool = False) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int, activation: str):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = ACTIVATIONS[activation]()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, dims: TowerDims, activation: str, eps: float, causal: bool):
        super().__init__()
        self.causal = causal
        self.ln_1 = nn.LayerNorm(dims.width, eps=eps)
        self.attn = Attention(dims.width, dims.heads)
        self.ln_2 = nn.LayerNorm(dims.width, eps=eps)
        self.mlp = MLP(dims.width, dims.mlp_width, activation)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x), self.causal)
        return x + self.mlp(self.ln_2(x))


class Tower(nn.Module):
    """A stack of blocks with optional gradient checkpointing."""

    def __init__(self, dims: TowerDims, activation: str, eps: float, causal: bool):
        super().__init__()
        self.blocks = nn.ModuleList(Block(dims, activation, eps, causal) for _ in range(dims.depth))
        self.gradient_checkpointing = False

    def run_blocks(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x


class VisionTower(Tower):
    """``(B, C, H, W) -> (B, E)`` (not normalised)."""

    def __init__(self, dims: TowerDims, embed_dim: int, activation: str, eps: float):
        super().__init__(dims, activation, eps, causal=False)
        self.dims = dims
        width, grid = dims.width, dims.image_size // dims.patch_size
        self.conv = nn.Conv2d(dims.channels, width, dims.patch_size, stride=dims.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width) * width ** -0.5)
        self.positional_embedding = nn.Parameter(torch.randn(grid * grid + 1, width) * width ** -0.5)
        self.ln_pre = nn.LayerNorm(width, eps=eps)
        self.ln_post = nn.LayerNorm(width, eps=eps)
        self.proj = nn.Linear(width, embed_dim, bias=False)

    def forward(self, image: Tensor) -> Tensor:
        size = self.dims.image_size
        if image.ndim != 4 or image.shape[-2:] != (size, size) or image.shape[1] != self.dims.channels:
            raise ValueError(f"expected images (B, {self.dims.channels}, {size}, {size}), got {tuple(image.shape)}")
        x = self.conv(image.to(self.conv.weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.run_blocks(self.ln_pre(x))
        return self.proj(self.ln_post(x[:, 0]))


class TextTower(Tower):
    """``(B, L) -> (B, E)`` (not normalised); causal attention, pooled at the end-of-text token."""

    def __init__(self, dims: TowerDims, embed_dim: int, activation: str, eps: float, pool: str, eot: int):
        super().__init__(dims, activation, eps, causal=True)
        self.dims, self.pool, self.eot = dims, pool, eot
        self.token_embedding = nn.Embedding(dims.vocab_size, dims.width)
        self.positional_embedding = nn.Parameter(torch.empty(dims.context_length, dims.width))
        self.ln_final = nn.LayerNorm(dims.width, eps=eps)
        self.proj = nn.Linear(dims.width, embed_dim, bias=False)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)

    def pool_index(self, tokens: Tensor) -> Tensor:
        """``(B,)`` positions whose output is the caption's embedding."""
        if self.pool == "argmax":
            return tokens.argmax(dim=-1)
        return (tokens == self.eot).int().argmax(dim=-1)  # first end-of-text (0 when absent)

    def forward(self, tokens: Tensor) -> Tensor:
        length = tokens.shape[-1]
        if tokens.ndim != 2 or length > self.dims.context_length:
            raise ValueError(f"expected tokens (B, L <= {self.dims.context_length}), got {tuple(tokens.shape)}")
        x = self.token_embedding(tokens) + self.positional_embedding[:length]
        x = self.ln_final(self.run_blocks(x))
        return self.proj(x[torch.arange(x.shape[0], device=x.device), self.pool_index(tokens)])


def _init_linear(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=m.in_features ** -0.5)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class CLIP(nn.Module):
    """See the module docstring. Built from resolved `CLIPDims`."""

    def __init__(self, dims: CLIPDims, logit_scale_init: float = math.log(1 / 0.07), gradient_checkpointing: bool = False):
        super().__init__()
        if dims.activation not in ACTIVATIONS:
            raise ConfigError(f"unknown activation {dims.activation!r}; expected one of {', '.join(ACTIVATIONS)}")
        self.dims = dims
        eps = dims.layer_norm_eps
        self.visual = VisionTower(dims.vision, dims.embed_dim, dims.activation, eps)
        self.text = TextTower(dims.text, dims.embed_dim, dims.activation, eps, dims.text_pool, dims.eot)
        _init_linear(self)
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale_init)))
        self.set_grad_checkpointing(gradient_checkpointing)

    def fix_logit_scale(self, value: float) -> None:
        """Hold the logit scale at `value` (``log_scale = log(value)``, no gradient)."""
        with torch.no_grad():
            self.logit_scale.fill_(math.log(value))
        self.logit_scale.requires_grad_(False)

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Recompute block activations during the backward pass (both towers)."""
        self.visual.gradient_checkpointing = self.text.gradient_checkpointing = enabled

    def encode_image(self, image: Tensor) -> Tensor:
        """``(B, C, H, W)`` images -> ``(B, E)`` unit-norm embeddings."""
        return F.normalize(self.visual(image), dim=-1)

    def encode_text(self, tokens: Tensor) -> Tensor:
        """``(B, L)`` token ids -> ``(B, E)`` unit-norm embeddings."""
        return F.normalize(self.text(tokens), dim=-1)

    def scale(self) -> Tensor:
        """The logit scale ``exp(log_scale)``, at most 100 (a 0-d tensor)."""
        return self.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)

    def forward(self, image: Tensor, text: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(image_emb (B, E), text_emb (B, E), logit_scale ())``."""
        return self.encode_image(image), self.encode_text(text), self.scale()


def num_params(module: nn.Module) -> int:
    """Number of parameters of `module`."""
    return sum(p.numel() for p in module.parameters())


def make_clip(config: CLIPConfig, spec: DataSpec) -> CLIP:
    """Backbone factory for ``plugin = "clip"``; applies weight inheritance when ``inherit_from`` is set."""
    model = CLIP(resolve_dims(config, spec), config.logit_scale_init, config.gradient_checkpointing)
    if config.inherit_from:
        from .inherit import inherit
        from .load import load_clip

        teacher = load_clip(config.inherit_from, spec, weights=config.inherit_weights, key="inherit_from")
        inherit(model, teacher, vision_layers=config.inherit_vision_layers or None,
                text_layers=config.inherit_text_layers or None)
    if config.fixed_logit_scale:
        model.fix_logit_scale(config.fixed_logit_scale)
    return model
