"""The ``unet_classifier`` backbone: guided-diffusion's noisy-image classifier (``EncoderUNetModel``,
``pool = "attention"``), the classifier of classifier guidance (Dhariwal & Nichol 2021, section 4).

The encoder half of the ADM UNet (`plugins.unet.model`) with its time embedding, then attention pooling:

    emb = MLP(sinusoid(time_scale * t, model_channels))                     (B, 4 * model_channels)
    h   = middle_block(input_blocks(x, emb), emb)                           (B, C, H', W')
    out = AttentionPool2d(SiLU(GN(h)))                                      (B, num_classes) logits

``AttentionPool2d`` (CLIP's, as guided-diffusion's): the pixels ``(B, C, N)`` get their mean prepended as
a token, plus a learned positional embedding ``(C, N + 1)`` (init ``randn / sqrt(C)``); a 1x1 conv gives
``[q | k | v]``, multi-head attention with ``C / num_head_channels`` heads, a 1x1 conv ``c_proj`` to
``num_classes``; the output is the mean token's, ``(B, num_classes)``. Parameter names are
guided-diffusion's (``input_blocks``, ``middle_block``, ``out.2.qkv_proj`` ...).

Called as ``model(x, t, y=None) -> (B, num_classes)`` with ``x (B, C, H, W)`` and ``t (B,)`` in [0, 1] (the
flowforge time of the noisy state); ``y`` is ignored (the classifier is not class-conditional). The data
spec must have classes. Defaults are guided-diffusion's classifier_defaults (width 128, depth 2, scale-shift
norm, resblock_updown, 64 channels per head) except the levels, which follow the image size here: the
``digits`` preset is a small one for 8x8 images.
"""

from __future__ import annotations

from typing import Any

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.interfaces import DataSpec
from core.nn import expand_t, timestep_embedding
from core.presets import fill_from_preset
from registry import ConfigError

from .model import AttentionBlock, GroupNorm32, ResBlock, TimestepEmbedSequential, encoder_blocks

PRESETS: dict[str, dict[str, Any]] = {
    # 8x8 digits: 8 -> 4, attention at 4x4, 32 channels per head.
    "digits": {"model_channels": 32, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [2],
               "num_head_channels": 32, "norm_groups": 8},
}
#: guided-diffusion's create_classifier / classifier_defaults (image size 64: channel_mult (1, 2, 3, 4)).
DEFAULTS: dict[str, Any] = {
    "model_channels": 128, "channel_mult": [1, 2, 3, 4], "num_res_blocks": 2, "attention_resolutions": [2, 4, 8],
    "num_head_channels": 64, "use_scale_shift_norm": True, "resblock_updown": True, "conv_resample": True,
    "dropout": 0.0, "norm_groups": 32, "time_scale": 1000.0,
}


@attrs.define
class UNetClassifierConfig:
    """Options of the unet_classifier backbone (guided-diffusion's ``classifier_*`` flags).

    Attributes:
        preset: "digits" or None; fills the defaults that explicit keys override.
        model_channels: base channel count (classifier_width).
        channel_mult: channel multiplier per resolution level.
        num_res_blocks: residual blocks per level (classifier_depth).
        attention_resolutions: downsample rates (1, 2, 4, ...) with self-attention.
        num_head_channels: channels per attention head (blocks and pooling).
        use_scale_shift_norm: FiLM conditioning on the time embedding.
        resblock_updown: downsample with residual blocks.
        conv_resample: strided-conv downsamplers (without resblock_updown).
        dropout: dropout inside the residual blocks.
        norm_groups: GroupNorm groups.
        time_scale: t in [0, 1] is multiplied by this before the sinusoids.
    """

    preset: str | None = None
    model_channels: int | None = None
    channel_mult: list[int] | None = None
    num_res_blocks: int | None = None
    attention_resolutions: list[int] | None = None
    num_head_channels: int | None = None
    use_scale_shift_norm: bool | None = None
    resblock_updown: bool | None = None
    conv_resample: bool | None = None
    dropout: float | None = None
    norm_groups: int | None = None
    time_scale: float | None = None

    def __attrs_post_init__(self) -> None:
        fill_from_preset(self, PRESETS, DEFAULTS)
        for key in ("model_channels", "num_res_blocks", "num_head_channels", "norm_groups"):
            if getattr(self, key) < 1:
                raise ConfigError(f"expected a positive integer, got {getattr(self, key)}", (key,))
        if not self.channel_mult or any(m < 1 for m in self.channel_mult):
            raise ConfigError(f"expected a non-empty list of positive integers, got {self.channel_mult}", ("channel_mult",))
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"expected a probability in [0, 1), got {self.dropout}", ("dropout",))


