"""The plugin manager: loads entry points, collects components, builds them.

Components are keyed by ``(kind, name)``. Kinds are plain strings: the registry
knows nothing about what a scheduler or a solver is (that is `core`'s business).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata as metadata
import inspect
import os
import sys
import traceback
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import attrs
import pluggy

from . import hookspecs
from .convert import structure, unstructure
from .errors import ConfigError, PluginError, did_you_mean
from .extensions import Command, Contributions, Kind, clashes, command_recorder, kind_recorder

ENTRY_POINT_GROUP = "flowforge.plugins"
#: Comma-separated entry-point or distribution names of third-party plugins to
#: load. Unset: load all. Empty: load none beyond the first-party ones.
ENV_VAR = "FLOWFORGE_PLUGINS"
#: Comma-separated importable module names loaded as extra plugins (like PYTEST_PLUGINS):
#: for tests and for trying a plugin without packaging it. Inherited by spawned processes.
MODULES_ENV_VAR = "FLOWFORGE_PLUGIN_MODULES"
#: The distribution that ships flowforge itself; its plugins always load.
HOME_DISTRIBUTION = "flowforge"


def _resolve(ref: Any) -> Any:
    """Import a "package.module:attribute" reference; pass objects through."""
    if not isinstance(ref, str):
        return ref
    module_name, _, attr = ref.partition(":")
    obj = importlib.import_module(module_name)
    for part in filter(None, attr.split(".")):
        obj = getattr(obj, part)
    return obj


class _HookFailed(PluginError):
    """A plugin's register hook raised; none of its components were added."""


@attrs.define
class Component:
    """One registered component: what `build` needs to make it."""

    kind: str
    name: str
    factory_ref: Any
    config_ref: Any
    plugin: str
    distribution: str
    doc: str | None = None
    #: the component an experiment gets when it leaves out its kind's section (see `Registry.default_of`)
    default: bool = False

    def factory(self) -> Callable[..., Any]:
        return self._resolve(self.factory_ref, "factory")

    def config_class(self) -> type | None:
        return self._resolve(self.config_ref, "config class") if self.config_ref is not None else None

    def _resolve(self, ref: Any, what: str) -> Any:
        """`_resolve`, with a dangling reference reported as a `PluginError` naming the distribution."""
        try:
            return _resolve(ref)
        except (ImportError, AttributeError) as exc:
            raise PluginError(f"{self.kind} {self.name!r} of plugin {self.plugin!r} (distribution "
                              f"{self.distribution!r}): its {what} {ref!r} cannot be loaded: {type(exc).__name__}: "
                              f"{exc}; reinstall or fix that distribution") from exc


@attrs.define
class PluginInfo:
    """A loaded (or failed) plugin module and the components it registered."""

    name: str
    distribution: str
    version: str
    module: str
    components: list[tuple[str, str]] = attrs.Factory(list)
    error: str | None = None
    #: kinds declared with ``flowforge_register_kinds`` and commands with ``flowforge_register_commands``
    kinds: list[str] = attrs.Factory(list)
    commands: list[str] = attrs.Factory(list)


