"""What one plugin contributes besides components: kinds (with their sections) and commands.

`collect` calls a plugin's three contributing hooks and returns everything it
registered, unchecked; the manager checks it against what other plugins
registered and adds it all at once, or nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import attrs

from .errors import PluginError


def _name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value.isidentifier():
        raise PluginError(f"{what} must be an identifier (letters, digits, '_'), got {value!r}")
    return value


@attrs.define
class Kind:
    """A kind of component declared by a plugin, with its experiment-file section."""

    name: str
    section: str
    many: bool
    required: bool
    needs: tuple[str, ...]
    provides: str
    doc: str | None
    plugin: str
    distribution: str


@attrs.define
class Command:
    """A ``flowforge`` subcommand declared by a plugin."""

    name: str
    help: str
    add_arguments_ref: Any
    main_ref: Any
    plugin: str
    distribution: str

    def add_arguments(self, parser: Any) -> None:
        from .manager import _resolve

        _resolve(self.add_arguments_ref)(parser)

    def main(self, args: Any) -> int:
        from .manager import _resolve

        return int(_resolve(self.main_ref)(args) or 0)


@attrs.define
class Contributions:
    """Everything one plugin registered through its hooks."""

    components: list[Any] = attrs.Factory(list)
    kinds: list[Kind] = attrs.Factory(list)
    commands: list[Command] = attrs.Factory(list)


def kind_recorder(into: list[Kind], plugin: str, distribution: str) -> Callable[..., None]:
    """The ``register_kind`` callback given to ``flowforge_register_kinds``."""

    def register_kind(name: str, section: str | None = None, *, many: bool = False, required: bool = False,
                      needs: Sequence[str] = (), provides: str | None = None, doc: str | None = None) -> None:
        if isinstance(needs, str):
            needs = (needs,)
        into.append(Kind(_name(name, "a kind's name"), _name(section or name, f"kind {name!r}: its section"),
                         bool(many), bool(required), tuple(_name(n, f"kind {name!r}: a need") for n in needs),
                         _name(provides or name, f"kind {name!r}: provides"), doc, plugin, distribution))

    return register_kind


def command_recorder(into: list[Command], plugin: str, distribution: str) -> Callable[..., None]:
    """The ``register`` callback given to ``flowforge_register_commands``."""

    def register(name: str, help: str, add_arguments: Any, main: Any) -> None:  # noqa: A002 - argparse's word
        if not isinstance(name, str) or not name or name.startswith("-") or any(c.isspace() for c in name):
            raise PluginError(f"a command name must be a word (no spaces, not starting with '-'), got {name!r}")
        into.append(Command(name, str(help), add_arguments, main, plugin, distribution))

    return register


def clashes(new: Contributions, kinds: dict[str, Kind], commands: dict[str, Command]) -> str | None:
    """What in `new` is already taken (by another plugin, or twice by this one), or None."""
    for label, items, taken, key in (("kind", new.kinds, kinds, lambda k: k.name),
                                     ("section", new.kinds, {k.section: k for k in kinds.values()},
                                      lambda k: k.section),
                                     ("command", new.commands, commands, lambda c: c.name)):
        names = [key(item) for item in items]
        for item, name in zip(items, names):
            if name in taken or names.count(name) > 1:
                other = taken[name].distribution if name in taken else item.distribution
                return (f"{label} {name!r} is declared twice: by distribution {other!r} and by distribution "
                        f"{item.distribution!r} (plugin {item.plugin!r})")
    return None
