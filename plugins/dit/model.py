"""DiT: a diffusion transformer with adaLN-Zero conditioning (Peebles & Xie, 2023).

The network follows facebookresearch/DiT's ``models.py`` layer for layer, with
the same parameter names, so its checkpoints load with ``load_state_dict``:

    tokens  h_0 = PatchEmbed(x) + pos            (B, N, D), N = H W / p^2
    cond    c   = MLP(sinusoid(time_scale * t)) + LabelEmbed(y)          (B, D)
    block   (s1, a1, g1, s2, a2, g2) = Linear(SiLU(c))   zero-initialised
            h  <- h + g1 * Attn(LN(h) * (1 + a1) + s1)
            h  <- h + g2 * MLP(LN(h) * (1 + a2) + s2)
    final   out = Linear(LN(h) * (1 + a) + s)       zero-initialised
            -> unpatchify to (B, C_out, H, W)

Because every gate and the final layer start at zero, each block is the
identity map and the output is exactly zero at initialisation (adaLN-Zero).
Attention runs through ``torch.nn.functional.scaled_dot_product_attention``
(flash / memory-efficient kernels on GPU, the fused CPU kernel on CPU).

Inputs (``spec.shape``):

* ``(C, H, W)`` images (or latents): square-or-not patches of ``patch_size``,
  fixed 2D sin-cos position embeddings (MAE / DiT layout).
* ``(C, L)`` or ``(L,)`` sequences: 1D patches of ``patch_size`` tokens and 1D
  sin-cos positions. With ``patch_size = 1`` and discrete data this is a plain
  bidirectional transformer over tokens (e.g. characters).

Continuous data: ``x`` float ``(B, *shape)`` -> ``(B, *shape)``, or with
``learn_sigma`` twice the channels (first half the mean prediction, second the
variance interpolation, as in DiT / improved DDPM). Discrete data: ``x`` long
token ids ``(B, *shape)`` -> logits ``(B, *shape, V)``; tokens are embedded,
the embeddings of one patch concatenated into the patch vector.

Class labels: ``y (B,)`` in ``[0, num_classes)``; ``y = None`` or the label
``num_classes`` select the learned null embedding used by classifier-free
guidance. ``class_dropout_prob`` replaces labels by that same null label in
training mode only (DiT's ``LabelEmbedder``); objectives such as
``velocity_mse`` may drop labels too (their ``label_dropout``), also to
``num_classes``: use one of the two, or the rates compound. Prefer the
objective's: it draws per example (`core.rng`), while a backbone sees no
example seeds and draws from each process's torch RNG, so
``class_dropout_prob`` makes training depend on the process count. For data without
classes (``spec.num_classes == 0``) there is no label embedding and ``y`` is ignored.

Time: ``t`` of shape ``(B,)`` in [0, 1] (a float or 0-d tensor broadcasts);
the embedding sees ``time_scale * t`` (default 1000, the range of DiT's
integer diffusion steps).
"""

from __future__ import annotations

import math
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

#: Architectures of the DiT paper (Table 1) and a tiny one for 8x8 digits.
#: Names are "DiT-{size}/{patch}".
ARCHS: dict[str, dict[str, int]] = {
    "S": {"depth": 12, "hidden_size": 384, "num_heads": 6},
    "B": {"depth": 12, "hidden_size": 768, "num_heads": 12},
    "L": {"depth": 24, "hidden_size": 1024, "num_heads": 16},
    "XL": {"depth": 28, "hidden_size": 1152, "num_heads": 16},
}
PRESETS: dict[str, dict[str, Any]] = {
    f"DiT-{size}/{patch}": {**arch, "patch_size": patch} for size, arch in ARCHS.items() for patch in (2, 4, 8)
}
PRESETS["DiT-digits"] = {"depth": 4, "hidden_size": 128, "num_heads": 4, "patch_size": 2}

#: Values of keys that neither the preset nor the experiment sets (DiT-S/2's architecture).
DEFAULTS: dict[str, Any] = {
    "hidden_size": 384,
    "depth": 12,
    "num_heads": 6,
    "patch_size": 2,
    "mlp_ratio": 4.0,
    "class_dropout_prob": 0.0,
    "learn_sigma": False,
    "frequency_embedding_size": 256,
    "time_scale": 1000.0,
    "use_checkpoint": False,
}


