"""The ADM UNet of guided-diffusion (Dhariwal & Nichol, 2021), as used by Meta's flow_matching.

Layer for layer the network of guided-diffusion's ``UNetModel`` (with
``use_new_attention_order=True``) under the same parameter names, so its
checkpoints and flow_matching's load with ``load_state_dict`` (after padding
``label_emb`` by the null row, see below):

    emb = MLP(sinusoid(time_scale * t, model_channels)) + label_emb(y)      (B, 4 * model_channels)
    input_blocks:  conv_in, then per level ``num_res_blocks`` x [ResBlock (+ attention at
                   the downsample rates in attention_resolutions)] and a downsampler
                   (strided conv / average pool, or a down-ResBlock with resblock_updown)
    middle_block:  ResBlock, attention, ResBlock
    output_blocks: per level ``num_res_blocks + 1`` x [ResBlock on concat(h, skip)
                   (+ attention)] and an upsampler
    out:           GroupNorm, SiLU, conv (zero-initialised)

ResBlock: ``h = conv(SiLU(GN(x)))``; with ``use_scale_shift_norm`` (FiLM)
``h = GN(h) * (1 + scale(emb)) + shift(emb)``, else ``GN(h + proj(emb))``;
then SiLU, dropout, a zero-initialised conv, plus the (1x1-projected) skip.
Attention blocks are pre-GroupNorm multi-head self-attention over the pixels
with a zero-initialised output projection; attention runs through
``torch.nn.functional.scaled_dot_product_attention``. GroupNorm computes in
float32 (``GroupNorm32``) so bf16 autocast is safe.

Data ``(C, H, W)``. Continuous: ``x`` float ``(B, C, H, W)`` -> ``(B, C, H, W)``,
or ``(B, 2C, H, W)`` with ``learn_sigma`` (mean, then variance interpolation).
Discrete (flow_matching's ``DiscreteUNetModel``): ``x`` long ids ``(B, C, H, W)``,
each embedded to ``model_channels * channel_mult[0] / C`` features that
replace the input convolution; the output convolution gives ``C * V``
channels, returned as logits ``(B, C, H, W, V)``.

Class labels: with ``spec.num_classes > 0`` the label embedding has a learned
extra row for the null label ``num_classes`` (classifier-free guidance);
``y = None`` means the null label. ``class_dropout_prob`` replaces labels by
the null label in training mode only; objectives may drop labels themselves
(to the same null label ``num_classes``): use one of the two, preferably the
objective's (drawn per example by `core.rng`; the backbone's comes from each
process's torch RNG, so it depends on the process count). For data without
classes there is no label embedding and ``y`` is ignored.

``t`` is ``(B,)`` in [0, 1] (a float or 0-d tensor broadcasts) and is
multiplied by ``time_scale`` (default 1000) before the sinusoids; with
``time_input = "integer_step"`` the sinusoids see guided-diffusion's integer
step ``k = T (1 - t) - 1`` instead (`core.nn.integer_step`).

Speed options: ``use_checkpoint`` (gradient checkpointing of every residual
and attention block in training; the trainer's ``gradient_checkpointing``
turns it on through the blocks' ``gradient_checkpointing`` attributes) and
``channels_last`` (NHWC activations for the convolutions; the output is
returned in the standard layout).
"""

from __future__ import annotations

from typing import Any, Literal

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from core.guidance import drop_labels
from core.interfaces import DataSpec
from core.nn import expand_t, integer_step, timestep_embedding
from core.presets import fill_from_preset
from registry import ConfigError

