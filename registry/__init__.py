"""flowforge's ground floor: plugin hooks, the plugin manager, component lookup and building.

Public API::

    registry.build(kind, mapping, **context)   # mapping["plugin"] names the component
    registry.configure(kind, mapping)          # (component, structured config): validate once
    registry.build_configured(kind, name, config, **context)  # build from that config
    registry.available(kind)                   # names of installed components of a kind
    registry.default_of(kind)                  # the component registered with default=True, or None
    registry.plugins()                         # loaded plugin modules and what they provide
    registry.get(kind, name)                   # the Component record (factory, config class)
    registry.temporary_plugin(obj)             # context manager, for tests
    registry.declared_kinds()                  # kinds plugins declared (flowforge_register_kinds)
    registry.commands()                        # subcommands plugins added (flowforge_register_commands)
    registry.default.hook                      # pluggy's hook relay (trainer events)
    ConfigError                                # the user-facing error type (exit status 2)

The registry is kind-agnostic: kinds are plain names.
"""

from __future__ import annotations

from typing import Any

from .convert import structure, unstructure
from .errors import ConfigError, PluginError, closest, did_you_mean, format_path
from .hookspecs import API_VERSION, hookimpl, hookspec
from .extensions import Command, Kind
from .manager import ENTRY_POINT_GROUP, ENV_VAR, MODULES_ENV_VAR, Component, PluginInfo, Registry

#: The process-wide registry used by the runner and the CLI.
default = Registry()


def build(kind: str, mapping: Any, /, **context: Any) -> Any:
    """Build a component; see `Registry.build`."""
    return default.build(kind, mapping, **context)


def build_configured(kind: str, name: str, config: Any, /, **context: Any) -> Any:
    """Build a component from its structured config (no second structuring); see `Registry.build_configured`."""
    return default.build_configured(kind, name, config, **context)


def configure(kind: str, mapping: Any) -> tuple[Component, Any]:
    """Validate a component mapping; see `Registry.configure`."""
    return default.configure(kind, mapping)


def resolved(kind: str, mapping: Any) -> dict[str, Any]:
    """A component mapping with its defaults filled in; see `Registry.resolved`."""
    return default.resolved(kind, mapping)


def default_of(kind: str) -> str | None:
    """The component of `kind` registered with ``default=True`` (used when a file leaves out the section)."""
    return default.default_of(kind)


def available(kind: str) -> list[str]:
    """Names of the installed components of `kind`."""
    return default.available(kind)


def kinds() -> list[str]:
    """Every kind some loaded plugin provides."""
    return default.kinds()


def declared_kinds() -> list[Kind]:
    """The kinds plugins declared, with their sections."""
    return default.declared_kinds()


def commands() -> list[Command]:
    """The ``flowforge`` subcommands plugins added."""
    return default.commands()


def plugins() -> list[PluginInfo]:
    """Every plugin module seen (loaded or failed) with its components."""
    return default.plugins()


def get(kind: str, name: str) -> Component:
    """The registered component `name` of `kind`."""
    return default.get(kind, name)


def temporary_plugin(plugin: Any, name: str | None = None, distribution: str = "(test)"):
    """Register a plugin object for the duration of a with-block."""
    return default.temporary_plugin(plugin, name=name, distribution=distribution)


__all__ = [
    "API_VERSION", "ENTRY_POINT_GROUP", "ENV_VAR", "MODULES_ENV_VAR", "Command", "Component", "ConfigError", "Kind",
    "PluginError", "PluginInfo", "Registry", "available", "build", "build_configured", "closest", "commands", "configure",
    "declared_kinds", "default", "default_of", "did_you_mean", "format_path", "get",
    "hookimpl", "hookspec", "kinds", "plugins", "resolved", "structure", "temporary_plugin", "unstructure",
]
