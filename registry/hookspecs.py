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

Hooks are grouped by what they contribute; every hookspec here is documented
in docs/plugins.md (a test checks it).
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
            register: ``register(kind, name, factory, config=None, doc=None)``.

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
        """