class AttentionPool2d(nn.Module):
    """``(B, C, H, W) -> (B, out_dim)``: attention of the mean token over the pixels (module docstring)."""

    def __init__(self, tokens: int, channels: int, head_channels: int, out_dim: int):
        super().__init__()
        if channels % head_channels:
            raise ConfigError(f"{channels} pooling channels do not divide into heads of {head_channels}",
                              ("num_head_channels",))
        self.positional_embedding = nn.Parameter(torch.randn(channels, tokens + 1) / channels ** 0.5)
        self.qkv_proj = nn.Conv1d(channels, 3 * channels, 1)
        self.c_proj = nn.Conv1d(channels, out_dim, 1)
        self.num_heads = channels // head_channels

    def forward(self, x: Tensor) -> Tensor:
        b, c, *_ = x.shape
        x = x.reshape(b, c, -1)
        x = torch.cat([x.mean(dim=-1, keepdim=True), x], dim=-1) + self.positional_embedding[None].to(x.dtype)
        q, k, v = self.qkv_proj(x).reshape(b, 3, self.num_heads, c // self.num_heads, -1).transpose(-1, -2).unbind(1)
        h = F.scaled_dot_product_attention(q[:, :, :1], k, v)  # (B, heads, 1, head_channels): the mean token
        return self.c_proj(h.transpose(-1, -2).reshape(b, c, 1))[:, :, 0]


class UNetClassifier(nn.Module):
    """See the module docstring. Called as ``model(x, t, y=None) -> (B, num_classes)``."""

    def __init__(self, config: UNetClassifierConfig, spec: DataSpec):
        super().__init__()
        if len(spec.shape) != 3 or spec.kind != "continuous":
            raise ConfigError(f"unet_classifier takes continuous images (C, H, W); this data is {spec.kind} "
                              f"{tuple(spec.shape)}")
        if spec.num_classes < 1:
            raise ConfigError("unet_classifier needs labelled data (set [data] conditional = true)")
        c, height, width = (int(s) for s in spec.shape)
        factor = 2 ** (len(config.channel_mult) - 1)
        if height % factor or width % factor:
            raise ConfigError(f"{height}x{width} does not divide by {factor}", ("channel_mult",))
        self.config, mc, groups = config, config.model_channels, config.norm_groups
        emb_dim = 4 * mc
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        def res(ch_in: int, ch_out: int, **kw: Any) -> ResBlock:
            return ResBlock(ch_in, emb_dim, config.dropout, ch_out, config.use_scale_shift_norm, groups=groups, **kw)

        def attn(ch: int) -> AttentionBlock:
            return AttentionBlock(ch, num_head_channels=config.num_head_channels, groups=groups)

        ch = int(config.channel_mult[0] * mc)
        bad = sorted({int(mc * m) for m in config.channel_mult if int(mc * m) % groups})
        if bad:
            raise ConfigError(f"channel counts {bad} do not divide into {groups} GroupNorm groups", ("norm_groups",))
        self.input_blocks, chans, ds = encoder_blocks(config, nn.Conv2d(c, ch, 3, padding=1), ch, res, attn)
        ch = chans[-1]
        self.middle_block = TimestepEmbedSequential(res(ch, ch), attn(ch), res(ch, ch))
        tokens = (height // ds) * (width // ds)
        self.out = nn.Sequential(GroupNorm32(groups, ch), nn.SiLU(),
                                 AttentionPool2d(tokens, ch, config.num_head_channels, spec.num_classes))

    def forward(self, x: Tensor, t: Tensor | float, y: Tensor | None = None) -> Tensor:
        """``x (B, C, H, W)``, ``t (B,)`` or scalar -> logits ``(B, num_classes)``; `y` is ignored."""
        t = expand_t(t, x.shape[0], device=x.device)
        emb = self.time_embed(timestep_embedding(t, self.config.model_channels, scale=self.config.time_scale)
                              .to(self.time_embed[0].weight.dtype))
        h = x
        for module in self.input_blocks:
            h = module(h, emb)
        return self.out(self.middle_block(h, emb))


def make_unet_classifier(config: UNetClassifierConfig, spec: DataSpec) -> UNetClassifier:
    """Backbone factory: a noisy-image classifier with ``spec.num_classes`` outputs."""
    return UNetClassifier(config, spec)
