"""The ``flowforge`` command: ``run``, ``plugins``, and the subcommands other modules add.

Each subcommand is a module in ``core.commands`` exposing ``NAME``, ``HELP``,
``add_arguments(parser)`` and ``main(args) -> int``; it is imported only when
it runs, so ``flowforge plugins`` starts fast. Plugins add commands with the
``flowforge_register_commands`` hook (`plugin_commands`); they are looked up only
when the command line does not name a built-in command (or asks for the list).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

#: subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("core.commands.run", "train and evaluate an experiment file"),
    "plugins": ("core.commands.plugins", "list installed plugins and their components"),
    "new-plugin": ("core.commands.new_plugin", "write a ready-to-install plugin package (component, tests, experiment)"),
    "sample": ("core.commands.sample", "draw samples from a run's checkpoint (picture, optional .npz)"),
    "eval": ("core.commands.eval", "a run's metrics over solvers, evaluation counts and guidance (table, plot)"),
    "compare": ("core.commands.compare", "compare runs: differing config keys and summaries, loss curves"),
    "export": ("core.commands.export", "write a run's model as safetensors + config (from_pretrained loads it)"),
    "import": ("core.commands.import_", "turn a published checkpoint into a run directory (an importer plugin's)"),
}


def plugin_commands() -> dict[str, object]:
    """The plugins' subcommands (`registry.Command`) by name; one that takes a built-in name is skipped, with a warning."""
    import registry

    out = {}
    for command in registry.commands():
        if command.name in COMMANDS:
            print(f"flowforge: warning: command {command.name!r} of plugin {command.plugin!r} (distribution "
                  f"{command.distribution!r}) has the name of a built-in command and was skipped", file=sys.stderr)
            continue
        out[command.name] = command
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flowforge", description="flowforge: plugin-based generative modelling")
    parser.add_argument("--version", action="version", version=f"flowforge {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = {}
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    extra = plugin_commands() if chosen not in COMMANDS else {}
    if chosen is not None and chosen not in COMMANDS and chosen not in extra:
        from registry import did_you_mean

        names = [*COMMANDS, *extra]
        print(f"flowforge: unknown command {chosen!r}{did_you_mean(chosen, names)}; "
              f"commands: {', '.join(names)}", file=sys.stderr)
        return 2
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        if name == chosen:
            module = importlib.import_module(module_name)
            module.add_arguments(p)
            modules[name] = module
    for name, command in extra.items():
        p = sub.add_parser(name, help=f"{command.help} (plugin {command.plugin})")
        if name == chosen:
            command.add_arguments(p)
            modules[name] = command
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from registry import ConfigError

    try:
        return int(modules[args.command].main(args) or 0)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("flowforge")
    except metadata.PackageNotFoundError:  # running from a source tree that is not installed
        return "(not installed)"


if __name__ == "__main__":
    sys.exit(main())
