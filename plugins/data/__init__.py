"""Data sources: toy 2D distributions and the 8x8 digits image data set."""

from registry import hookimpl

FLOWFORGE_API = 1


@hookimpl
def flowforge_register(register):
    register("data", "toy2d", "plugins.data.toy2d:Toy2D", "plugins.data.toy2d:Toy2DConfig",
             doc="2D toy distributions (checkerboard, moons, eight gaussians, two spirals)")
    register("data", "digits", "plugins.data.digits:Digits", "plugins.data.digits:DigitsConfig",
             doc="scikit-learn's 8x8 handwritten digits (1797 images, 10 classes)")