@attrs.define
class DiTConfig:
    """Options of the DiT backbone.

    ``preset`` (e.g. ``"DiT-XL/2"``, ``"DiT-S/8"``, ``"DiT-digits"``) fills the
    architecture keys; any key written explicitly overrides the preset. Keys
    set by neither take the defaults of DiT-S/2 (see `DEFAULTS`).

    Attributes:
        preset: one of `PRESETS` or None.
        hidden_size: token width D.
        depth: number of DiT blocks.
        num_heads: attention heads (D must divide by it).
        patch_size: patch side p (images: p x p pixels; sequences: p tokens).
        mlp_ratio: hidden width of the block MLP, as a multiple of D.
        class_dropout_prob: probability of replacing a label by the null label
            ``num_classes`` in training mode (DiT's default is 0.1; leave 0 when
            the objective drops labels itself).
        learn_sigma: output twice the data's channels (continuous data only).
        frequency_embedding_size: size of the sinusoidal time features.
        time_scale: t in [0, 1] is multiplied by this before the sinusoids (time_input = "scaled").
        time_input: "scaled" (the sinusoids see time_scale * t) or "integer_step" (they see the DDPM step
            k = time_steps * (1 - t) - 1 that the ddpm plugin's t = 1 - (k + 1) / T came from: what a
            published DiT / ADM checkpoint was trained on).
        time_steps: T of time_input = "integer_step" (the checkpoint's diffusion steps).
        qk_norm: RMS-normalise queries and keys per head before attention (SD3, with learned scales).
        use_checkpoint: gradient checkpointing of every block during training.
    """

    preset: str | None = None
    hidden_size: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    patch_size: int | None = None
    mlp_ratio: float | None = None
    class_dropout_prob: float | None = None
    learn_sigma: bool | None = None
    frequency_embedding_size: int | None = None
    time_scale: float | None = None
    time_input: Literal["scaled", "integer_step"] = "scaled"
    time_steps: int = 1000
    qk_norm: bool = False
    use_checkpoint: bool | None = None

    def __attrs_post_init__(self) -> None:
        fill_from_preset(self, PRESETS, DEFAULTS)
        for key in ("hidden_size", "depth", "num_heads", "patch_size", "frequency_embedding_size", "time_steps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"expected a positive integer, got {getattr(self, key)}", (key,))
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"hidden_size {self.hidden_size} does not divide into {self.num_heads} heads", ("num_heads",))
        if not 0.0 <= self.class_dropout_prob < 1.0:
            raise ConfigError(f"expected a probability in [0, 1), got {self.class_dropout_prob}", ("class_dropout_prob",))
        if self.mlp_ratio <= 0:
            raise ConfigError(f"expected a positive number, got {self.mlp_ratio}", ("mlp_ratio",))


