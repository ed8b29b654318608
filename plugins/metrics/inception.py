"""The ``inception`` feature extractor: InceptionV3's 2048-d pool3 features, the network of FID.

The architecture is the TF-ported InceptionV3 of pytorch-fid and torch-fidelity
(Heusel et al.'s FID network): torchvision's InceptionV3 layout with the FID
variants of its blocks (average pooling without the padded zeros in the A, C
and first E blocks, max pooling in the last E block), batch norm with eps 1e-3
and no convolution biases. Parameter names are torchvision's
(``Conv2d_1a_3x3.conv.weight``, ``Mixed_5b.branch1x1.bn.running_mean``, ...,
``fc.weight``), the layout of pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``.

Weights come only from a LOCAL file (``weights``, default torch-fidelity's /
pytorch-fid's file name in ``torch.hub.get_dir()/checkpoints``); nothing is
ever downloaded. The file is read with ``torch.load(weights_only=True)`` and
must match the architecture exactly.

Preprocessing (pytorch-fid's): examples ``(B, C, H, W)`` in [-1, 1] are
quantised to 8 bits, ``u = round((x + 1) * 127.5)``, grey images repeated to
three channels, resized to ``resize x resize`` (bilinear, ``align_corners=False``),
mapped to ``2 u / 255 - 1``; the features are the global average of the last
block, ``(B, 2048)``.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.interfaces import DataSpec
from core.validate import positive
from registry import ConfigError

from .features import FeatureExtractor

#: pytorch-fid's and torch-fidelity's InceptionV3 weights files (in ``torch.hub.get_dir()/checkpoints``).
WEIGHT_FILES = ("pt_inception-2015-12-05-6726825d.pth", "weights-inception-2015-12-05-6726825d.pth")


@attrs.define
class InceptionConfig:
    """Options of the inception feature extractor.

    Attributes:
        weights: the InceptionV3 weights file (default: pytorch-fid's or torch-fidelity's file in
            torch.hub.get_dir()/checkpoints); never downloaded.
        resize: the side images are resized to (299 gives FID comparable with published numbers).
        batch_size: images per forward pass.
    """

    weights: str = ""
    resize: int = 299
    batch_size: int = 128

    def __attrs_post_init__(self) -> None:
        positive(self, "resize", "batch_size")
        if self.resize < 75:
            raise ConfigError(f"InceptionV3 needs images of at least 75 x 75, got resize = {self.resize}", ("resize",))


class _Basic(nn.Module):
    """torchvision's BasicConv2d: ``conv`` (no bias) -> ``bn`` (eps 1e-3) -> ReLU."""

    def __init__(self, cin: int, cout: int, kernel, stride: int = 1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


_conv = _Basic


def _avg(x: Tensor) -> Tensor:
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class _A(nn.Module):
    def __init__(self, cin: int, pool: int):
        super().__init__()
        self.branch1x1 = _conv(cin, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = _conv(cin, 48, 1), _conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1, self.branch3x3dbl_2 = _conv(cin, 64, 1), _conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _conv(96, 96, 3, padding=1)
        self.branch_pool = _conv(cin, pool, 1)

    def forward(self, x: Tensor) -> Tensor:
        dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)), dbl,
                          self.branch_pool(_avg(x))], 1)


class _B(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = _conv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1, self.branch3x3dbl_2 = _conv(cin, 64, 1), _conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _conv(96, 96, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), dbl, F.max_pool2d(x, 3, stride=2)], 1)


class _C(nn.Module):
    def __init__(self, cin: int, c7: int):
        super().__init__()
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        self.branch1x1 = _conv(cin, 192, 1)
        self.branch7x7_1, self.branch7x7_2, self.branch7x7_3 = _conv(cin, c7, 1), _conv(c7, c7, **row), _conv(c7, 192, **col)
        self.branch7x7dbl_1, self.branch7x7dbl_2 = _conv(cin, c7, 1), _conv(c7, c7, **col)
        self.branch7x7dbl_3, self.branch7x7dbl_4 = _conv(c7, c7, **row), _conv(c7, c7, **col)
        self.branch7x7dbl_5 = _conv(c7, 192, **row)
        self.branch_pool = _conv(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for k in range(1, 6):
            d = getattr(self, f"branch7x7dbl_{k}")(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg(x))], 1)


class _D(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = _conv(cin, 192, 1), _conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _conv(cin, 192, 1)
        self.branch7x7x3_2 = _conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _conv(192, 192, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class _E(nn.Module):
    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        row, col = dict(kernel=(1, 3), padding=(0, 1)), dict(kernel=(3, 1), padding=(1, 0))
        self.branch1x1 = _conv(cin, 320, 1)
        self.branch3x3_1, self.branch3x3_2a, self.branch3x3_2b = _conv(cin, 384, 1), _conv(384, 384, **row), _conv(384, 384, **col)
        self.branch3x3dbl_1, self.branch3x3dbl_2 = _conv(cin, 448, 1), _conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a, self.branch3x3dbl_3b = _conv(384, 384, **row), _conv(384, 384, **col)
        self.branch_pool = _conv(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pool = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3), self.branch3x3dbl_3a(d),
                          self.branch3x3dbl_3b(d), self.branch_pool(pool)], 1)


