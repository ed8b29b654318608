"""Launchers: run the training entry point on one or many processes."""

from registry import hookimpl

FLOWFORGE_API = 1


@hookimpl
def flowforge_register(register):
    register("launcher", "local", "plugins.launchers.local:LocalLauncher", "plugins.launchers.local:LocalConfig",
             doc="one process on this machine (CPU or one GPU)")
