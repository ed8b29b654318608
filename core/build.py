"""Building an experiment's components, in dependency order, through the registry.

Each section is a build step that needs some names of the build context and
provides others. flowforge's own steps and what they offer their factories:

====================  ==================================  =======================
step                  context offered                      provides
====================  ==================================  =======================
``[data]``            (none)                               ``data``, ``spec``
``[scheduler]``       ``spec``                             ``scheduler``
``[path]``            ``spec``, ``scheduler``              ``path``
``[backbone]``        ``spec``                             ``model``
``[objective]``       ``spec``, ``scheduler``, ``path``    ``objective``
``[solver]``          ``spec``, ``scheduler``, ``path``    ``solver``
``[[metrics]]``       ``spec``, ``data``, ``scheduler``,   ``metrics``
                      ``path``
====================  ==================================  =======================

A section of a plugin-declared kind (`registry.Kind`) is offered the names it
``needs`` and provides its ``provides`` name (None when the section is absent;
a list for a ``[[list]]`` section). Every built-in factory is also offered each
name a plugin kind provides, and one whose signature names it is built after it.
A step runs as soon as what it needs is built; built-in steps keep their order.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
import torch
from torch import nn

import registry
from registry import ConfigError, did_you_mean

from . import validate
from .config import Experiment, declared_kinds, metric_names
from .data import derive_seed
from .interfaces import DataSource, DataSpec, Objective, Path, Solver


@attrs.define
class Components:
    """Everything built from an experiment file (the runner's working set)."""

    spec: DataSpec
    data: DataSource
    model: nn.Module
    objective: Objective
    scheduler: Any = None
    path: Path | None = None
    solver: Solver | None = None
    metrics: dict[str, Any] = attrs.Factory(dict)
    #: components of plugin-declared kinds, by the name they provide
    extras: dict[str, Any] = attrs.Factory(dict)

    @property
    def can_generate(self) -> bool:
        return self.solver is not None and self.path is not None


@attrs.define
class Step:
    """One section to build: the context names it needs, and a function of the context returning what it provides."""

    section: str
    needs: tuple[str, ...]
    make: Callable[[dict[str, Any]], dict[str, Any]]


def build(kind: str, section: str, mapping: Mapping[str, Any], file: str | None, *,
          configs: Mapping[str, Any] | None = None, **context: Any) -> Any:
    """`registry.build`, with errors located at `section` of `file`.

    When `configs` (an `Experiment.configs`) holds `section`, the component is built from that
    config object, structured once by `core.config.resolve`: nothing is validated a second time.
    """
    try:
        if configs is not None and section in configs:
            return registry.build_configured(kind, mapping["plugin"], configs[section], **context)
        return registry.build(kind, mapping, **context)
    except ConfigError as exc:
        raise exc.within(section, file=file) from None


def asks_for(kind: str, mappings: Sequence[Mapping[str, Any]], names: Sequence[str]) -> tuple[str, ...]:
    """The `names` that the factory of any of `mappings` (components of `kind`) names in its signature."""
    asked: list[str] = []
    for mapping in mappings:
        try:
            params = inspect.signature(registry.get(kind, mapping["plugin"]).factory()).parameters
        except (TypeError, ValueError):
            continue
        asked += [n for n in names if n in params and n not in asked]
    return tuple(asked)


def _builtin_steps(exp: Experiment, offered: Sequence[str]) -> list[Step]:
    """flowforge's own sections as steps (see the module docstring); `offered`: the plugin kinds' names."""
    sections, file = exp.components, exp.file

    def ctx(c: dict[str, Any], *names: str) -> dict[str, Any]:
        return {n: c[n] for n in (*names, *offered) if n in c}

    def optional(section: str, *names: str) -> Step:
        def make(c: dict[str, Any]) -> dict[str, Any]:
            if section not in sections:
                return {section: None}
            return {section: build(section, section, sections[section], file, configs=exp.configs, **ctx(c, *names))}
        return Step(section, (*names, *_asked(section, [sections.get(section)])), make)

    def _asked(kind: str, mappings: list[Any]) -> tuple[str, ...]:
        return asks_for(kind, [m for m in mappings if m], offered)

    def data(c: dict[str, Any]) -> dict[str, Any]:
        source = build("data", "data", sections["data"], file, configs=exp.configs, **ctx(c))
        validate.conditioning({"eval": registry.unstructure(exp.eval), **{k: v for k, v in sections.items() if k != "data"},
                               **{f"metrics[{i}]": m for i, m in enumerate(exp.metrics)}}, source.spec.num_classes, file)
        return {"data": source, "spec": source.spec}

    def backbone(c: dict[str, Any]) -> dict[str, Any]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(exp.experiment.seed, "init"))
            model = build("backbone", "backbone", sections["backbone"], file, configs=exp.configs, **ctx(c, "spec"))
        if not isinstance(model, nn.Module):
            raise TypeError(f"backbone plugin {sections['backbone']['plugin']!r} returned {type(model).__name__}, "
                            f"not an nn.Module")
        return {"model": model}

    def metrics(c: dict[str, Any]) -> dict[str, Any]:
        return {"metrics": {name: build("metric", f"metrics[{i}]", entry, file, configs=exp.configs,
                                        **ctx(c, "spec", "data", "scheduler", "path", "objective"))
                            for i, (name, entry) in enumerate(zip(metric_names(exp.metrics), exp.metrics))}}

    return [Step("data", _asked("data", [sections["data"]]), data), optional("scheduler", "spec"),
            optional("path", "spec", "scheduler"),
            Step("backbone", ("spec", *_asked("backbone", [sections["backbone"]])), backbone),
            optional("objective", "spec", "scheduler", "path"), optional("solver", "spec", "scheduler", "path"),
            Step("metrics", ("spec", "data", "scheduler", "path", "objective", *_asked("metric", exp.metrics)), metrics)]


