"""flowforge plugin family `unet`: guided-diffusion's ADM UNet backbone.

Presets ``cifar10`` (flow_matching's image example), ``imagenet64`` (ADM) and
``digits`` (tiny, for 8x8 images); see `plugins.unet.model`. ``unet_classifier`` is the
encoder half with attention pooling, the noisy classifier of classifier guidance (`plugins.unet.classifier`).
"""

from registry import hookimpl

FLOWFORGE_API = 1


@hookimpl
def flowforge_register(register):
    """Register this family's components."""
    register("backbone", "unet", "plugins.unet.model:make_unet", "plugins.unet.model:UNetConfig",
             doc="ADM UNet of guided-diffusion (presets cifar10, imagenet64, digits); continuous or discrete images")
    register("backbone", "unet_classifier", "plugins.unet.classifier:make_unet_classifier",
             "plugins.unet.classifier:UNetClassifierConfig",
             doc="guided-diffusion's noisy-image classifier (encoder UNet, time embedding, attention pooling)")
