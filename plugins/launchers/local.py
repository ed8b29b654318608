"""The `local` launcher: one process, one device."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

import attrs

from core.interfaces import Launcher
from core.validate import device_available


@attrs.define
class LocalConfig:
    """Options of the local launcher.

    Attributes:
        device: "auto" (a GPU when one is visible, else the CPU), "cpu" or "cuda".
    """

    device: Literal["auto", "cpu", "cuda"] = "auto"


class LocalLauncher(Launcher):
    """Runs ``entry(accelerator, *args)`` in this process with an `accelerate.Accelerator`."""

    def __init__(self, config: LocalConfig | None = None):
        self.config = config or LocalConfig()
        device_available(self.config.device)  # here, not in the config: a run trained on a GPU samples anywhere

    def launch(self, entry: Callable[..., Any], *args: Any, accelerator_kwargs: Mapping[str, Any]) -> Any:
        import torch
        from accelerate import Accelerator

        from .accelerate_launcher import warn_if_accelerate_started_one_process

        warn_if_accelerate_started_one_process()
        kwargs = dict(accelerator_kwargs)
        if self.config.device == "cpu" or (self.config.device == "auto" and not torch.cuda.is_available()):
            kwargs["cpu"] = True
        accelerator = Accelerator(**kwargs)
        return entry(accelerator, *args)


def make_local(config: LocalConfig | None = None) -> LocalLauncher:
    """Launcher factory for ``plugin = "local"``."""
    return LocalLauncher(config)