def _kind_step(exp: Experiment, kind: registry.Kind) -> Step:
    """The step of a plugin-declared kind's section."""
    def make(c: dict[str, Any]) -> dict[str, Any]:
        offered = {n: c[n] for n in kind.needs}
        if kind.many:
            entries = exp.lists.get(kind.section, [])
            return {kind.provides: [build(kind.name, f"{kind.section}[{i}]", e, exp.file, configs=exp.configs,
                                          **offered) for i, e in enumerate(entries)]}
        mapping = exp.components.get(kind.section)
        if mapping is None:
            return {kind.provides: None}
        return {kind.provides: build(kind.name, kind.section, mapping, exp.file, configs=exp.configs, **offered)}

    present = kind.section in exp.components or bool(exp.lists.get(kind.section))
    return Step(kind.section, kind.needs if present else (), make)


def run_steps(steps: Sequence[Step], file: str | None = None) -> dict[str, Any]:
    """Run every step once its needs are built (the first ready one in order); return the context."""
    context: dict[str, Any] = {}
    pending = list(steps)
    while pending:
        ready = next((s for s in pending if all(n in context for n in s.needs)), None)
        if ready is None:
            stuck = pending[0]
            missing = [n for n in stuck.needs if n not in context]
            known = [*context, *(s.section for s in pending)]
            later = [s.section for s in pending if s is not stuck]
            raise ConfigError(f"cannot be built: it needs {', '.join(map(repr, missing))}"
                              f"{did_you_mean(missing[0], known)}, which "
                              + (f"waits on [{'], ['.join(later)}] (a cycle)" if later else "nothing provides"),
                              (stuck.section,), file)
        context.update(ready.make(context))
        pending.remove(ready)
    return context


def build_components(exp: Experiment) -> Components:
    """Build every component of `exp` through the registry (model initialised from the seed)."""
    kinds = declared_kinds()
    offered = [k.provides for k in kinds]
    c = run_steps([*_builtin_steps(exp, offered), *(_kind_step(exp, k) for k in kinds)], exp.file)
    return Components(spec=c["spec"], data=c["data"], model=c["model"], objective=c["objective"],
                      scheduler=c["scheduler"], path=c["path"], solver=c["solver"], metrics=c["metrics"],
                      extras={name: c[name] for name in offered})