#: Named configurations. Keys written in the experiment override the preset's.
PRESETS: dict[str, dict[str, Any]] = {
    # flow_matching's examples/image CIFAR-10 UNet (MODEL_CONFIGS["cifar10"]).
    "cifar10": {
        "model_channels": 128, "channel_mult": [2, 2, 2], "num_res_blocks": 4, "attention_resolutions": [2],
        "dropout": 0.3, "num_heads": 1, "num_head_channels": -1, "use_scale_shift_norm": True,
        "resblock_updown": False, "conv_resample": False, "learn_sigma": False,
    },
    # guided-diffusion's class-conditional ImageNet 64x64 ADM (64x64_diffusion.pt):
    # --num_channels 192 --num_res_blocks 3 --attention_resolutions 32,16,8 --num_head_channels 64
    # --resblock_updown True --use_scale_shift_norm True --dropout 0.1 --learn_sigma True.
    "imagenet64": {
        "model_channels": 192, "channel_mult": [1, 2, 3, 4], "num_res_blocks": 3, "attention_resolutions": [2, 4, 8],
        "dropout": 0.1, "num_heads": 4, "num_head_channels": 64, "use_scale_shift_norm": True,
        "resblock_updown": True, "conv_resample": True, "learn_sigma": True,
    },
    # A small UNet for the 8x8 digits (8 -> 4, attention at 4x4).
    "digits": {
        "model_channels": 32, "channel_mult": [1, 2], "num_res_blocks": 2, "attention_resolutions": [2],
        "dropout": 0.0, "num_heads": 1, "num_head_channels": 32, "use_scale_shift_norm": True,
        "resblock_updown": False, "conv_resample": True, "learn_sigma": False, "norm_groups": 8,
    },
}

#: Values of keys that neither the preset nor the experiment sets: guided-diffusion's
#: ``model_and_diffusion_defaults()`` for 32x32 images.
DEFAULTS: dict[str, Any] = {
    "model_channels": 128,
    "channel_mult": [1, 2, 2, 2],
    "num_res_blocks": 2,
    "attention_resolutions": [2, 4],
    "dropout": 0.0,
    "num_heads": 4,
    "num_head_channels": -1,
    "use_scale_shift_norm": True,
    "resblock_updown": False,
    "conv_resample": True,
    "learn_sigma": False,
    "class_dropout_prob": 0.0,
    "norm_groups": 32,
    "time_scale": 1000.0,
    "use_checkpoint": False,
    "channels_last": False,
}


