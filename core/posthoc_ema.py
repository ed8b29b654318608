"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion
Models", EDM2, section 3 and appendix C).

**Power-function EMA.** With exponent ``gamma`` the average after update ``n = 1, 2, ...`` is

    ema_n = beta_n ema_{n-1} + (1 - beta_n) theta_n,      beta_n = (1 - 1/n)^(gamma + 1),

which telescopes to ``ema_n = sum_{j <= n} w_j theta_j`` with ``w_j = (j^(g+1) - (j-1)^(g+1)) / n^(g+1)``:
the profile ``p(tau) = (g + 1) tau^g / n^(g+1)`` on ``[0, n]`` integrated over each unit cell. Its width
relative to its length is ``sigma_rel = sqrt((g + 1) / ((g + 2)^2 (g + 3)))`` (`sigma_rel_to_gamma`
inverts it: the largest real root of ``g^3 + 7 g^2 + (16 - s^-2) g + 12 - s^-2``).

**Reconstruction.** Snapshots ``ema_i`` of profiles ``p_i`` (exponent ``g_i`` at update ``n_i``) are
combined as ``sum_i c_i ema_i`` to approximate the profile ``q`` of another ``(g, n)`` in the least
squares sense, ``A c = b`` with ``A_ij = <p_i, p_j>``, ``b_i = <p_i, q>`` and (paper, eq. 27)

    <p_a, p_b> = (g_a + 1)(g_b + 1) / ((g_a + g_b + 1) max(n_a, n_b)) * (n_a / n_b)^(g_b if n_a < n_b else -g_a).

`PowerEMA` keeps one average per ``sigma_rel`` during training; `reconstruct` combines stored
snapshots. The solve is in float64.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn


