"""flowforge core: interfaces, configuration, the runner, the trainer and the plugin test kit.

Importing ``core`` is light; submodules import torch when used.
"""

__version__ = "0.1.0"
