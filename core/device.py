"""Device choice for plugins and the CLI: ``"auto"`` means the first GPU when one is visible, else the CPU."""

from __future__ import annotations

import torch

from registry import ConfigError

from .validate import device_available


def pick_device(device: str = "auto", key: str = "--device") -> torch.device:
    """``"auto"``: ``cuda`` when a GPU is visible, else ``cpu``; otherwise `device` itself.

    Raises:
        ConfigError: naming `key` for a device that is not on this machine (``"cuda:3"`` with two GPUs).
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device_available(device, key)
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(f"{key} {device!r}: {exc}") from None
