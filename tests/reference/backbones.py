"""Plain reference definitions of the UNet and DiT backbones, with explicit softmax attention.

These are written the straightforward way the original code bases write them
(guided-diffusion's ``QKVAttention`` einsums, timm's ``Attention`` with
``softmax(q k^T / sqrt(d)) v``), with no fused kernels, so that

* the plugins' networks can be checked against them weight for weight
  (``reference.load_state_dict(model.state_dict())`` and equal outputs), and
* ``benchmarks/backbones.py`` can report the plugins' speed relative to them.

Only continuous image data ``(C, H, W)`` is covered (the discrete variants
differ from these only in their first and last layers). Parameter names equal
the plugins' (which equal guided-diffusion's and DiT's).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn


# --------------------------------------------------------------------------- shared
def sinusoid(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """GLIDE / guided-diffusion's timestep embedding of (already scaled) ``t (B,)``: ``[cos, sin]``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).to(t.device)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def _null_labels(y: Tensor | None, batch: int, num_classes: int, device: torch.device) -> Tensor:
    if y is None:
        return torch.full((batch,), num_classes, dtype=torch.long, device=device)
    return y


# --------------------------------------------------------------------------- DiT (facebookresearch/DiT models.py)
def _pos_embed_2d(embed_dim: int, grid_size: int) -> np.ndarray:
    """MAE's get_2d_sincos_pos_embed (numpy, w goes first)."""
    gh = np.arange(grid_size, dtype=np.float32)
    gw = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(gw, gh), axis=0).reshape(2, 1, grid_size, grid_size)

    def one(dim: int, pos: np.ndarray) -> np.ndarray:
        omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
        omega = 1.0 / 10000 ** omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one(embed_dim // 2, grid[0]), one(embed_dim // 2, grid[1])], axis=1)


class _RefAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = attn.softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class _RefMlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class _RefDiTBlock(nn.Module):
    def __init__(self, hidden: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = _RefAttention(hidden, heads)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = _RefMlp(hidden, int(hidden * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        s1, a1, g1, s2, a2, g2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + g1.unsqueeze(1) * self.attn(_modulate(self.norm1(x), s1, a1))
        return x + g2.unsqueeze(1) * self.mlp(_modulate(self.norm2(x), s2, a2))


class _Namespace(nn.Module):
    """An empty module to hold children under DiT's names (x_embedder.proj, t_embedder.mlp, ...)."""


class RefDiT(nn.Module):
    """DiT over square ``(C, S, S)`` inputs, explicit attention. ``forward(x, t, y=None)`` with ``t`` in [0, 1]."""

    def __init__(self, input_size: int, patch_size: int, in_channels: int, hidden_size: int, depth: int,
                 num_heads: int, mlp_ratio: float = 4.0, num_classes: int = 0, learn_sigma: bool = False,
                 frequency_embedding_size: int = 256, time_scale: float = 1000.0):
        super().__init__()
        self.p, self.time_scale, self.num_classes = patch_size, time_scale, num_classes
        self.out_channels = in_channels * (2 if learn_sigma else 1)
        self.freq = frequency_embedding_size
        self.x_embedder = _Namespace()
        self.x_embedder.proj = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        self.t_embedder = _Namespace()
        self.t_embedder.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                            nn.Linear(hidden_size, hidden_size))
        if num_classes > 0:
            self.y_embedder = _Namespace()
            self.y_embedder.embedding_table = nn.Embedding(num_classes + 1, hidden_size)
        else:
            self.y_embedder = None
        grid = input_size // patch_size
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, hidden_size), requires_grad=False)
        if self.pos_embed.device.type != "meta":
            with torch.no_grad():
                self.pos_embed.copy_(torch.from_numpy(_pos_embed_2d(hidden_size, grid)).float().unsqueeze(0))
        self.blocks = nn.ModuleList([_RefDiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = _Namespace()
        self.final_layer.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.final_layer.linear = nn.Linear(hidden_size, patch_size * patch_size * self.out_channels)
        self.final_layer.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        b = x.shape[0]
        h = self.x_embedder.proj(x).flatten(2).transpose(1, 2) + self.pos_embed
        c = self.t_embedder.mlp(sinusoid(self.time_scale * t, self.freq))
        if self.y_embedder is not None:
            c = c + self.y_embedder.embedding_table(_null_labels(y, b, self.num_classes, x.device))
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.final_layer.adaLN_modulation(c).chunk(2, dim=1)
        h = self.final_layer.linear(_modulate(self.final_layer.norm_final(h), shift, scale))
        g, p, co = int(h.shape[1] ** 0.5), self.p, self.out_channels
        h = torch.einsum("nhwpqc->nchpwq", h.reshape(b, g, g, p, p, co))
        return h.reshape(b, co, g * p, g * p)


# --------------------------------------------------------------------------- UNet (guided-diffusion unet.py)
def _norm(ch: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, ch)


class _Seq(nn.Sequential):
    def forward(self, x: Tensor, emb: Tensor) -> Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, _RefResBlock) else layer(x)
        return x


class _RefUp(nn.Module):
    def __init__(self, ch: int, use_conv: bool):
        super().__init__()
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = nn.functional.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class _RefDown(nn.Module):
    def __init__(self, ch: int, use_conv: bool):
        super().__init__()
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class _RefResBlock(nn.Module):
    def __init__(self, ch: int, emb_ch: int, dropout: float, out_ch: int, scale_shift: bool, groups: int,
                 up: bool = False, down: bool = False):
        super().__init__()
        self.scale_shift = scale_shift
        self.in_layers = nn.Sequential(_norm(ch, groups), nn.SiLU(), nn.Conv2d(ch, out_ch, 3, padding=1))
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = _RefUp(ch, False), _RefUp(ch, False)
        elif down:
            self.h_upd, self.x_upd = _RefDown(ch, False), _RefDown(ch, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_ch, 2 * out_ch if scale_shift else out_ch))
        self.out_layers = nn.Sequential(_norm(out_ch, groups), nn.SiLU(), nn.Dropout(dropout),
                                        nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip_connection = nn.Identity() if out_ch == ch else nn.Conv2d(ch, out_ch, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        if self.updown:
            h = self.in_layers[2](self.h_upd(self.in_layers[1](self.in_layers[0](x))))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        e = self.emb_layers(emb)[..., None, None]
        if self.scale_shift:
            scale, shift = torch.chunk(e, 2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            for layer in self.out_layers[1:]:
                h = layer(h)
        else:
            h = self.out_layers(h + e)
        return self.skip_connection(x) + h


class _RefAttnBlock(nn.Module):
    def __init__(self, ch: int, num_heads: int, num_head_channels: int, groups: int):
        super().__init__()
        self.heads = num_heads if num_head_channels == -1 else ch // num_head_channels
        self.norm = _norm(ch, groups)
        self.qkv = nn.Conv1d(ch, 3 * ch, 1)
        self.proj_out = nn.Conv1d(ch, ch, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, hh, ww = x.shape
        x = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x))
        n = qkv.shape[-1]
        ch = c // self.heads
        q, k, v = qkv.chunk(3, dim=1)
        scale = 1 / math.sqrt(math.sqrt(ch))
        w = torch.einsum("bct,bcs->bts", (q * scale).reshape(b * self.heads, ch, n),
                         (k * scale).reshape(b * self.heads, ch, n))
        w = torch.softmax(w.float(), dim=-1).type(w.dtype)
        a = torch.einsum("bts,bcs->bct", w, v.reshape(b * self.heads, ch, n)).reshape(b, c, n)
        return (x + self.proj_out(a)).reshape(b, c, hh, ww)


class RefUNet(nn.Module):
    """guided-diffusion's UNetModel (new attention order), explicit attention; ``forward(x, t, y=None)``."""

    def __init__(self, in_channels: int, model_channels: int, channel_mult, num_res_blocks: int,
                 attention_resolutions, dropout: float = 0.0, num_heads: int = 1, num_head_channels: int = -1,
                 use_scale_shift_norm: bool = False, resblock_updown: bool = False, conv_resample: bool = True,
                 learn_sigma: bool = False, num_classes: int = 0, norm_groups: int = 32, time_scale: float = 1000.0):
        super().__init__()
        self.mc, self.time_scale, self.num_classes = model_channels, time_scale, num_classes
        ted = 4 * model_channels
        self.time_embed = nn.Sequential(nn.Linear(model_channels, ted), nn.SiLU(), nn.Linear(ted, ted))
        self.label_emb = nn.Embedding(num_classes + 1, ted) if num_classes > 0 else None

        def res(a: int, b: int, **kw) -> _RefResBlock:
            return _RefResBlock(a, ted, dropout, b, use_scale_shift_norm, norm_groups, **kw)

        def attn(c: int) -> _RefAttnBlock:
            return _RefAttnBlock(c, num_heads, num_head_channels, norm_groups)

        ch = input_ch = channel_mult[0] * model_channels
        self.input_blocks = nn.ModuleList([_Seq(nn.Conv2d(in_channels, ch, 3, padding=1))])
        chans, ds = [ch], 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [res(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(attn(ch))
                self.input_blocks.append(_Seq(*layers))
                chans.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(_Seq(res(ch, ch, down=True) if resblock_updown else _RefDown(ch, conv_resample)))
                chans.append(ch)
                ds *= 2
        self.middle_block = _Seq(res(ch, ch), attn(ch), res(ch, ch))
        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [res(ch + chans.pop(), model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(attn(ch))
                if level and i == num_res_blocks:
                    layers.append(res(ch, ch, up=True) if resblock_updown else _RefUp(ch, conv_resample))
                    ds //= 2
                self.output_blocks.append(_Seq(*layers))
        out_ch = in_channels * (2 if learn_sigma else 1)
        self.out = nn.Sequential(_norm(ch, norm_groups), nn.SiLU(), nn.Conv2d(input_ch, out_ch, 3, padding=1))

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        emb = self.time_embed(sinusoid(self.time_scale * t, self.mc))
        if self.label_emb is not None:
            emb = emb + self.label_emb(_null_labels(y, x.shape[0], self.num_classes, x.device))
        hs, h = [], x
        for module in self.input_blocks:
            h = module(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for module in self.output_blocks:
            h = module(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)


# --------------------------------------------------------------------------- from a plugin model
def reference_for(model: nn.Module, device: torch.device | str | None = None) -> nn.Module:
    """The reference network of a plugin `UNet` or `DiT` (continuous images), with the same weights."""
    cfg, spec = model.config, model.spec
    c, hgt, wid = (int(s) for s in spec.shape)
    name = type(model).__name__
    if spec.kind != "continuous":
        raise ValueError("the reference definitions cover continuous data only")
    with torch.device("meta"):
        if name == "DiT":
            if hgt != wid:
                raise ValueError("the reference DiT takes square inputs")
            ref = RefDiT(hgt, cfg.patch_size, c, cfg.hidden_size, cfg.depth, cfg.num_heads, cfg.mlp_ratio,
                         spec.num_classes, cfg.learn_sigma, cfg.frequency_embedding_size, cfg.time_scale)
        elif name == "UNet":
            ref = RefUNet(c, cfg.model_channels, list(cfg.channel_mult), cfg.num_res_blocks,
                          list(cfg.attention_resolutions), cfg.dropout, cfg.num_heads, cfg.num_head_channels,
                          cfg.use_scale_shift_norm, cfg.resblock_updown, cfg.conv_resample, cfg.learn_sigma,
                          spec.num_classes, cfg.norm_groups, cfg.time_scale)
        else:
            raise TypeError(f"no reference definition for {name}")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ref.load_state_dict(state, strict=True, assign=True)
    if isinstance(ref, RefDiT):
        ref.pos_embed.requires_grad_(False)
    ref.train(model.training)
    return ref.to(device) if device is not None else ref
