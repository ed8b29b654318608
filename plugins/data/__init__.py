"""Data sources: toy 2D distributions and the 8x8 digits image data set."""

from registry import hookimpl

FLOWFORGE_API = 1


@hookimpl
def flowforge_register(register):
    register("data", "toy2d", "plugins.data.toy2d:make_toy2d", "plugins.data.toy2d:Toy2DConfig",
             doc="2D toy distributions (checkerboard, moons, eight gaussians, two spirals)", default=True)
    register("data", "digits", "plugins.data.digits:make_digits", "plugins.data.digits:DigitsConfig",
             doc="scikit-learn's 8x8 handwritten digits (1797 images, 10 classes)")
    register("data", "toy2d_discrete", "plugins.data.toy2d_discrete:make_toy2d_discrete",
             "plugins.data.toy2d_discrete:Toy2DDiscreteConfig",
             doc="2D toy distributions quantised to bins (token ids per coordinate)")
    register("data", "text", "plugins.data.text:make_text", "plugins.data.text:TextConfig",
             doc="character-level text of the Python standard library's own source files")
    register("data", "cifar10", "plugins.data.cifar10:make_cifar10", "plugins.data.cifar10:Cifar10Config",
             doc="CIFAR-10 from its python pickle batches (read without executing code)")
    register("data", "imagefolder", "plugins.data.imagefolder:make_imagefolder",
             "plugins.data.imagefolder:ImageFolderConfig",
             doc="images in a class-per-folder tree, decoded by DataLoader workers")
    register("data", "npz", "plugins.data.npz:make_npz", "plugins.data.npz:NpzConfig",
             doc="arrays from a .npz file (e.g. precomputed latents), memory-mapped when uncompressed")
    register("data", "vmf_mixture", "plugins.data.vmf:make_vmf_mixture", "plugins.data.vmf:VMFMixtureConfig",
             doc="a mixture of von Mises-Fisher distributions on the sphere S^2 (unit vectors in R^3)")
    register("data", "shape_only", "plugins.data.shape:make_shape_only", "plugins.data.shape:ShapeConfig",
             doc="a data spec without examples (shape, classes): the data of a model imported by flowforge import")
