"""The hooks a flowforge plugin implements.

A plugin is a module (named by an entry point in the group `flowforge.plugins`)
that implements one or more of these hooks with the `hookimpl` marker::

    from registry import hookimpl

    FLOWFORGE_API = 1          # the plugin API major version this plugin targets

    @hookimpl
    def flowforge_register(register):
        register("scheduler", "my_schedule", "my_pkg.schedules:make", "my_pkg.schedules:MyConfig")

Hook modules should import nothing heavy: factories and config classes may be
given as "module:attribute" strings and are imported only when a component is
built (so `flowforge plugins` starts fast).

Hooks are grouped by what they contribute (like pytest's hookspecs):

- `ComponentHooks`: components, and new kinds of component with their sections;
- `TrainerHooks`: events of a training run (called on the main process only);
- `CommandHooks`: subcommands of the ``flowforge`` command.

Every hookspec here is documented in docs/plugins.md (a test checks it).
"""

from __future__ import annotations

import pluggy

PROJECT = "flowforge"
#: Major version of the plugin API. A plugin module may declare
#: ``FLOWFORGE_API = <int>``; a different major version is refused at load time.
API_VERSION = 1

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class ComponentHooks:
    """Hooks that contribute components (schedulers, paths, solvers, backbones, ...)."""

    @hookspec
    def flowforge_register(self, register):
        """Register this plugin's components.

        Args:
            register: ``register(kind, name, factory, config=None, doc=None, *, default=False)``.

                - ``kind``: the interface, e.g. ``"scheduler"``, ``"path"``, ``"solver"``,
                  ``"backbone"``, ``"objective"``, ``"launcher"``, ``"data"``, ``"metric"``.
                - ``name``: what experiment files write as ``plugin = "name"``.
                - ``factory``: a callable (or ``"module:attr"`` string) called as
                  ``factory(config, **context)``; it receives only the context
                  keywords its signature names (like pytest fixtures).
                - ``config``: an attrs class (or ``"module:attr"``) holding the
                  component's options; ``None`` for a component without options,
                  in which case the factory is called without ``config``.
                - ``doc``: one line shown by ``flowforge plugins``.
                - ``default``: this component is what an experiment gets when it leaves out the
                  kind's section (flowforge's ``local`` launcher declares itself so); at most one
                  component of a kind may.
        """

    @hookspec
    def flowforge_register_kinds(self, register_kind):
        """Declare new kinds of component, each with its experiment-file section.

        Args:
            register_kind: ``register_kind(name, section=None, *, many=False, required=False,
                needs=(), provides=None, doc=None)``.

                - ``name``: the kind, as ``flowforge_register`` writes it.
                - ``section``: the TOML section (default: ``name``).
                - ``many``: a list of tables ``[[section]]`` rather than one table ``[section]``.
                - ``required``: whether every experiment must have the section.
                - ``needs``: names of the build-context entries the factory needs
                  (``"spec"``, ``"data"``, ``"scheduler"``, ``"path"``, ``"model"``, ... or
                  what another kind provides); the component is built after them.
                - ``provides``: the context name the built component is offered under
                  (default: ``name``); a list of the built components when ``many``.
                - ``doc``: one line shown by ``flowforge plugins``.
                - ``default``: this component is what an experiment gets when it leaves out the
                  kind's section (flowforge's ``local`` launcher declares itself so); at most one
                  component of a kind may.
        """


class TrainerHooks:
    """Events of a training run; called on the main process (global rank 0) only."""

    @hookspec
    def flowforge_run_start(self, trainer):
        """The run begins: components built, a checkpoint restored when resuming (``trainer.step``)."""

    @hookspec
    def flowforge_step_end(self, trainer, step, logs):
        """An optimizer step is done; ``step`` counts the steps done, ``logs`` is the objective's dict."""

    @hookspec
    def flowforge_evaluated(self, trainer, step, results):
        """The metrics were evaluated at ``step`` (periodic and final): ``results`` maps names to floats."""

    @hookspec
    def flowforge_checkpoint_written(self, trainer, step, path):
        """A checkpoint of ``step`` was written to ``path`` (a `pathlib.Path`)."""

    @hookspec
    def flowforge_run_end(self, trainer, summary):
        """The run is done; ``summary`` is what summary.json holds."""


class CommandHooks:
    """Subcommands of the ``flowforge`` command."""

    @hookspec
    def flowforge_register_commands(self, register):
        """Add subcommands to ``flowforge``.

        Args:
            register: ``register(name, help, add_arguments, main)``: ``add_arguments(parser)``
                adds the command's arguments to its argparse parser; ``main(args) -> int``
                runs it (its return value is the exit status). Both may be callables or
                ``"module:attribute"`` strings (imported only when the command runs).
        """

#: Every group of hooks, in the order docs/plugins.md presents them.
GROUPS = (ComponentHooks, TrainerHooks, CommandHooks)
