"""The layers of flowforge's core, bottom to top, and who may import whom.

A module of ``core`` may import modules of its own layer and of the layers
below it, never one above: ``tests/core/test_layers.py`` walks every import of
``core/``, ``registry/`` and ``plugins/`` (function-local ones included) and
fails on a wrong arrow, naming the file, the import and the rule.

=====  ===========  ==========================================================
level  layer        modules
=====  ===========  ==========================================================
0      interfaces   ``core`` (package), `core.interfaces`: the contracts
1      helpers      what plugins share: guidance and label dropout, nn and rng
                    helpers, presets, data-source helpers, option checks, device
                    choice, checkpoint and npz files, signals and run outcomes,
                    process-group collectives (sharded metrics gather with
                    them), the conformance kit ``core.testing``
2      config       experiment files: schema, validation, option docs, smoke caps
3      build        components built once, in dependency order (`Components`)
4      engine       the trainer loop, optimizer and LR, EMA, events, evaluation
                    and generation, progress, the run directory
5      run          the runner, the public run loader, pretrained folders,
                    published checkpoints imported as runs
6      cli          the ``flowforge`` command and its subcommands, templates
=====  ===========  ==========================================================

``registry`` is below all of them and imports nothing of ``core`` or
``plugins``. A plugin package (``plugins/<family>/``, or any third-party one)
imports ``registry``, the ``interfaces`` and ``helpers`` layers and the public
run loader `core.runs` (`PLUGIN_PUBLIC`) — never the engine, the runner or the
CLI, and never another plugin package: components of another family are
reached through the registry (``registry.build(kind, mapping)``).
"""

from __future__ import annotations

import attrs


@attrs.frozen
class Layer:
    """One layer: its name, its level (0 is the bottom) and the modules (or packages) it holds."""

    name: str
    level: int
    modules: tuple[str, ...]
    doc: str


LAYERS: tuple[Layer, ...] = (
    Layer("interfaces", 0, ("core", "core.interfaces"), "the contracts every plugin implements"),
    Layer("helpers", 1, ("core.guidance", "core.nn", "core.rng", "core.data", "core.validate", "core.device",
                         "core.checkpoint", "core.npzfile", "core.signals", "core.errors", "core.layers",
                         "core.presets", "core.collectives", "core.testing"),
          "what plugins share: label dropout and guidance, nn and rng helpers, data-source helpers, option "
          "checks, device choice, checkpoint and npz files, signals and run outcomes, process-group collectives "
          "(metrics shard and gather with them), the conformance kit"),
    Layer("config", 2, ("core.config", "core.options", "core.smoke"),
          "experiment files: schema, validation, option documentation, smoke caps"),
    Layer("build", 3, ("core.build",), "components built once, in dependency order"),
    Layer("engine", 4, ("core.trainer", "core.optim", "core.ema", "core.posthoc_ema", "core.events", "core.generate",
                        "core.progress", "core.rundir"),
          "the trainer loop, optimizer and LR, EMA, trainer events, evaluation and generation, "
          "progress, the run directory"),
    Layer("run", 5, ("core.run", "core.runs", "core.pretrained", "core.importing"),
          "the runner, the public run loader, pretrained folders, imported checkpoints"),
    Layer("cli", 6, ("core.cli", "core.commands", "core.templates"), "the flowforge command and its subcommands"),
)

#: Layers a plugin may import (with `registry` and `PLUGIN_PUBLIC`).
PLUGIN_LAYERS = ("interfaces", "helpers")
#: Modules above those layers that are public API for plugins: the run loader (load a trained run,
#: read its summary, train an experiment from a plugin's tool).
PLUGIN_PUBLIC = ("core.runs",)


def layer_of(module: str) -> Layer | None:
    """The layer holding `module` (the longest matching module or package name), or None."""
    best: tuple[int, Layer] | None = None
    for layer in LAYERS:
        for name in layer.modules:
            inside = module.startswith(name + ".") and name != "core"  # the package "core" is itself only
            if (module == name or inside) and (best is None or len(name) > best[0]):
                best = (len(name), layer)
    return best[1] if best else None


def plugin_may_import(module: str) -> bool:
    """Whether a plugin may import the ``core`` module `module`."""
    layer = layer_of(module)
    return module in PLUGIN_PUBLIC or (layer is not None and layer.name in PLUGIN_LAYERS)
