"""Automatic weight inheritance (TinyCLIP, after CoFiPruning): hard-concrete L0 masks over a CLIP's
structure, the sparsity penalty, and pruning to a dense student with the masked model's function.

**Masks** (per tower, ``D`` width, ``L`` blocks, ``H`` heads, ``M`` MLP width)::

    hidden (D,)   the residual channels ("embedding dimension")
    heads (L, H)  attention heads            mha (L,)  whole attention sublayers
    intermediate (L, M)  MLP hidden units    ffn (L,)  whole MLP sublayers

**Hard concrete** (Louizos et al. 2018), one ``log_alpha`` per mask entry, ``beta = 2/3``,
stretch ``(l, r) = (-0.1, 1.1)``::

    training:  u ~ U(0, 1),  s = sigmoid((log u - log(1 - u) + log_alpha) / beta),  z = clamp(s (r - l) + l, 0, 1)
    P(z != 0) = sigmoid(log_alpha - beta log(-l / r))
    evaluation: z = sigmoid(0.8 log_alpha / beta), with the round(n - sum P) smallest of each group set to 0
                (groups: the hidden vector, each layer's heads, each layer's units, each layer's mha / ffn)

**Noise under data parallelism**: with a ``noise_seed`` (`CLIPMasks.noise_seed`, a ``(1,)`` int64 seed the
``tinyclip_l0`` objective sets from the step's global batch) every gate's ``u`` is the counter-based uniform
of `core.rng` for that seed and the gate's stream (``"l0/visual/heads"``, ...): every rank and every
recomputation of the step (cached accumulation's replay) draws the same masks, one sample per optimizer
step as on one process. Without one, ``u`` comes from torch's global RNG.

**Masked model** (`masked_features`): every write into the residual stream is multiplied by ``hidden``
(the embeddings, each attention and MLP output), each head's output by its ``heads`` entry before the
output projection, each MLP unit by its ``intermediate`` entry, each sublayer output by its ``mha`` /
``ffn`` entry; every layer norm normalises over the kept channels (``hidden != 0``) only and leaves the
others 0.

**Penalty**: with ``P`` the keep probabilities and head size ``d_h``, the expected number of kept
weights of a tower is ``sum(P_hidden) * (4 d_h sum(P_heads * P_mha) + 2 sum(P_intermediate * P_ffn))``
out of ``L D (4 H d_h + 2 M)`` (both towers together give the expected sparsity ``s``). The target
``t(step) = t0 + (t1 - t0) min(1, step / warmup)``; the penalty is
``lambda_1 max(t - s, 0) + lambda_2 max(t - s, 0)^2`` (TinyCLIP's one-sided Lagrangian; the caller
ascends the lambdas, descends everything else).

**Pruning** (`prune`) writes a dense flowforge `CLIP` whose features equal the masked model's: the
kept channels, heads and units, with the mask values folded into the weights that write to the residual
stream. flowforge's blocks are uniform per tower, so each block gets the most heads / units any block
keeps and the others are padded with zero weights (which contribute exactly 0); blocks with neither
sublayer kept are removed. Heads keep their size (``attn_head_dim``).
"""

from __future__ import annotations

import math
import attrs
import torch
from torch import Tensor, nn

from core import rng

from .model import CLIP, TowerDims

LEFT, RIGHT, EPS, BETA, SOFT = -0.1, 1.1, 1e-6, 2.0 / 3.0, 0.8
LOG_ALPHA_RANGE = (math.log(1e-2), math.log(1e2))


class HardConcrete(nn.Module):
    """Hard-concrete gates of `shape`; `group` gates of the last axis share a deterministic budget
    (``"row"``), or the whole tensor does (``"all"``), or each gate is alone (``"each"``)."""

    def __init__(self, shape: tuple[int, ...], group: str = "row", init: float = LOG_ALPHA_RANGE[1]):
        super().__init__()
        self.log_alpha = nn.Parameter(torch.full(shape, float(init)))
        self.group = group

    def keep_probability(self) -> Tensor:
        """``P(z != 0)`` per gate (differentiable in ``log_alpha``)."""
        return torch.sigmoid(self.log_alpha - BETA * math.log(-LEFT / RIGHT))

    def sample(self, seed: Tensor | None = None, stream: str = "l0") -> Tensor:
        """Reparameterised gates in [0, 1] (exact 0 and 1 have positive probability); ``u`` keyed by
        ``seed (1,)`` and `stream` (`core.rng.uniform`) when given, else from torch's global RNG."""
        if seed is None:
            u = torch.rand_like(self.log_alpha)
        else:
            u = rng.uniform(seed.reshape(1).to(self.log_alpha.device), self.log_alpha.shape, stream)[0]
        u = u.to(self.log_alpha.dtype).clamp(EPS, 1 - EPS)
        s = torch.sigmoid((u.log() - (1 - u).log() + self.log_alpha) / BETA)
        return (s * (RIGHT - LEFT) + LEFT).clamp(0.0, 1.0)

    @torch.no_grad()
    def deterministic(self) -> Tensor:
        """Evaluation gates: soft values with the expected number of zeros of each group set to 0."""
        soft = torch.sigmoid(SOFT * self.log_alpha / BETA)
        p = self.keep_probability()
        rows = soft.reshape(1, -1) if self.group == "all" else soft.reshape(-1, 1 if self.group == "each" else
                                                                             soft.shape[-1])
        probs = p.reshape(rows.shape)
        for row, prob in zip(rows, probs):
            zeros = round(len(row) - float(prob.sum()))
            if zeros > 0:
                row[row.topk(zeros, largest=False).indices] = 0.0
        return rows.reshape(soft.shape)

    def forward(self, seed: Tensor | None = None, stream: str = "l0") -> Tensor:
        return self.sample(seed, stream) if self.training else self.deterministic()

    @torch.no_grad()
    def constrain(self) -> None:
        """Clamp ``log_alpha`` to ``[log 0.01, log 100]`` (after each optimiser step)."""
        self.log_alpha.clamp_(*LOG_ALPHA_RANGE)


