"""flowforge plugin family `unet`: guided-diffusion's ADM UNet backbone.

Presets ``cifar10`` (flow_matching's image example), ``imagenet64`` (ADM) and
``digits`` (tiny, for 8x8 images); see `plugins.unet.model`. Importers ``adm``
and ``flow_matching`` (``flowforge import adm CKPT --out RUN_DIR``, `plugins.unet.importer`).
``unet_classifier`` is the encoder half with attention pooling, the noisy classifier of
classifier guidance (`plugins.unet.classifier`).
"""

from registry import hookimpl

FLOWFORGE_API = 1


@hookimpl
def flowforge_register(register):
    """Register this family's components."""
    register("backbone", "unet", "plugins.unet.model:make_unet", "plugins.unet.model:UNetConfig",
             doc="ADM UNet of guided-diffusion (presets cifar10, imagenet64, digits); continuous or discrete images")
    register("importer", "adm", "plugins.unet.importer:make_adm", "plugins.unet.importer:ADMImportConfig",
             doc="guided-diffusion UNet state dicts (64x64_diffusion.pt, ...) with their model flags, as a run")
    register("importer", "flow_matching", "plugins.unet.importer:make_flow_matching",
             "plugins.unet.importer:FlowMatchingImportConfig",
             doc="Meta flow_matching examples/image checkpoints (continuous UNet, EMA) as a run")
    register("backbone", "unet_classifier", "plugins.unet.classifier:make_unet_classifier",
             "plugins.unet.classifier:UNetClassifierConfig",
             doc="guided-diffusion's noisy-image classifier (encoder UNet, time embedding, attention pooling)")
