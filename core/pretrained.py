"""A trained model as a folder of safetensors + config, the way diffusers users expect.

``save_pretrained(RUN_DIR, FOLDER)`` writes

    FOLDER/config.toml        the run's resolved experiment (every default filled in)
    FOLDER/model.safetensors  the network's weights (EMA by default), plain tensors
    FOLDER/pretrained.json    which weights, the optimizer step, the source run

and ``from_pretrained(FOLDER)`` builds the experiment's components and loads the
weights (read as data: safetensors holds no code), returning the same
`core.runs.LoadedRun` as ``load_run``. ``load_run`` and therefore
``flowforge sample`` / ``flowforge eval`` accept such a folder in place of a run
directory. The folder is written to a temporary sibling and renamed, so a
reader never sees half of it.

``save_diffusers(RUN_DIR, FOLDER)`` writes the run's network in diffusers' format instead, through the
component of kind ``diffusers_exporter`` named like the run's backbone plugin (``exporter(model,
folder)``; e.g. the dit plugin's writes a ``DiTTransformer2DModel`` folder), also via a temporary sibling.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from registry import ConfigError

from .checkpoint import folder_atomic

WEIGHTS = "model.safetensors"
META = "pretrained.json"


def is_pretrained(folder: str | Path) -> bool:
    """Whether `folder` holds an exported model (config.toml and model.safetensors)."""
    folder = Path(folder)
    return (folder / WEIGHTS).is_file() and (folder / "config.toml").is_file()


def save_pretrained(run: Any, folder: str | Path, *, ema: bool = True) -> Path:
    """Export `run` (a run directory or a `core.runs.LoadedRun`) to `folder`; returns `folder`."""
    from safetensors.torch import save_file

    from .runs import LoadedRun, load_run

    loaded = run if isinstance(run, LoadedRun) else load_run(run, ema=ema, device="cpu")
    folder = Path(folder)
    if folder.exists() and not is_pretrained(folder):
        raise ConfigError(f"{folder} exists and is not an exported model; choose another folder")
    with folder_atomic(folder) as tmp:
        tensors = {k: v.detach().cpu().contiguous() for k, v in loaded.model.state_dict().items()}
        save_file(tensors, str(tmp / WEIGHTS))
        shutil.copyfile(loaded.run_dir.config, tmp / "config.toml")
        meta = {"weights": loaded.weights, "step": loaded.step, "source": str(loaded.run_dir.root),
                "experiment": loaded.name}
        (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
    return folder


#: the kind of the components that write a backbone in diffusers' format, named like the backbone plugin
DIFFUSERS_KIND = "diffusers_exporter"


def save_diffusers(run: Any, folder: str | Path, *, ema: bool = True) -> Path:
    """Write `run`'s network (EMA by default) as a diffusers model folder (see the module docstring)."""
    import registry

    from .runs import LoadedRun, load_run

    loaded = run if isinstance(run, LoadedRun) else load_run(run, ema=ema, device="cpu")
    backbone = loaded.exp.components["backbone"]["plugin"]
    if backbone not in registry.available(DIFFUSERS_KIND):
        have = ", ".join(registry.available(DIFFUSERS_KIND)) or "none"
        raise ConfigError(f"no diffusers exporter for backbone {backbone!r} (exporters for: {have})")
    folder = Path(folder)
    if folder.exists() and not (folder / "config.json").is_file():
        raise ConfigError(f"{folder} exists and is not a diffusers model folder; choose another folder")
    with folder_atomic(folder) as tmp:
        registry.build(DIFFUSERS_KIND, {"plugin": backbone})(loaded.model, tmp)
    return folder


def from_pretrained(folder: str | Path, overrides: Sequence[str] = (), *, device: str = "auto") -> Any:
    """Load an exported model (see the module docstring) as a `core.runs.LoadedRun`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .checkpoint import mismatch_detail
    from .rundir import RunDir
    from .build import build_components
    from .device import pick_device
    from .runs import LoadedRun, load_experiment

    folder = Path(folder)
    if not is_pretrained(folder):
        raise ConfigError(f"{folder} is not an exported model (needs config.toml and {WEIGHTS})")
    exp = load_experiment(folder, overrides)
    components = build_components(exp)
    try:
        tensors = load_file(str(folder / WEIGHTS))
    except (SafetensorError, OSError) as exc:
        raise ConfigError(f"{folder / WEIGHTS} is not a readable safetensors file: {exc}") from None
    try:
        components.model.load_state_dict(tensors)
    except (KeyError, RuntimeError) as exc:
        raise ConfigError(f"{folder / WEIGHTS} does not match the model of {folder / 'config.toml'}: "
                          f"{mismatch_detail(exc)}") from None
    meta = json.loads((folder / META).read_text()) if (folder / META).is_file() else {}
    dev = pick_device(device)
    model = components.model.to(dev).eval().requires_grad_(False)
    return LoadedRun(run_dir=RunDir(folder), exp=exp, components=components, model=model,
                     weights=meta.get("weights", "raw"), step=int(meta.get("step", 0)),
                     checkpoint=folder / WEIGHTS, device=dev)
