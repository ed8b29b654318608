"""flowforge plugin family `dit`: the diffusion transformer (DiT) backbone.

Presets ``DiT-S/2`` ... ``DiT-XL/8`` (the DiT paper's models) and ``DiT-digits``
(tiny, for 8x8 images); see `plugins.dit.model`.
"""

from registry import hookimpl

FLOWFORGE_API = 1


@hookimpl
def flowforge_register(register):
    """Register this family's components."""
    register("backbone", "dit", "plugins.dit.model:make_dit", "plugins.dit.model:DiTConfig",
             doc="DiT with adaLN-Zero (presets DiT-S/2 ... DiT-XL/8); images, sequences, continuous or discrete")