class TowerMasks(nn.Module):
    """The five mask kinds of one tower of size `dims`."""

    def __init__(self, dims: TowerDims):
        super().__init__()
        self.dims = dims
        self.hidden = HardConcrete((dims.width,), "all")
        self.heads = HardConcrete((dims.depth, dims.heads), "row")
        self.intermediate = HardConcrete((dims.depth, dims.mlp_width), "row")
        self.mha = HardConcrete((dims.depth,), "each")
        self.ffn = HardConcrete((dims.depth,), "each")

    def gates(self) -> dict[str, HardConcrete]:
        return {"hidden": self.hidden, "heads": self.heads, "intermediate": self.intermediate, "mha": self.mha,
                "ffn": self.ffn}

    def forward(self, seed: Tensor | None = None, stream: str = "l0") -> dict[str, Tensor]:
        return {name: gate(seed, f"{stream}/{name}") for name, gate in self.gates().items()}

    def expected_kept(self) -> Tensor:
        """Expected kept attention and MLP weights (module docstring)."""
        p = {name: gate.keep_probability() for name, gate in self.gates().items()}
        heads = (p["heads"] * p["mha"][:, None]).sum()
        units = (p["intermediate"] * p["ffn"][:, None]).sum()
        return p["hidden"].sum() * (4 * self.dims.head_dim * heads + 2 * units)

    def full(self) -> int:
        d = self.dims
        return d.depth * d.width * (4 * d.heads * d.head_dim + 2 * d.mlp_width)


@attrs.define
class SparsitySchedule:
    """Target sparsity ``t(step) = start + (target - start) min(1, step / warmup)`` (warmup 0: target)."""

    target: float
    start: float = 0.0
    warmup: int = 0

    def __call__(self, step: int) -> float:
        if self.warmup <= 0:
            return self.target
        return self.start + (self.target - self.start) * min(1.0, step / self.warmup)


class GradientReversal(torch.autograd.Function):
    """Identity forward, negated gradient backward (the Lagrange multipliers' ascent)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return -grad


class CLIPMasks(nn.Module):
    """Masks of both towers of a CLIP of `dims`, with the Lagrange multipliers of the penalty."""

    def __init__(self, model: CLIP, schedule: SparsitySchedule, lambda_init: float = 10.0):
        super().__init__()
        self.visual = TowerMasks(model.dims.vision)
        self.text = TowerMasks(model.dims.text)
        self.schedule = schedule
        self.lambda_1 = nn.Parameter(torch.tensor(float(lambda_init)))
        self.lambda_2 = nn.Parameter(torch.tensor(float(lambda_init)))
        self.noise_seed: Tensor | None = None  # (1,) int64: the step's mask noise (module docstring)

    def tower(self, name: str) -> dict[str, Tensor]:
        """The masks of tower `name` ("visual" or "text"), drawn with `noise_seed` in training."""
        return getattr(self, name)(self.noise_seed, f"l0/{name}")

    def forward(self) -> dict[str, dict[str, Tensor]]:
        return {"visual": self.tower("visual"), "text": self.tower("text")}

    def expected_sparsity(self) -> Tensor:
        kept = self.visual.expected_kept() + self.text.expected_kept()
        return 1 - kept / (self.visual.full() + self.text.full())

    def penalty(self, step: int, ascend_lambdas: bool = False) -> tuple[Tensor, float, float]:
        """``(lambda_1 g + lambda_2 g^2, expected sparsity, target)`` with ``g = max(t - s, 0)``; with
        `ascend_lambdas` the lambdas' gradients are negated, so one descent step ascends them."""
        target, expected = self.schedule(step), self.expected_sparsity()
        gap = (target - expected).clamp(min=0.0)
        l1, l2 = self.lambda_1, self.lambda_2
        if ascend_lambdas:
            l1, l2 = GradientReversal.apply(l1), GradientReversal.apply(l2)
        return l1 * gap + l2 * gap.square(), float(expected.detach()), target

    def constrain(self) -> None:
        for tower in (self.visual, self.text):
            for gate in tower.gates().values():
                gate.constrain()
