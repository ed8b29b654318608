"""flowforge plugin family `dit`: the diffusion transformer (DiT) backbone.

Presets ``DiT-S/2`` ... ``DiT-XL/8`` (the DiT paper's models) and ``DiT-digits``
(tiny, for 8x8 images); see `plugins.dit.model`. Importer ``dit``
(``flowforge import dit CKPT --out RUN_DIR``, `plugins.dit.importer`); diffusers exporter ``dit``
(``flowforge export RUN --diffusers OUT``, `plugins.dit.to_diffusers`).
"""

from registry import hookimpl

FLOWFORGE_API = 1


@hookimpl
def flowforge_register(register):
    """Register this family's components."""
    register("backbone", "dit", "plugins.dit.model:make_dit", "plugins.dit.model:DiTConfig",
             doc="DiT with adaLN-Zero (presets DiT-S/2 ... DiT-XL/8); images, sequences, continuous or discrete")
    register("importer", "dit", "plugins.dit.importer:make_dit", "plugins.dit.importer:DiTImportConfig",
             doc="facebookresearch/DiT checkpoints (DiT-XL-2-256x256.pt, train.py's) as a run (flowforge import dit)")
    register("diffusers_exporter", "dit", "plugins.dit.to_diffusers:make_dit",
             doc="a DiT run as a diffusers DiTTransformer2DModel folder (flowforge export RUN --diffusers OUT)")
