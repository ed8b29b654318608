"""Samplers of training steps (guided-diffusion's ``resample.py``).

A sampler draws steps ``k (B,)`` with probabilities ``p_k`` and returns the
importance weights ``1 / (T p_k)``; the objective multiplies each example's
loss by its weight, so the weighted loss is an unbiased estimate of the
uniform-step loss.

* ``uniform``: ``p_k = 1 / T`` (weights 1).
* ``loss-second-moment``: keeps the last ``history_per_term`` losses of every
  step; until every step has a full history (warm-up) it samples uniformly,
  then ``p_k ∝ sqrt(mean(history_k^2))`` mixed with the uniform distribution:
  ``p = (1 - uniform_prob) p + uniform_prob / T``. Every process feeds the
  history with the losses of all processes (``torch.distributed.all_gather``
  when a process group is initialised), in rank order, so the histories and
  hence the sampling distributions are identical on every rank. The history is
  part of `state_dict` (checkpointed with the objective).

Draws are per example through `core.rng` when the objective passes the batch's
draws (training batches carry seeds), else torch's global RNG.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from core import rng
from registry import ConfigError


class ScheduleSampler:
    """Uniform step sampling; subclasses change `weights` and learn from losses."""

    def __init__(self, num_timesteps: int):
        self.num_timesteps = num_timesteps

    def weights(self) -> np.ndarray | None:
        """Unnormalised sampling weights ``(T,)`` (float64), or None for uniform."""
        return None

    def sample(self, batch: int, device: torch.device | str,
               draw: rng.ExampleRandom | None = None) -> tuple[Tensor, Tensor]:
        """(steps ``(B,)`` LongTensor, importance weights ``(B,)`` float32), both on `device`.

        With `draw` (a batch's `core.rng.for_batch`) each example's step comes from its own
        uniform (stream ``"timestep"``; inverse CDF ``k = #{j : P_j <= u}``, ``P`` the cumulative
        probabilities), else from torch's global RNG.
        """
        w = self.weights()
        if w is None:
            k = (torch.randint(self.num_timesteps, (batch,), device=device) if draw is None
                 else draw.randint(0, self.num_timesteps, (), "timestep", device=device))
            return k, torch.ones(batch, device=device)
        p = torch.from_numpy(w / w.sum())
        if draw is None:
            k = torch.multinomial(p, batch, replacement=True)
        else:
            u = draw.rand((), "timestep", dtype=torch.float64).cpu()
            k = torch.searchsorted(torch.cumsum(p, 0), u, right=True).clamp_(max=len(p) - 1)
        weights = 1.0 / (len(p) * p[k])
        return k.to(device), weights.float().to(device)

    def update_with_local_losses(self, k: Tensor, losses: Tensor) -> None:
        """Record this process's per-example losses at steps `k` (no-op for uniform sampling)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


class LossSecondMomentResampler(ScheduleSampler):
    """Importance sampling by the root mean square of each step's recent losses (see the module docstring)."""

    def __init__(self, num_timesteps: int, history_per_term: int = 10, uniform_prob: float = 1e-3):
        super().__init__(num_timesteps)
        self.history_per_term, self.uniform_prob = history_per_term, uniform_prob
        self.loss_history = np.zeros((num_timesteps, history_per_term), dtype=np.float64)
        self.loss_counts = np.zeros(num_timesteps, dtype=np.int64)

    def warmed_up(self) -> bool:
        return bool((self.loss_counts == self.history_per_term).all())

    def weights(self) -> np.ndarray | None:
        if not self.warmed_up():
            return None
        w = np.sqrt(np.mean(self.loss_history ** 2, axis=-1))
        w = w / w.sum()
        return w * (1.0 - self.uniform_prob) + self.uniform_prob / len(w)

    def update_with_local_losses(self, k: Tensor, losses: Tensor) -> None:
        k, losses = k.detach().reshape(-1), losses.detach().reshape(-1)
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            k, losses = _all_gather_ragged(k), _all_gather_ragged(losses)
        self.update_with_all_losses(k.cpu().tolist(), losses.double().cpu().tolist())

    def update_with_all_losses(self, ks: list[int], losses: list[float]) -> None:
        """Append each loss to its step's history (the oldest one is shifted out when full), in order."""
        hist, counts, full = self.loss_history, self.loss_counts, self.history_per_term
        for k, loss in zip(ks, losses):
            if counts[k] == full:
                hist[k, :-1] = hist[k, 1:]
                hist[k, -1] = loss
            else:
                hist[k, counts[k]] = loss
                counts[k] += 1

    def state_dict(self) -> dict[str, Any]:
        return {"loss_history": torch.from_numpy(self.loss_history.copy()),
                "loss_counts": torch.from_numpy(self.loss_counts.copy())}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not state:
            return
        hist = torch.as_tensor(state["loss_history"], dtype=torch.float64).numpy()
        counts = torch.as_tensor(state["loss_counts"], dtype=torch.int64).numpy()
        if hist.shape != self.loss_history.shape or counts.shape != self.loss_counts.shape:
            raise ConfigError(f"the checkpointed loss history has shape {hist.shape} but this objective keeps "
                              f"{self.loss_history.shape} (diffusion steps x history_per_term)")
        self.loss_history, self.loss_counts = hist.copy(), counts.copy()


def _all_gather_ragged(local: Tensor) -> Tensor:
    """Concatenate every rank's 1-D `local` (sizes may differ), in rank order."""
    dist = torch.distributed
    world = dist.get_world_size()
    size = torch.tensor([local.numel()], dtype=torch.long, device=local.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    counts = [int(s.item()) for s in sizes]
    padded = torch.zeros(max(counts), dtype=local.dtype, device=local.device)
    padded[:local.numel()] = local
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, counts)])


def create_schedule_sampler(name: str, num_timesteps: int, history_per_term: int = 10,
                            uniform_prob: float = 1e-3) -> ScheduleSampler:
    """``"uniform"`` or ``"loss-second-moment"`` (guided-diffusion's names)."""
    if name == "uniform":
        return ScheduleSampler(num_timesteps)
    if name == "loss-second-moment":
        return LossSecondMomentResampler(num_timesteps, history_per_term, uniform_prob)
    raise ValueError(f"unknown schedule sampler {name!r}; expected 'uniform' or 'loss-second-moment'")