# --------------------------------------------------------------------------- position embeddings
def sincos_1d(dim: int, positions: Tensor) -> Tensor:
    """``(M,)`` positions -> ``(M, dim)``: ``[sin(pos * w_i), cos(pos * w_i)]``, ``w_i = 10000^(-2i/dim)``.

    Computed in float64 (as MAE / DiT do in numpy) and returned in float32.
    """
    if dim % 2:
        raise ValueError(f"position embedding size must be even, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    out = positions.double().reshape(-1)[:, None] * omega[None]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1).float()


def sincos_2d(dim: int, grid_h: int, grid_w: int) -> Tensor:
    """Fixed 2D sin-cos embedding ``(grid_h * grid_w, dim)`` of a row-major patch grid.

    As in DiT / MAE, the first ``dim / 2`` features encode the column index
    and the last ``dim / 2`` the row index.
    """
    if dim % 4:
        raise ValueError(f"2D position embedding size must divide by 4, got {dim}")
    rows = torch.arange(grid_h, dtype=torch.float64)[:, None].expand(grid_h, grid_w)
    cols = torch.arange(grid_w, dtype=torch.float64)[None, :].expand(grid_h, grid_w)
    return torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """``x (B, N, D) * (1 + scale (B, D)) + shift (B, D)``."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


# --------------------------------------------------------------------------- embedders
class TimestepEmbedder(nn.Module):
    """``t (B,)`` -> ``(B, D)``: an MLP on sinusoidal features of ``time_scale * t``, or, with
    ``time_input = "integer_step"``, of the DDPM step ``k = T (1 - t) - 1`` (DiT's and ADM's own input)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256, time_scale: float = 1000.0,
                 time_input: str = "scaled", time_steps: int = 1000):
        super().__init__()
        self.time_input, self.time_steps = time_input, time_steps
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )
        self.frequency_embedding_size = frequency_embedding_size
        self.time_scale = time_scale

    def forward(self, t: Tensor) -> Tensor:
        if self.time_input == "integer_step":
            freq = timestep_embedding(integer_step(t, self.time_steps), self.frequency_embedding_size, scale=1.0)
        else:
            freq = timestep_embedding(t, self.frequency_embedding_size, scale=self.time_scale)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """``y (B,)`` -> ``(B, D)`` with a learned null class ``num_classes`` and label dropout.

    ``embedding_table`` has ``num_classes + 1`` rows, as DiT's with guidance.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def forward(self, y: Tensor | None, batch: int, device: torch.device) -> Tensor:
        if y is None:
            y = torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
        elif self.training:
            y = drop_labels(y, self.dropout_prob, self.num_classes)  # torch's RNG: per rank (see the module doc)
        return self.embedding_table(y)


class PatchEmbed(nn.Module):
    """Continuous ``(B, C, *spatial)`` -> patch tokens ``(B, N, D)`` with a strided convolution."""

    def __init__(self, in_channels: int, hidden_size: int, patch_size: int, ndim: int):
        super().__init__()
        conv = nn.Conv2d if ndim == 2 else nn.Conv1d
        self.proj = conv(in_channels, hidden_size, patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TokenPatchEmbed(nn.Module):
    """Discrete ``(B, C, *spatial)`` token ids -> ``(B, N, D)``.

    Every token is embedded to ``E`` features and the ``C * p^ndim`` embeddings
    of one patch are concatenated (a patch embedding of one-hot inputs); when
    that does not make ``D`` features, a linear map follows.
    """

    def __init__(self, vocab_size: int, in_channels: int, hidden_size: int, patch_size: int, ndim: int):
        super().__init__()
        self.p, self.ndim = patch_size, ndim
        per_patch = in_channels * patch_size ** ndim
        dim = max(1, hidden_size // per_patch)
        self.embedding = nn.Embedding(vocab_size, dim)
        self.proj = nn.Linear(per_patch * dim, hidden_size) if per_patch * dim != hidden_size else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        e = self.embedding(x)  # (B, C, *spatial, E)
        b, c, p = x.shape[0], x.shape[1], self.p
        if self.ndim == 2:
            h, w = x.shape[2] // p, x.shape[3] // p
            e = e.reshape(b, c, h, p, w, p, -1).permute(0, 2, 4, 1, 3, 5, 6).reshape(b, h * w, -1)
        else:
            n = x.shape[2] // p
            e = e.reshape(b, c, n, p, -1).permute(0, 2, 1, 3, 4).reshape(b, n, -1)
        return self.proj(e)


# --------------------------------------------------------------------------- blocks
class Attention(nn.Module):
    """Multi-head self-attention over ``(B, N, D)`` through ``scaled_dot_product_attention``.

    The fused ``qkv`` projection is laid out ``[3, heads, head_dim]`` as in timm's
    ``Attention`` (so DiT checkpoints load).
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        # SD3's QK normalisation: RMSNorm over each head's queries and keys (learned scale, eps 1e-6)
        self.q_norm = nn.RMSNorm(dim // num_heads, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(dim // num_heads, eps=1e-6) if qk_norm else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, head_dim)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    """``fc2(GELU_tanh(fc1(x)))`` (timm's ``Mlp`` names)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """A transformer block with adaLN-Zero conditioning: ``(B, N, D), (B, D) -> (B, N, D)``."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qk_norm)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm and a linear map to the per-patch outputs."""

    def __init__(self, hidden_size: int, out_per_token: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, out_per_token)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


# --------------------------------------------------------------------------- the model
def data_layout(spec: DataSpec) -> tuple[int, tuple[int, ...], bool]:
    """``(channels, spatial shape, has_channel_axis)`` of a data spec; ConfigError if unsupported."""
    shape = tuple(int(s) for s in spec.shape)
    if len(shape) == 1:
        return 1, shape, False
    if len(shape) in (2, 3):
        return shape[0], shape[1:], True
    raise ConfigError(f"DiT takes data of shape (C, H, W), (C, L) or (L,); this data has shape {shape}")


class DiT(nn.Module):
    """See the module docstring. Called as ``model(x, t, y=None)``."""

    def __init__(self, config: DiTConfig, spec: DataSpec):
        super().__init__()
        self.config, self.spec = config, spec
        self.discrete = spec.kind == "discrete"
        channels, spatial, self.has_channel_axis = data_layout(spec)
        self.in_channels = channels
        self.spatial = spatial
        self.ndim = len(spatial)
        p = self.patch_size = config.patch_size
        bad = [s for s in spatial if s % p]
        if bad:
            raise ConfigError(f"patch_size {p} does not divide the data's spatial size {spatial}", ("patch_size",))
        if self.discrete and spec.vocab_size < 1:
            raise ConfigError("discrete data needs a vocab_size in its data spec")
        if self.discrete and config.learn_sigma:
            raise ConfigError("learn_sigma applies to continuous data only", ("learn_sigma",))
        d = config.hidden_size
        self.grid = tuple(s // p for s in spatial)
        if self.discrete:
            self.out_channels = channels
            out_per_token = p ** self.ndim * channels * spec.vocab_size
            self.x_embedder = TokenPatchEmbed(spec.vocab_size, channels, d, p, self.ndim)
        else:
            self.out_channels = channels * (2 if config.learn_sigma else 1)
            out_per_token = p ** self.ndim * self.out_channels
            self.x_embedder = PatchEmbed(channels, d, p, self.ndim)
        self.t_embedder = TimestepEmbedder(d, config.frequency_embedding_size, config.time_scale, config.time_input,
                                           config.time_steps)
        self.y_embedder = LabelEmbedder(spec.num_classes, d, config.class_dropout_prob) if spec.num_classes > 0 else None
        num_tokens = math.prod(self.grid)
        # Fixed (not trained) sin-cos positions; a parameter, as in DiT, so checkpoints carry it.
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, d), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(d, config.num_heads, config.mlp_ratio, config.qk_norm)
                                     for _ in range(config.depth)])
        self.final_layer = FinalLayer(d, out_per_token)
        #: recompute each block in backward (the config's use_checkpoint; the trainer's
        #: ``gradient_checkpointing`` option sets it)
        self.gradient_checkpointing = config.use_checkpoint
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """DiT's initialisation: xavier linears, sin-cos positions, zeroed adaLN and output layers."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        if self.pos_embed.device.type != "meta":
            pos = sincos_2d(self.config.hidden_size, *self.grid) if self.ndim == 2 else \
                sincos_1d(self.config.hidden_size, torch.arange(self.grid[0]))
            self.pos_embed.copy_(pos.unsqueeze(0))
        if isinstance(self.x_embedder, PatchEmbed):
            w = self.x_embedder.proj.weight
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x: Tensor) -> Tensor:
        """``(B, N, p^ndim * C_out [* V])`` -> ``(B, C_out, *spatial [, V])``."""
        b, p = x.shape[0], self.patch_size
        c = self.out_channels
        if self.discrete:
            v = self.spec.vocab_size
            if self.ndim == 2:
                h, w = self.grid
                x = x.reshape(b, h, w, p, p, c, v).permute(0, 5, 1, 3, 2, 4, 6)
                return x.reshape(b, c, h * p, w * p, v)
            n = self.grid[0]
            return x.reshape(b, n, p, c, v).permute(0, 3, 1, 2, 4).reshape(b, c, n * p, v)
        if self.ndim == 2:
            h, w = self.grid
            x = x.reshape(b, h, w, p, p, c)
            x = torch.einsum("nhwpqc->nchpwq", x)
            return x.reshape(b, c, h * p, w * p)
        n = self.grid[0]
        return x.reshape(b, n, p, c).permute(0, 3, 1, 2).reshape(b, c, n * p)

    def forward(self, x: Tensor, t: Tensor | float, y: Tensor | None = None) -> Tensor:
        """``x (B, *shape)``, ``t (B,)`` or scalar, ``y (B,)`` or None -> ``(B, *shape)`` (see module docstring)."""
        batch = x.shape[0]
        t = expand_t(t, batch, device=x.device)
        if not self.has_channel_axis:
            x = x.unsqueeze(1)
        h = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t)
        if self.y_embedder is not None:
            c = c + self.y_embedder(y, batch, x.device)
        use_ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            h = checkpoint(block, h, c, use_reentrant=False) if use_ckpt else block(h, c)
        out = self.unpatchify(self.final_layer(h, c))
        if not self.has_channel_axis:
            # (B, C_out, L[, V]) -> (B, L[, V]) or, with learned sigma, (B, 2L) along the first data axis.
            out = out.reshape(batch, -1, *out.shape[3:]) if self.discrete else out.reshape(batch, -1)
        return out


def make_dit(config: DiTConfig, spec: DataSpec) -> DiT:
    """Backbone factory: a `DiT` sized for `spec`."""
    return DiT(config, spec)