@attrs.define
class UNetConfig:
    """Options of the UNet backbone (guided-diffusion's ``UNetModel`` arguments).

    ``preset`` (``"cifar10"``, ``"imagenet64"``, ``"digits"``) fills defaults
    that explicit keys override; keys set by neither take `DEFAULTS`.

    Attributes:
        preset: one of `PRESETS` or None.
        model_channels: base channel count.
        channel_mult: channel multiplier per resolution level.
        num_res_blocks: residual blocks per level (the decoder has one more).
        attention_resolutions: downsample rates (1, 2, 4, ...) at which attention is used.
        dropout: dropout rate inside the residual blocks.
        num_heads: attention heads (used when num_head_channels is -1).
        num_head_channels: channels per head (-1: use num_heads).
        use_scale_shift_norm: FiLM conditioning ``GN(h) * (1 + scale) + shift``.
        resblock_updown: down/upsample with residual blocks instead of plain layers.
        conv_resample: learned convolutions in the plain down/upsamplers.
        learn_sigma: output twice the data's channels (continuous data only).
        class_dropout_prob: probability of replacing labels by the null label in training.
        norm_groups: GroupNorm groups (32 in guided-diffusion).
        time_scale: t in [0, 1] is multiplied by this before the sinusoids (time_input = "scaled").
        time_input: "scaled" (the sinusoids see time_scale * t) or "integer_step" (they see the DDPM step
            k = time_steps * (1 - t) - 1 that the ddpm plugin's t = 1 - (k + 1) / T came from: what a
            guided-diffusion checkpoint was trained on).
        time_steps: T of time_input = "integer_step" (the checkpoint's diffusion steps).
        use_checkpoint: gradient checkpointing of the residual and attention blocks.
        channels_last: NHWC activations for faster convolutions.
    """

    preset: str | None = None
    model_channels: int | None = None
    channel_mult: list[int] | None = None
    num_res_blocks: int | None = None
    attention_resolutions: list[int] | None = None
    dropout: float | None = None
    num_heads: int | None = None
    num_head_channels: int | None = None
    use_scale_shift_norm: bool | None = None
    resblock_updown: bool | None = None
    conv_resample: bool | None = None
    learn_sigma: bool | None = None
    class_dropout_prob: float | None = None
    norm_groups: int | None = None
    time_scale: float | None = None
    time_input: Literal["scaled", "integer_step"] = "scaled"
    time_steps: int = 1000
    use_checkpoint: bool | None = None
    channels_last: bool | None = None

    def __attrs_post_init__(self) -> None:
        fill_from_preset(self, PRESETS, DEFAULTS)
        for key in ("model_channels", "num_res_blocks", "norm_groups", "time_steps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"expected a positive integer, got {getattr(self, key)}", (key,))
        if not self.channel_mult or any(m < 1 for m in self.channel_mult):
            raise ConfigError(f"expected a non-empty list of positive integers, got {self.channel_mult}", ("channel_mult",))
        if self.num_head_channels == -1 and self.num_heads < 1:
            raise ConfigError("set num_heads >= 1 or num_head_channels >= 1", ("num_heads",))
        if self.num_head_channels != -1 and self.num_head_channels < 1:
            raise ConfigError(f"expected -1 or a positive integer, got {self.num_head_channels}", ("num_head_channels",))
        for key in ("dropout", "class_dropout_prob"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ConfigError(f"expected a probability in [0, 1), got {getattr(self, key)}", (key,))


# --------------------------------------------------------------------------- layers
class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 and cast back (guided-diffusion's ``normalization``)."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.float()).type(x.dtype)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero the parameters of `module` and return it."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class TimestepBlock(nn.Module):
    """A module whose forward takes the conditioning embedding as a second argument."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class TimestepEmbedSequential(nn.Sequential):
    """A sequence passing ``emb`` to the children that take it."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, optionally followed by a 3x3 conv."""

    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """2x downsampling by a strided 3x3 conv or 2x2 average pooling."""

    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class ResBlock(TimestepBlock):
    """Residual block conditioned on ``emb``: ``(B, C_in, H, W), (B, E) -> (B, C_out, H', W')``."""

    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channels: int | None = None,
                 use_scale_shift_norm: bool = False, use_checkpoint: bool = False, up: bool = False,
                 down: bool = False, groups: int = 32):
        super().__init__()
        out_channels = out_channels or channels
        #: set to True by the trainer's ``gradient_checkpointing`` option (recompute in backward)
        self.gradient_checkpointing = use_checkpoint
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(GroupNorm32(groups, channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(nn.SiLU(),
                                        nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels))
        self.out_layers = nn.Sequential(GroupNorm32(groups, out_channels), nn.SiLU(), nn.Dropout(p=dropout),
                                        zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)))
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, x, emb, use_reentrant=False)
        return self._forward(x, emb)

    def _forward(self, x: Tensor, emb: Tensor) -> Tensor:
        if self.updown:
            h = self.in_layers[:-1](x)
            h = self.in_layers[-1](self.h_upd(h))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Self-attention over the pixels of ``(B, C, H, W)``; returns the same shape.

    ``qkv`` is a 1x1 conv to ``3C`` channels split as ``[q | k | v]``, each into
    heads (guided-diffusion's ``QKVAttention``, the "new" order).
    """

    def __init__(self, channels: int, num_heads: int = 1, num_head_channels: int = -1,
                 use_checkpoint: bool = False, groups: int = 32):
        super().__init__()
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            if channels % num_head_channels:
                raise ConfigError(f"{channels} attention channels do not divide into heads of {num_head_channels}",
                                  ("num_head_channels",))
            self.num_heads = channels // num_head_channels
        if channels % self.num_heads:
            raise ConfigError(f"{channels} attention channels do not divide into {self.num_heads} heads", ("num_heads",))
        #: set to True by the trainer's ``gradient_checkpointing`` option (recompute in backward)
        self.gradient_checkpointing = use_checkpoint
        self.norm = GroupNorm32(groups, channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def _forward(self, x: Tensor) -> Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        n = x.shape[-1]
        # The 1x1 convolutions applied as linear maps over (B, N, C): q, k and v then come out with
        # contiguous head channels, which the fused attention kernels (flash on CPU and GPU) need.
        h = self.norm(x).transpose(1, 2)
        qkv = F.linear(h, self.qkv.weight.squeeze(-1), self.qkv.bias)  # (B, N, 3C) = [q | k | v] per position
        q, k, v = qkv.reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, head_channels)
        h = F.linear(h.transpose(1, 2).reshape(b, n, c), self.proj_out.weight.squeeze(-1), self.proj_out.bias)
        return (x + h.transpose(1, 2)).reshape(b, c, *spatial)


# --------------------------------------------------------------------------- the model
def encoder_blocks(config: Any, first: nn.Module, ch: int, res: Any, attn: Any) -> tuple[nn.ModuleList, list[int], int]:
    """guided-diffusion's ``input_blocks`` (shared by `UNet` and `plugins.unet.classifier.UNetClassifier`).

    `first` maps the input to `ch` channels; then per level of ``config.channel_mult``,
    ``config.num_res_blocks`` x [``res(c_in, c_out)`` (+ ``attn(c)`` at the downsample rates in
    ``config.attention_resolutions``)] and, except at the last level, a downsampler (``res(c, c, down=True)``
    with ``config.resblock_updown``, else `Downsample`). Returns (the blocks, the channels after each block,
    the final downsample rate).
    """
    blocks, chans, ds, mc = nn.ModuleList([TimestepEmbedSequential(first)]), [ch], 1, config.model_channels
    for level, mult in enumerate(config.channel_mult):
        for _ in range(config.num_res_blocks):
            layers: list[nn.Module] = [res(ch, int(mult * mc))]
            ch = int(mult * mc)
            if ds in config.attention_resolutions:
                layers.append(attn(ch))
            blocks.append(TimestepEmbedSequential(*layers))
            chans.append(ch)
        if level != len(config.channel_mult) - 1:
            down = res(ch, ch, down=True) if config.resblock_updown else Downsample(ch, config.conv_resample)
            blocks.append(TimestepEmbedSequential(down))
            chans.append(ch)
            ds *= 2
    return blocks, chans, ds


class UNet(nn.Module):
    """See the module docstring. Called as ``model(x, t, y=None)``."""

    def __init__(self, config: UNetConfig, spec: DataSpec):
        super().__init__()
        self.config, self.spec = config, spec
        if len(spec.shape) != 3:
            raise ConfigError(f"the UNet takes images (C, H, W); this data has shape {tuple(spec.shape)}")
        in_channels, height, width = (int(s) for s in spec.shape)
        levels = len(config.channel_mult)
        factor = 2 ** (levels - 1)
        if height % factor or width % factor:
            raise ConfigError(f"{levels} levels halve the image {levels - 1} times: {height}x{width} does not "
                              f"divide by {factor}", ("channel_mult",))
        self.discrete = spec.kind == "discrete"
        if self.discrete and config.learn_sigma:
            raise ConfigError("learn_sigma applies to continuous data only", ("learn_sigma",))
        mc, groups = config.model_channels, config.norm_groups
        widths = {int(mc * m) for m in config.channel_mult}
        bad = sorted(w for w in widths if w % groups)
        if bad:
            raise ConfigError(f"channel counts {bad} do not divide into {groups} GroupNorm groups", ("norm_groups",))
        self.in_channels = in_channels
        self.model_channels = mc
        self.num_classes = spec.num_classes
        self.channels_last = config.channels_last
        time_embed_dim = mc * 4
        self.time_embed = nn.Sequential(nn.Linear(mc, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim))
        self.label_emb = nn.Embedding(spec.num_classes + 1, time_embed_dim) if spec.num_classes > 0 else None

        def res(ch_in: int, ch_out: int, **kw: Any) -> ResBlock:
            return ResBlock(ch_in, time_embed_dim, config.dropout, ch_out, config.use_scale_shift_norm,
                            config.use_checkpoint, groups=groups, **kw)

        def attn(ch: int) -> AttentionBlock:
            return AttentionBlock(ch, config.num_heads, config.num_head_channels, config.use_checkpoint, groups)

        ch = input_ch = int(config.channel_mult[0] * mc)
        if self.discrete:
            if spec.vocab_size < 1:
                raise ConfigError("discrete data needs a vocab_size in its data spec")
            if ch % in_channels:
                raise ConfigError(f"the first level's {ch} channels do not divide among the data's {in_channels} "
                                  f"channels (discrete inputs are embedded per channel)", ("model_channels",))
            self.token_embedding = nn.Embedding(spec.vocab_size, ch // in_channels)
            first: nn.Module = nn.Identity()
            out_channels = in_channels * spec.vocab_size
        else:
            first = nn.Conv2d(in_channels, ch, 3, padding=1)
            out_channels = in_channels * (2 if config.learn_sigma else 1)
        self.out_channels = out_channels
        self.input_blocks, skip_chans, ds = encoder_blocks(config, first, ch, res, attn)
        ch = skip_chans[-1]
        self.middle_block = TimestepEmbedSequential(res(ch, ch), attn(ch), res(ch, ch))
        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(config.channel_mult))[::-1]:
            for i in range(config.num_res_blocks + 1):
                layers = [res(ch + skip_chans.pop(), int(mc * mult))]
                ch = int(mc * mult)
                if ds in config.attention_resolutions:
                    layers.append(attn(ch))
                if level and i == config.num_res_blocks:
                    layers.append(res(ch, ch, up=True) if config.resblock_updown else Upsample(ch, config.conv_resample))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(GroupNorm32(groups, ch), nn.SiLU(),
                                 zero_module(nn.Conv2d(input_ch, out_channels, 3, padding=1)))
        if self.channels_last:
            self.to(memory_format=torch.channels_last)

    def forward(self, x: Tensor, t: Tensor | float, y: Tensor | None = None) -> Tensor:
        """``x (B, C, H, W)``, ``t (B,)`` or scalar, ``y (B,)`` or None -> ``(B, C_out, H, W)`` or logits ``(B, C, H, W, V)``."""
        batch = x.shape[0]
        t = expand_t(t, batch, device=x.device)
        if self.config.time_input == "integer_step":
            freq = timestep_embedding(integer_step(t, self.config.time_steps), self.model_channels, scale=1.0)
        else:
            freq = timestep_embedding(t, self.model_channels, scale=self.config.time_scale)
        emb = self.time_embed(freq.to(self.time_embed[0].weight.dtype))
        if self.label_emb is not None:
            if y is None:
                y = torch.full((batch,), self.num_classes, dtype=torch.long, device=x.device)
            elif self.training:
                y = drop_labels(y, self.config.class_dropout_prob, self.num_classes)  # torch's RNG: per rank
            emb = emb + self.label_emb(y)
        if self.discrete:
            b, _, hgt, wid = x.shape
            h = self.token_embedding(x).permute(0, 1, 4, 2, 3).reshape(b, -1, hgt, wid)
        else:
            h = x
        if self.channels_last:
            h = h.contiguous(memory_format=torch.channels_last)
        hs = []
        for module in self.input_blocks:
            h = module(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for module in self.output_blocks:
            h = module(torch.cat([h, hs.pop()], dim=1), emb)
        out = self.out(h).contiguous()
        if self.discrete:
            b, _, hgt, wid = out.shape
            return out.reshape(b, self.in_channels, self.spec.vocab_size, hgt, wid).permute(0, 1, 3, 4, 2)
        return out


def make_unet(config: UNetConfig, spec: DataSpec) -> UNet:
    """Backbone factory: a `UNet` sized for `spec`."""
    return UNet(config, spec)
