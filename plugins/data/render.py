"""Pictures of examples: scatter plots for 2D points, grids for images."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, ax, path: str, title: str) -> str:
    """Title `ax`, write `fig` to ``path + ".png"`` (making its folder) and close it; the file name."""
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    out = str(path) + ".png"
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    _pyplot().close(fig)
    return out


def scatter_png(points: Tensor, path: str, title: str = "", lim: float | None = None) -> str:
    """Save a scatter plot of ``points (N, 2)`` to ``path + ".png"``."""
    pts = points.detach().float().cpu().numpy()
    fig, ax = _pyplot().subplots(figsize=(4, 4), dpi=100)
    ax.scatter(pts[:, 0], pts[:, 1], s=1.0, alpha=0.5)
    if lim is not None:
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    return _save(fig, ax, path, title)


def lonlat_png(lonlat: Tensor, path: str, title: str = "") -> str:
    """Save a longitude / latitude (equirectangular) scatter plot of ``lonlat (N, 2)`` in degrees to ``path.png``."""
    pts = lonlat.detach().float().cpu().numpy()
    fig, ax = _pyplot().subplots(figsize=(6, 3.3), dpi=100)
    ax.scatter(pts[:, 0], pts[:, 1], s=1.0, alpha=0.5)
    ax.set_xlim(-180, 180)
    ax.set_ylim(-90, 90)
    ax.set_xticks(range(-180, 181, 60))
    ax.set_yticks(range(-90, 91, 30))
    ax.set_xlabel("longitude (deg)", fontsize=8)
    ax.set_ylabel("latitude (deg)", fontsize=8)
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    return _save(fig, ax, path, title)


def image_grid(images: Tensor, value_range: tuple[float, float] = (-1.0, 1.0), nrow: int | None = None,
               upscale: int = 4, pad: int = 1) -> np.ndarray:
    """Tile ``images (N, C, H, W)`` into a uint8 array ``(rows*(H+pad)+pad, cols*(W+pad)+pad, C)``."""
    x = images.detach().float().cpu()
    lo, hi = value_range
    x = ((x - lo) / (hi - lo)).clamp(0, 1)
    if upscale > 1:
        x = x.repeat_interleave(upscale, dim=-1).repeat_interleave(upscale, dim=-2)
    n, c, h, w = x.shape
    cols = nrow or int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    grid = torch.ones(c, rows * (h + pad) + pad, cols * (w + pad) + pad) * 0.5
    for i in range(n):
        r, q = divmod(i, cols)
        grid[:, pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = x[i]
    return (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def grid_png(images: Tensor, path: str, value_range: tuple[float, float] = (-1.0, 1.0), upscale: int = 4) -> str:
    """Save ``images (N, C, H, W)`` as one PNG grid at ``path + ".png"``."""
    from PIL import Image

    arr = image_grid(images, value_range, upscale=upscale)
    out = str(path) + ".png"
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(out)
    return out