def gamma_to_sigma_rel(gamma: float) -> float:
    """``sigma_rel`` of the power profile with exponent `gamma` (> -1)."""
    return float(((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))) ** 0.5)


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent whose profile has relative width `sigma_rel` (0 < sigma_rel < sqrt(1/12) ~ 0.289)."""
    if not 0.0 < sigma_rel < 12 ** -0.5:
        raise ValueError(f"sigma_rel must be in (0, {12 ** -0.5:.4f}), got {sigma_rel}")
    lo, hi = -1.0 + 1e-12, 1.0
    while gamma_to_sigma_rel(hi) > sigma_rel:
        hi *= 2.0
    for _ in range(200):  # sigma_rel decreases monotonically in gamma
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if gamma_to_sigma_rel(mid) > sigma_rel else (lo, mid)
    return 0.5 * (lo + hi)


def power_beta(gamma: float, n: int) -> float:
    """``beta_n = (1 - 1/n)^(gamma + 1)`` of the ``n``-th update (``n >= 1``; 0 at the first: a copy)."""
    return (1.0 - 1.0 / n) ** (gamma + 1.0)


def profile_inner(g_a: Tensor, n_a: Tensor, g_b: Tensor, n_b: Tensor) -> Tensor:
    """``<p_a, p_b>`` of power profiles (broadcasting, float64); see the module docstring."""
    g_a, n_a, g_b, n_b = (torch.as_tensor(v, dtype=torch.float64) for v in (g_a, n_a, g_b, n_b))
    exponent = torch.where(n_a < n_b, g_b, -g_a)
    return (g_a + 1) * (g_b + 1) / ((g_a + g_b + 1) * torch.maximum(n_a, n_b)) * (n_a / n_b) ** exponent


def solve_coefficients(gammas: Sequence[float], steps: Sequence[int], gamma: float, step: int) -> Tensor:
    """Least-squares coefficients ``(K,)`` of snapshots with exponents `gammas` at updates `steps` for
    the profile ``(gamma, step)``."""
    g, n = torch.tensor(gammas, dtype=torch.float64), torch.tensor(steps, dtype=torch.float64)
    a = profile_inner(g[:, None], n[:, None], g[None, :], n[None, :])
    b = profile_inner(g, n, torch.tensor(float(gamma)), torch.tensor(float(step)))
    return torch.linalg.lstsq(a, b[:, None], driver="gelsd").solution[:, 0]


def reconstruct(snapshots: Sequence[tuple[float, int, Mapping[str, Tensor]]], sigma_rel: float,
                step: int | None = None) -> dict[str, Tensor]:
    """The state dict of the EMA with `sigma_rel` at update `step` (default: the last snapshot's).

    Args:
        snapshots: ``(gamma, n, state_dict)`` per stored snapshot.
    Floating-point entries are combined in float64 and cast back; the others are the last snapshot's.
    """
    step = step if step is not None else max(n for _, n, _ in snapshots)
    coef = solve_coefficients([g for g, _, _ in snapshots], [n for _, n, _ in snapshots],
                              sigma_rel_to_gamma(sigma_rel), step)
    last = max(snapshots, key=lambda s: s[1])[2]
    out = {}
    for key, value in last.items():
        if value.dtype.is_floating_point:
            total = sum(c * s[2][key].to(torch.float64) for c, s in zip(coef.tolist(), snapshots))
            out[key] = total.to(value.dtype)
        else:
            out[key] = value.clone()
    return out


class PowerEMA:
    """Power-function EMAs of `model`, one per ``sigma_rel``; `update` after each optimizer step."""

    def __init__(self, model: nn.Module, sigma_rels: Sequence[float]):
        self.sigma_rels = [float(s) for s in sigma_rels]
        self.gammas = [sigma_rel_to_gamma(s) for s in self.sigma_rels]
        self.models = [copy.deepcopy(model).eval().requires_grad_(False) for _ in self.sigma_rels]

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Fold in `model`'s weights after optimizer step `step` (0-based: update ``n = step + 1``)."""
        source = [p for p in model.parameters() if p.dtype.is_floating_point]
        for gamma, ema in zip(self.gammas, self.models):
            params = [p for p in ema.parameters() if p.dtype.is_floating_point]
            torch._foreach_lerp_(params, source, 1.0 - power_beta(gamma, step + 1))
            for b_ema, b in zip(ema.buffers(), model.buffers()):
                b_ema.copy_(b)

    def snapshots(self, step: int) -> list[tuple[float, int, dict[str, Tensor]]]:
        """``(gamma, n, state_dict)`` of every average after optimizer step `step` (copies on the CPU)."""
        return [(g, step + 1, {k: v.detach().cpu().clone() for k, v in ema.state_dict().items()})
                for g, ema in zip(self.gammas, self.models)]

    def state_dict(self) -> dict[str, dict[str, Tensor]]:
        return {str(s): ema.state_dict() for s, ema in zip(self.sigma_rels, self.models)}

    def load_state_dict(self, state: Mapping[str, Mapping[str, Tensor]]) -> None:
        for s, ema in zip(self.sigma_rels, self.models):
            ema.load_state_dict(state[str(s)])


SNAPSHOT = "ema-sigma{sigma:.4f}-n{n:09d}.pt"
_SNAPSHOT_RE = re.compile(r"ema-sigma([0-9.]+)-n(\d+)\.pt$")


def after_step(power: PowerEMA, model: nn.Module, step: int, every: int, folder: Path, write: bool) -> None:
    """Update `power` after optimizer step `step`; every `every` updates (when `write`) store its
    averages in `folder` (`SNAPSHOT` names, atomic ``torch.save`` of plain tensors)."""
    from .checkpoint import save_atomic

    power.update(model, step)
    if write and every and (step + 1) % every == 0:
        for sigma, (_, n, state) in zip(power.sigma_rels, power.snapshots(step)):
            save_atomic(state, Path(folder) / SNAPSHOT.format(sigma=sigma, n=n))


def load_snapshots(folder: str | Path, up_to: int | None = None) -> list[tuple[float, int, dict[str, Tensor]]]:
    """Every snapshot of `folder` (``weights_only`` loads) as ``(gamma, n, state_dict)``, optionally ``n <= up_to``."""
    out = []
    for path in sorted(Path(folder).glob("ema-sigma*-n*.pt")):
        match = _SNAPSHOT_RE.search(path.name)
        if match and (up_to is None or int(match.group(2)) <= up_to):
            state = torch.load(path, map_location="cpu", weights_only=True)
            out.append((sigma_rel_to_gamma(float(match.group(1))), int(match.group(2)), state))
    if not out:
        raise FileNotFoundError(f"no post-hoc EMA snapshots ({SNAPSHOT.format(sigma=0.05, n=1)} ...) in {folder}")
    return out
