"""A time-conditioned MLP: ``model(x, t, y=None)``.

Continuous data ``x (B, *shape)`` is flattened to ``(B, D)``; discrete data
``x (B, *shape)`` of token ids is embedded to ``(B, D * token_dim)``. The time
embedding ``sinusoid(time_scale * t)`` (and a class embedding of ``y``, with
``num_classes`` as the null label) is concatenated to the input of every
hidden layer:

    h_0 = x,  h_{k+1} = act(W_k [h_k, c] + b_k),  out = W_L [h_L, c] + b_L

where ``c = [emb(t), emb(y)]``. With ``interval_input = true`` the model also takes the end ``r (B,)``
of a time interval, ``model(x, t, y=None, r=None)``, and ``c = [emb(t), emb(r - t), emb(y)]`` (the two-time
conditioning of MeanFlow's average velocity ``u(x_t, t, r)``, which embeds t and the interval length);
``r = None`` means ``r = t`` (an interval of length 0: the instantaneous velocity), so every solver can
call it as a plain field. With ``input_freqs = K > 0`` (continuous data only) the input is
NeRF's positional encoding of the flattened ``x`` instead,
``h_0 = [x, sin(2^k x / input_scale), cos(2^k x / input_scale)]`` for ``k < K`` (elementwise), which
lets a small MLP represent sharp edges of a low-dimensional density (e.g. the checkerboard's cells). Output: ``(B, *shape)`` (continuous, times
``out_channels_mult`` along the first data axis for learned variances) or
``(B, *shape, V)`` logits (discrete); with ``classifier = true`` class logits ``(B, num_classes)`` of
``x`` and ``t`` alone (no label input: a noisy classifier for classifier guidance).
"""

from __future__ import annotations

from typing import Literal

import attrs
import torch
from torch import Tensor, nn

from core.interfaces import DataSpec
from core.nn import expand_t, timestep_embedding
from registry import ConfigError
from core.validate import non_negative, positive


@attrs.define
class MLPConfig:
    """Options of the MLP backbone.

    Attributes:
        hidden: width of the hidden layers.
        depth: number of hidden layers.
        time_dim: size of the sinusoidal time embedding.
        time_scale: t is multiplied by this before the sinusoids.
        activation: silu, gelu or relu.
        token_dim: embedding size per token for discrete data.
        out_channels_mult: 2 makes the output twice the data's channels (learned variances).
        input_freqs: K > 0 feeds [x, sin(2^k x / input_scale), cos(2^k x / input_scale)], k < K,
            instead of x (positional encoding; continuous data only). 0: x itself.
        input_scale: length scale of the lowest input frequency (about the data's extent).
        classifier: output ``(B, num_classes)`` logits and take no label: a noisy classifier ``c(x_t, t)``
            (the ``noisy_classifier`` objective; continuous labelled data).
        interval_input: also take the end r of a time interval, model(x, t, y, r=None), embedding r - t
            next to t (MeanFlow's average velocity u(x_t, t, r); r = None is r = t).
    """

    hidden: int = 512
    depth: int = 4
    time_dim: int = 64
    time_scale: float = 1000.0
    activation: Literal["silu", "gelu", "relu"] = "silu"
    token_dim: int = 16
    out_channels_mult: int = 1
    input_freqs: int = 0
    input_scale: float = 1.0
    classifier: bool = False
    interval_input: bool = False

    def __attrs_post_init__(self) -> None:
        positive(self, "hidden", "depth", "time_dim", "time_scale", "token_dim", "out_channels_mult", "input_scale")
        non_negative(self, "input_freqs")


_ACT = {"silu": nn.SiLU, "gelu": nn.GELU, "relu": nn.ReLU}


class MLP(nn.Module):
    """See the module docstring."""

    def __init__(self, config: MLPConfig, spec: DataSpec):
        super().__init__()
        self.config, self.spec = config, spec
        self.discrete = spec.kind == "discrete"
        numel = 1
        for s in spec.shape:
            numel *= s
        self.numel = numel
        if self.discrete and config.input_freqs:
            raise ConfigError("input_freqs encodes continuous inputs; discrete data is embedded (token_dim)",
                              ("input_freqs",))
        in_dim = numel * config.token_dim if self.discrete else numel * (1 + 2 * config.input_freqs)
        self.register_buffer("freqs", 2.0 ** torch.arange(config.input_freqs) / config.input_scale,
                             persistent=False)
        if config.classifier and (self.discrete or spec.num_classes < 1):
            raise ConfigError("classifier = true needs continuous labelled data ([data] conditional = true)",
                              ("classifier",))
        if self.discrete:
            self.token_embed = nn.Embedding(spec.vocab_size, config.token_dim)
            out_dim = numel * spec.vocab_size
        else:
            out_dim = spec.num_classes if config.classifier else numel * config.out_channels_mult
        cond_dim = config.time_dim * (2 if config.interval_input else 1)
        self.label_embed = None
        if spec.num_classes > 0 and not config.classifier:
            self.label_embed = nn.Embedding(spec.num_classes + 1, config.time_dim)
            cond_dim += config.time_dim
        act = _ACT[config.activation]
        self.layers = nn.ModuleList()
        dim = in_dim
        for _ in range(config.depth):
            self.layers.append(nn.Linear(dim + cond_dim, config.hidden))
            dim = config.hidden
        self.act = act()
        self.out = nn.Linear(dim + cond_dim, out_dim)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None, r: Tensor | None = None) -> Tensor:
        batch = x.shape[0]
        t = expand_t(t, batch, device=x.device)
        if r is not None and not self.config.interval_input:
            raise ValueError("this MLP takes one time; set backbone.interval_input = true for model(x, t, y, r)")
        h = self.token_embed(x).reshape(batch, -1) if self.discrete else x.reshape(batch, -1)
        if self.config.input_freqs:
            args = (h[:, :, None] * self.freqs.to(h.dtype)).reshape(batch, -1)
            h = torch.cat([h, torch.sin(args), torch.cos(args)], dim=-1)
        cond = [timestep_embedding(t, self.config.time_dim, self.config.time_scale).to(h.dtype)]
        if self.config.interval_input:
            gap = expand_t(r, batch, device=x.device) - t if r is not None else torch.zeros_like(t)
            cond.append(timestep_embedding(gap, self.config.time_dim, self.config.time_scale).to(h.dtype))
        if self.label_embed is not None:
            if y is None:
                y = torch.full((batch,), self.spec.num_classes, device=x.device, dtype=torch.long)
            cond.append(self.label_embed(y).to(h.dtype))
        c = torch.cat(cond, dim=-1)
        for layer in self.layers:
            h = self.act(layer(torch.cat([h, c], dim=-1)))
        out = self.out(torch.cat([h, c], dim=-1))
        if self.config.classifier:
            return out
        if self.discrete:
            return out.reshape(batch, *self.spec.shape, self.spec.vocab_size)
        if self.config.out_channels_mult != 1:
            shape = self.spec.shape
            return out.reshape(batch, shape[0] * self.config.out_channels_mult, *shape[1:])
        return out.reshape(batch, *self.spec.shape)


def make_mlp(config: MLPConfig, spec: DataSpec) -> MLP:
    """Backbone factory: an `MLP` sized for `spec`."""
    return MLP(config, spec)