class FIDInceptionV3(nn.Module):
    """InceptionV3 up to its pool3 features: images ``(B, 3, H, W)`` in [-1, 1] (already resized) -> ``(B, 2048)``.

    ``fc`` (2048 -> 1008 classes) is kept so the published weights load exactly; it is not used.
    """

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3, self.Conv2d_2a_3x3 = _conv(3, 32, 3, stride=2), _conv(32, 32, 3)
        self.Conv2d_2b_3x3 = _conv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1, self.Conv2d_4a_3x3 = _conv(64, 80, 1), _conv(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = _A(192, 32), _A(256, 64), _A(288, 64)
        self.Mixed_6a = _B(288)
        self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e = _C(768, 128), _C(768, 160), _C(768, 160), _C(768, 192)
        self.Mixed_7a = _D(768)
        self.Mixed_7b, self.Mixed_7c = _E(1280, max_pool=False), _E(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)

    def forward(self, x: Tensor) -> Tensor:
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, stride=2)))
        x = F.max_pool2d(x, 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return x.mean(dim=(2, 3))


class _Preprocess(nn.Module):
    """[-1, 1] images ``(B, C, H, W)`` -> 8 bits -> RGB -> ``resize``^2 -> [-1, 1] -> `FIDInceptionV3`."""

    def __init__(self, net: FIDInceptionV3, resize: int):
        super().__init__()
        self.net, self.resize = net, resize

    def forward(self, x: Tensor) -> Tensor:
        u = ((x.clamp(-1, 1) + 1) * 127.5).round() / 255
        if u.shape[1] == 1:
            u = u.repeat(1, 3, 1, 1)
        if tuple(u.shape[-2:]) != (self.resize, self.resize):
            u = F.interpolate(u, size=(self.resize, self.resize), mode="bilinear", align_corners=False)
        return self.net(2 * u - 1)


def weights_file(config: InceptionConfig) -> Path:
    """The local weights file `config` names, or the first of `WEIGHT_FILES` in the hub cache; else ConfigError."""
    if config.weights:
        path = Path(config.weights).expanduser()
        if not path.is_file():
            raise ConfigError(f"InceptionV3 weights file not found: {path} (the inception extractor never downloads; "
                              f"copy the file here, or use features = \"digits_cnn\")", ("weights",))
        return path
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    for name in WEIGHT_FILES:
        if (hub / name).is_file():
            return hub / name
    raise ConfigError(
        f"the inception extractor needs InceptionV3 weights on this machine, and none were found: set weights = "
        f"\"/path/to/{WEIGHT_FILES[0]}\" (pytorch-fid's / torch-fidelity's FID weights; flowforge never downloads), "
        f"place the file in {hub}, or use features = \"digits_cnn\" (a feature network trained on this data set)",
        ("weights",))


@functools.lru_cache(maxsize=8)
def file_digest(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of a file (memoised by path, size and modification time)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_network(path: Path) -> FIDInceptionV3:
    """`FIDInceptionV3` with the state dict in `path` (``weights_only=True``, every key matched); else ConfigError."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise ConfigError(f"cannot read the InceptionV3 weights {path}: {type(exc).__name__}: {exc}", ("weights",)) from None
    net = FIDInceptionV3()
    if not isinstance(state, dict):
        raise ConfigError(f"{path} holds a {type(state).__name__}, not an InceptionV3 state dict", ("weights",))
    result = net.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ConfigError(f"{path} is not pytorch-fid's InceptionV3: missing {result.missing_keys[:3]}, "
                          f"unexpected {result.unexpected_keys[:3]} ({len(result.missing_keys)} and "
                          f"{len(result.unexpected_keys)} in all)", ("weights",))
    return net.eval().requires_grad_(False)


def make_inception(config: InceptionConfig, spec: DataSpec) -> FeatureExtractor:
    """Feature-extractor factory for ``plugin = "inception"`` (grey or RGB images only)."""
    if len(spec.shape) != 3 or spec.shape[0] not in (1, 3):
        raise ConfigError(f"the inception extractor needs grey or RGB images (C, H, W); these examples have shape "
                          f"{tuple(spec.shape)}", ("plugin",))
    path = weights_file(config)
    stat = path.stat()
    digest = file_digest(str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    body = _Preprocess(load_network(path), config.resize)
    return FeatureExtractor(body, spec, "inception", batch_size=config.batch_size,
                            identity={"weights_sha256": digest, "resize": config.resize})