def _accepted_kwargs(fn: Callable[..., Any], context: Mapping[str, Any]) -> dict[str, Any]:
    """The subset of `context` that `fn`'s signature asks for (all of it for **kwargs)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return dict(context)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(context)
    return {k: v for k, v in context.items() if k in params}


class Registry:
    """Loads plugins and answers: what components exist, and build one from a mapping."""

    def __init__(self) -> None:
        self._pm = pluggy.PluginManager(hookspecs.PROJECT)
        for group in hookspecs.GROUPS:
            self._pm.add_hookspecs(group)
        self._components: dict[str, dict[str, Component]] = {}
        self._kinds: dict[str, Kind] = {}
        self._commands: dict[str, Command] = {}
        self._plugins: dict[str, PluginInfo] = {}
        self._loaded = False
        self._loading = False

    # -- loading -----------------------------------------------------------------
    def load(self) -> None:
        """Load every entry point of the group (once), honouring FLOWFORGE_PLUGINS.

        A plugin that fails to import, or whose register hook raises, is reported with its
        distribution and skipped; the others load. A duplicate component name raises
        `PluginError`; the registry is then not marked loaded, so a later `load` tries again
        (plugins already loaded stay, each plugin's components are added all at once or not at all).
        """
        if self._loaded or self._loading:
            return
        self._loading = True
        try:
            self._load_entry_points()
            self._load_env_modules()
            self._loaded = True
        finally:
            self._loading = False

    def _load_entry_points(self) -> None:
        selected = os.environ.get(ENV_VAR)
        allow = None if selected is None else {s.strip() for s in selected.split(",") if s.strip()}
        seen: set[tuple[str, str]] = set()
        for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            dist = ep.dist.name if ep.dist is not None else "(unknown)"
            version = ep.dist.version if ep.dist is not None else ""
            if (ep.name, ep.value) in seen:
                continue
            seen.add((ep.name, ep.value))
            if allow is not None and dist != HOME_DISTRIBUTION and ep.name not in allow and dist not in allow:
                continue
            if ep.name in self._plugins:  # loaded (or reported) by an earlier, interrupted load
                continue
            try:
                module = ep.load()
            except Exception as exc:  # noqa: BLE001 - a broken plugin must not break the others
                detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
                self._plugins[ep.name] = PluginInfo(ep.name, dist, version, ep.value, error=f"failed to import: {detail}")
                print(
                    f"flowforge: warning: plugin {ep.name!r} from distribution {dist!r} failed to import "
                    f"and was skipped ({detail}); set {ENV_VAR} to choose which plugins load",
                    file=sys.stderr,
                )
                continue
            self._add_reporting(module, ep.name, dist, version)

    def _load_env_modules(self) -> None:
        for module_name in filter(None, (m.strip() for m in os.environ.get(MODULES_ENV_VAR, "").split(","))):
            if module_name in self._plugins:
                continue
            try:
                module = importlib.import_module(module_name)
            except Exception as exc:  # noqa: BLE001
                detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
                self._plugins[module_name] = PluginInfo(module_name, f"({MODULES_ENV_VAR})", "", module_name,
                                                        error=f"failed to import: {detail}")
                print(f"flowforge: warning: plugin module {module_name!r} from {MODULES_ENV_VAR} failed to import "
                      f"({detail})", file=sys.stderr)
                continue
            self._add_reporting(module, module_name, f"({MODULES_ENV_VAR})", "")

    def _add_reporting(self, module: Any, name: str, dist: str, version: str) -> None:
        """`add_plugin`, with a raising register hook reported (naming the distribution) and skipped."""
        try:
            self.add_plugin(module, name=name, distribution=dist, version=version)
        except _HookFailed as exc:
            self._plugins[name] = PluginInfo(name, dist, version, getattr(module, "__name__", name), error=str(exc))
            print(f"flowforge: warning: {exc}; its components were skipped, set {ENV_VAR} to choose which plugins load",
                  file=sys.stderr)

    def add_plugin(self, plugin: Any, name: str | None = None, distribution: str = "(local)", version: str = "") -> PluginInfo:
        """Register a hook-implementing object (a module or any object) and its components.

        Used for entry points, and by tests to register temporary plugins.
        Raises PluginError when a component name is already taken by another plugin.
        """
        name = name or getattr(plugin, "__name__", None) or type(plugin).__name__
        module = getattr(plugin, "__name__", type(plugin).__name__)
        info = PluginInfo(name, distribution, version, module)
        wanted = getattr(plugin, "FLOWFORGE_API", hookspecs.API_VERSION)
        if wanted != hookspecs.API_VERSION:
            info.error = (
                f"refused: built for flowforge plugin API {wanted}, this flowforge provides API "
                f"{hookspecs.API_VERSION}; install a version of {distribution!r} made for API {hookspecs.API_VERSION}"
            )
            self._plugins[name] = info
            print(f"flowforge: warning: plugin {name!r} from {distribution!r} {info.error}", file=sys.stderr)
            return info
        if name in self._plugins and self._plugins[name].error is None:
            raise PluginError(f"a plugin named {name!r} is already registered (from {self._plugins[name].distribution!r})")
        self._pm.register(plugin, name=name)
        try:
            new = self._collect(plugin, name, distribution)
        except BaseException:  # nothing of this plugin is kept
            self._pm.unregister(plugin)
            raise
        for comp in new.components:
            self._components.setdefault(comp.kind, {})[comp.name] = comp
            info.components.append((comp.kind, comp.name))
        for kind in new.kinds:
            self._kinds[kind.name] = kind
            info.kinds.append(kind.name)
        for command in new.commands:
            self._commands[command.name] = command
            info.commands.append(command.name)
        self._plugins[name] = info
        return info

    def _collect(self, plugin: Any, name: str, distribution: str) -> Contributions:
        """Call `plugin`'s contributing hooks; raise PluginError when a name is already taken."""
        new = Contributions()

        def register(kind: str, comp_name: str, factory: Any, config: Any = None, doc: str | None = None, *,
                     default: bool = False) -> None:
            new.components.append(Component(kind, comp_name, factory, config, name, distribution, doc, bool(default)))

        callbacks = {"flowforge_register": {"register": register},
                     "flowforge_register_kinds": {"register_kind": kind_recorder(new.kinds, name, distribution)},
                     "flowforge_register_commands": {"register": command_recorder(new.commands, name, distribution)}}
        for hook, kwargs in callbacks.items():
            for impl in getattr(self._pm.hook, hook).get_hookimpls():
                if impl.plugin is not plugin:
                    continue
                try:
                    impl.function(**kwargs)
                except Exception as exc:  # noqa: BLE001
                    detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
                    raise _HookFailed(f"plugin {name!r} from distribution {distribution!r}: its {hook} hook "
                                      f"raised {detail}") from exc
        clash = clashes(new, self._kinds, self._commands)
        if clash:
            raise PluginError(f"{clash}; uninstall one, or set {ENV_VAR} to load only the plugins you want")
        for comp in (c for c in new.components if c.default):
            other = self._default(comp.kind) or next((c for c in new.components if c.default and c.kind == comp.kind
                                                      and c is not comp), None)
            if other is not None:
                raise PluginError(f"{comp.kind} {comp.name!r} (distribution {distribution!r}) and {other.name!r} "
                                  f"(distribution {other.distribution!r}) both declare themselves the default "
                                  f"{comp.kind}; uninstall one, or set {ENV_VAR} to load only the plugins you want")
        for comp in new.components:
            taken = self._components.get(comp.kind, {}).get(comp.name)
            if taken is not None or sum(c.kind == comp.kind and c.name == comp.name for c in new.components) > 1:
                other = taken.distribution if taken is not None else distribution
                raise PluginError(
                    f"{comp.kind} {comp.name!r} is registered twice: by distribution {other!r}"
                    f" (plugin {taken.plugin if taken else name!r}) and by distribution {distribution!r} (plugin {name!r}); "
                    f"uninstall one, or set {ENV_VAR} to load only the plugins you want"
                )
        return new

    def remove_plugin(self, name: str) -> None:
        """Unregister a plugin added with `add_plugin` and forget its components."""
        info = self._plugins.pop(name, None)
        if info is None:
            return
        plugin = self._pm.get_plugin(name)
        if plugin is not None:
            self._pm.unregister(plugin)
        for kind, comp_name in info.components:
            self._components.get(kind, {}).pop(comp_name, None)
        for kind in info.kinds:
            self._kinds.pop(kind, None)
        for command in info.commands:
            self._commands.pop(command, None)

    # -- queries -----------------------------------------------------------------
    def kinds(self) -> list[str]:
        self.load()
        return sorted(k for k, v in self._components.items() if v)

    def declared_kinds(self) -> list[Kind]:
        """The kinds plugins declared with ``flowforge_register_kinds``, in load order."""
        self.load()
        return list(self._kinds.values())

    def commands(self) -> list[Command]:
        """The subcommands plugins added with ``flowforge_register_commands``, sorted by name."""
        self.load()
        return [self._commands[name] for name in sorted(self._commands)]

    @property
    def hook(self) -> Any:
        """pluggy's hook relay (``registry.default.hook.flowforge_step_end``), plugins loaded."""
        self.load()
        return self._pm.hook

    def _default(self, kind: str) -> Component | None:
        return next((c for c in self._components.get(kind, {}).values() if c.default), None)

    def default_of(self, kind: str) -> str | None:
        """The name of the component registered with ``default=True`` for `kind`, or None."""
        self.load()
        comp = self._default(kind)
        return comp.name if comp is not None else None

    def available(self, kind: str) -> list[str]:
        """Names of the components of `kind`, sorted."""
        self.load()
        return sorted(self._components.get(kind, {}))

    def plugins(self) -> list[PluginInfo]:
        """Every plugin module seen, loaded or failed, sorted by distribution then name."""
        self.load()
        return sorted(self._plugins.values(), key=lambda p: (p.distribution != HOME_DISTRIBUTION, p.distribution, p.name))

    def get(self, kind: str, name: str) -> Component:
        """The component `name` of `kind`; ConfigError listing what exists otherwise."""
        self.load()
        comps = self._components.get(kind, {})
        if not isinstance(name, str):
            raise ConfigError(f"expected a plugin name (a string), got {name!r}", ("plugin",))
        if name not in comps:
            installed = ", ".join(sorted(comps)) or "(none installed)"
            failed = [p for p in self._plugins.values() if p.error]
            note = ""
            if failed:
                note = "; plugins that failed to load: " + ", ".join(f"{p.name} ({p.distribution})" for p in failed)
            raise ConfigError(f"unknown {kind} plugin {name!r}{did_you_mean(name, comps)}; installed: {installed}{note}", ("plugin",))
        return comps[name]

    # -- building ----------------------------------------------------------------
    def configure(self, kind: str, mapping: Mapping[str, Any]) -> tuple[Component, Any]:
        """Look up ``mapping["plugin"]`` and structure the other keys into its config class.

        Returns (component, config object or None). Raises ConfigError with key paths
        relative to `mapping`.
        """
        if not isinstance(mapping, Mapping):
            raise ConfigError(f"expected a table with a plugin key, got {mapping!r}")
        options = dict(mapping)
        if "plugin" not in options:
            names = ", ".join(self.available(kind)) or "(none installed)"
            raise ConfigError(f"missing required key 'plugin': expected the name of a {kind} plugin, one of: {names}", ("plugin",))
        comp = self.get(kind, options.pop("plugin"))
        cls = comp.config_class()
        if cls is None:
            if options:
                key = sorted(options)[0]
                raise ConfigError(f"unknown key: {kind} {comp.name!r} takes no options", (key,))
            return comp, None
        return comp, structure(options, cls)

    def resolved(self, kind: str, mapping: Mapping[str, Any]) -> dict[str, Any]:
        """The mapping with every default filled in (``plugin`` first), validated."""
        comp, config = self.configure(kind, mapping)
        out: dict[str, Any] = {"plugin": comp.name}
        if config is not None:
            out.update(unstructure(config))
        return out

    def build(self, kind: str, mapping: Mapping[str, Any], /, **context: Any) -> Any:
        """Build the component that ``mapping["plugin"]`` names, with the other keys as options.

        ``context`` keywords (e.g. ``spec=...``, ``path=...``) are passed to the
        factory when its signature names them.
        """
        comp, config = self.configure(kind, mapping)
        return self.make(comp, config, **context)

    def build_configured(self, kind: str, name: str, config: Any, /, **context: Any) -> Any:
        """Build the component `name` of `kind` from its already structured `config` (what `configure`
        returned: the config object, or None for a component without options); nothing is structured again."""
        return self.make(self.get(kind, name), config, **context)

    def make(self, comp: Component, config: Any, /, **context: Any) -> Any:
        """Call `comp`'s factory with `config` and the `context` names its signature asks for."""
        kind = comp.kind
        factory = comp.factory()
        kwargs = _accepted_kwargs(factory, context)
        try:
            return factory(**kwargs) if config is None else factory(config, **kwargs)
        except (ConfigError, KeyboardInterrupt):
            raise
        except Exception as exc:  # noqa: BLE001 - a plugin's bug, named with its distribution
            detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            raise PluginError(f"{kind} {comp.name!r} of plugin {comp.plugin!r} (distribution {comp.distribution!r}) "
                              f"failed to build: {detail}") from exc

    @contextlib.contextmanager
    def temporary_plugin(self, plugin: Any, name: str | None = None, distribution: str = "(test)") -> Iterator[PluginInfo]:
        """Register `plugin` for the duration of a with-block (for tests)."""
        self.load()
        info = self.add_plugin(plugin, name=name, distribution=distribution)
        try:
            yield info
        finally:
            self.remove_plugin(info.name)
