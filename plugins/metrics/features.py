"""Feature extractors for feature-space sample metrics (Frechet distance, KID, precision/recall).

A feature extractor maps examples ``x (B, *spec.shape)`` (floats in [-1, 1],
or token ids for discrete data) to features ``(B, F)``. Three are offered:

* ``"trained"`` (default): a small network flowforge trains on the data
  source's own training split, the way MNIST-scale papers use a LeNet in place
  of Inception. With class labels it is a classifier (cross-entropy), without
  them an autoencoder (mean squared reconstruction error); the features are its
  penultimate layer (the code, for the autoencoder). Images ``(C, H, W)`` get a
  three-block CNN, anything else an MLP. The trained network is cached on disk
  under ``cache_dir`` (default ``$FLOWFORGE_CACHE``, else
  ``$XDG_CACHE_HOME/flowforge``, else ``~/.cache/flowforge``) in
  ``features/<key>.pt``, where the key hashes the training data it sees (a
  fingerprint of its first batches, after the input normalisation below), the
  architecture, the training options and the seed. The same data therefore
  gives the same network whatever the data source's surface options are: the
  continuous and the discrete form of the digits share one, so their Frechet
  distances are comparable. A corrupt cache file is rebuilt with a warning;
  concurrent processes take a file lock, so one trains and the others load.
* ``"inception"``: torchmetrics' InceptionV3 (the torch-fidelity port of the
  TF FID network, 2048-d pool features) from a *local* weights file: the
  ``weights`` option, or torch-fidelity's file in the torch hub cache. Needs
  ``torch-fidelity`` installed; never downloads. Images are mapped from [-1, 1]
  to uint8, grey images repeated to three channels.
* ``"raw"``: the flattened examples themselves (2D toy data, tests).

Discrete examples (token ids ``0..V-1``) are mapped to floats as
``2 v / (V - 1) - 1`` before any network sees them (``V`` without a mask token
added for the mask source), which for the digits is exactly the continuous
form ``v / 8 - 1``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import attrs
import torch
from torch import Tensor, nn

from core.interfaces import DataSource, DataSpec
from registry import ConfigError

#: Bumped whenever the architecture or training changes in a way the key does not capture.
FORMAT_VERSION = 1
#: torch-fidelity's InceptionV3 weights file name (in ``torch.hub.get_dir()/checkpoints``).
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
#: Batches of training data hashed into the cache key.
FINGERPRINT_BATCHES = 4
#: Channels of the image encoder's conv blocks; width of the vector encoder's hidden layers.
CONV_CHANNELS = (16, 32, 64)
MLP_HIDDEN = 256

FEATURE_OPTIONS_DOC = """
        feature_extractor: "trained" (a network trained on this data set and cached), "inception"
            (InceptionV3 from a local weights file) or "raw" (the flattened examples).
        weights: InceptionV3 weights file for feature_extractor = "inception" (default: torch-fidelity's
            file in the torch hub cache). Never downloaded.
        cache_dir: where trained feature networks are cached (default $FLOWFORGE_CACHE, else
            $XDG_CACHE_HOME/flowforge, else ~/.cache/flowforge).
        feature_dim: size of the trained network's feature (penultimate) layer.
        train_steps: optimizer steps of the trained feature network.
        train_batch_size: batch size of the trained feature network.
        train_lr: learning rate (AdamW) of the trained feature network.
        feature_seed: seed of the trained feature network (initialisation and batches)."""


@attrs.define
class FeatureConfig:
    feature_extractor: Literal["trained", "inception", "raw"] = "trained"
    weights: str = ""
    cache_dir: str = ""
    feature_dim: int = 128
    train_steps: int = 1000
    train_batch_size: int = 128
    train_lr: float = 1e-3
    feature_seed: int = 0

    def __attrs_post_init__(self) -> None:
        for key in ("feature_dim", "train_steps", "train_batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"expected a positive integer, got {getattr(self, key)!r}", (key,))
        if self.train_lr <= 0:
            raise ConfigError(f"expected a positive number, got {self.train_lr!r}", ("train_lr",))


FeatureConfig.__doc__ = ("Options of frechet_distance (shared by every feature-space metric).\n\n    Attributes:"
                         + FEATURE_OPTIONS_DOC)


def to_float(x: Tensor, spec: DataSpec) -> Tensor:
    """Examples as float32: token ids ``v`` of discrete data become ``2 v / (V - 1) - 1``, with ``V`` the
    data's vocabulary (without a mask token added for the mask source, ``spec.extra["mask_token"]``)."""
    if spec.kind == "discrete":
        levels = spec.vocab_size - (1 if "mask_token" in spec.extra else 0)
        return x.float() * (2.0 / max(1, levels - 1)) - 1.0
    return x.float()


def default_cache_dir() -> Path:
    """``$FLOWFORGE_CACHE``, else ``$XDG_CACHE_HOME/flowforge``, else ``~/.cache/flowforge``."""
    if os.environ.get("FLOWFORGE_CACHE"):
        return Path(os.environ["FLOWFORGE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "flowforge"


# --------------------------------------------------------------------------- extractors
class FeatureExtractor(nn.Module):
    """Maps examples ``(B, *spec.shape)`` to features ``(B, F)`` (float64, on the examples' device).

    Never leaves evaluation mode and keeps no gradients. A network runs on this process's GPU when
    there is one, in chunks of `batch_size` examples.
    """

    def __init__(self, body: nn.Module | None, spec: DataSpec, name: str, batch_size: int = 1024):
        super().__init__()
        self.body, self.spec, self.name, self.batch_size = body, spec, name, batch_size

    def train(self, mode: bool = True) -> FeatureExtractor:  # never leaves evaluation mode
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        h = to_float(x, self.spec)
        if self.body is None:
            return h.reshape(h.shape[0], -1).double()
        device = next(self.body.parameters()).device
        if device.type == "cpu" and torch.cuda.is_available():
            device = torch.device("cuda", torch.cuda.current_device())
            self.body.to(device)
        out = [self.body(chunk.to(device)).reshape(len(chunk), -1).double().to(x.device)
               for chunk in h.split(self.batch_size)]
        return torch.cat(out)


class _ConvEncoder(nn.Module):
    """Three conv blocks (16, 32, 64 channels; 2x2 max-pooling while the image is larger than 4x4),
    global average pooling, then ``Linear -> ReLU`` to ``feature_dim``."""

    def __init__(self, shape: tuple[int, ...], feature_dim: int):
        super().__init__()
        c, h, w = shape
        layers: list[nn.Module] = []
        for out in CONV_CHANNELS:
            layers += [nn.Conv2d(c, out, 3, padding=1), nn.GroupNorm(8, out), nn.SiLU()]
            if min(h, w) > 4:
                layers.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
            c = out
        self.conv = nn.Sequential(*layers)
        self.fc = nn.Sequential(nn.Linear(c, feature_dim), nn.ReLU())

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.conv(x).mean(dim=(-2, -1)))


class _MLPEncoder(nn.Module):
    """``Linear(256) -> SiLU -> Linear(256) -> SiLU -> Linear(feature_dim) -> ReLU`` on flattened examples."""

    def __init__(self, shape: tuple[int, ...], feature_dim: int):
        super().__init__()
        d = math.prod(shape)
        self.net = nn.Sequential(nn.Linear(d, MLP_HIDDEN), nn.SiLU(), nn.Linear(MLP_HIDDEN, MLP_HIDDEN), nn.SiLU(),
                                 nn.Linear(MLP_HIDDEN, feature_dim), nn.ReLU())

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.reshape(x.shape[0], -1))


class FeatureNet(nn.Module):
    """Encoder (the features) plus a head: class logits (classifier) or a reconstruction (autoencoder)."""

    def __init__(self, shape: tuple[int, ...], feature_dim: int, num_classes: int):
        super().__init__()
        self.shape, self.num_classes = tuple(shape), num_classes
        self.encoder = (_ConvEncoder if len(shape) == 3 else _MLPEncoder)(self.shape, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes if num_classes > 0 else math.prod(shape))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x))

    def loss(self, x: Tensor, y: Tensor | None) -> Tensor:
        out = self(x)
        if self.num_classes > 0:
            return nn.functional.cross_entropy(out, y)
        return (out - x.reshape(x.shape[0], -1)).pow(2).mean()


def architecture(spec: DataSpec, config: FeatureConfig, labelled: bool) -> dict[str, Any]:
    """What determines the feature network (everything but the data), as plain data for the cache key."""
    return {
        "format": FORMAT_VERSION,
        "encoder": "conv" if len(spec.shape) == 3 else "mlp",
        "widths": list(CONV_CHANNELS) if len(spec.shape) == 3 else [MLP_HIDDEN, MLP_HIDDEN],
        "shape": list(spec.shape),
        "objective": "classifier" if labelled else "autoencoder",
        "num_classes": spec.num_classes if labelled else 0,
        "feature_dim": config.feature_dim,
        "train_steps": config.train_steps,
        "train_batch_size": config.train_batch_size,
        "train_lr": config.train_lr,
        "seed": config.feature_seed,
    }


def _batches(data: DataSource, config: FeatureConfig) -> Iterator[dict[str, Tensor]]:
    from core.data import derive_seed

    seed = derive_seed(config.feature_seed, "feature-net-batches")
    for batch in data.train_batches(config.train_batch_size, seed=seed):
        out = {"x": to_float(batch["x"], data.spec)}
        if "y" in batch:
            out["y"] = batch["y"].long()
        yield out


def fingerprint(data: DataSource, config: FeatureConfig) -> tuple[str, bool]:
    """(hash of the first training batches the feature network sees, whether they carry labels)."""
    h = hashlib.blake2b(digest_size=16)
    labelled = True
    stream = _batches(data, config)
    for _ in range(FINGERPRINT_BATCHES):
        batch = next(stream)
        labelled = labelled and "y" in batch and data.spec.num_classes > 0
        for key in sorted(batch):
            t = batch[key].contiguous().cpu()
            h.update(key.encode())
            h.update(str(tuple(t.shape)).encode())
            h.update(t.numpy().tobytes())
    return h.hexdigest(), labelled


def train_feature_net(data: DataSource, config: FeatureConfig, labelled: bool) -> tuple[FeatureNet, dict[str, float]]:
    """Train the feature network on `data`'s training split (CPU, deterministic in the seed).

    Returns the network and ``{"final_loss", "held_out_accuracy" (classifier only)}``.
    """
    from core.data import derive_seed
    from core.data import generator as make_generator

    spec = data.spec
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(config.feature_seed, "feature-net-init"))
        net = FeatureNet(spec.shape, config.feature_dim, spec.num_classes if labelled else 0)
        opt = torch.optim.AdamW(net.parameters(), lr=config.train_lr, weight_decay=1e-4)
        stream = _batches(data, config)
        net.train()
        loss = torch.zeros(())
        for step in range(config.train_steps):
            batch = next(stream)
            lr = config.train_lr * 0.5 * (1 + math.cos(math.pi * step / config.train_steps))
            for group in opt.param_groups:
                group["lr"] = lr
            loss = net.loss(batch["x"], batch.get("y"))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    net.eval()
    info = {"final_loss": float(loss.detach())}
    if labelled:
        ref = data.reference(2000, make_generator(config.feature_seed, "feature-net-accuracy"))
        if "y" in ref:
            with torch.no_grad():
                pred = net(to_float(ref["x"], spec)).argmax(-1)
            info["held_out_accuracy"] = float((pred == ref["y"]).float().mean())
    return net, info


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (a no-op where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


#: In-process memo: cache file -> loaded network (several metrics of one run share one network).
_LOADED: dict[str, FeatureNet] = {}


def _try_load(file: Path, meta: dict[str, Any]) -> FeatureNet | None:
    """The cached network in `file`, or None (with a warning) when it is corrupt or does not match."""
    if not file.exists():
        return None
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or state.get("meta", {}).get("key") != meta["key"]:
            raise ValueError("its key does not match this configuration")
        arch = meta["architecture"]
        net = FeatureNet(tuple(arch["shape"]), arch["feature_dim"], arch["num_classes"])
        net.load_state_dict(state["model"])
    except Exception as exc:  # noqa: BLE001 - any failure means an unusable cache file
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        warnings.warn(f"flowforge: the cached feature network {file} is unusable ({first}); retraining it",
                      RuntimeWarning, stacklevel=3)
        return None
    return net.eval().requires_grad_(False)


def cached_feature_net(data: DataSource, config: FeatureConfig) -> tuple[FeatureNet, Path]:
    """The feature network for `data` and `config`: from memory, from the disk cache, or trained and cached."""
    from core.checkpoint import save_atomic

    digest, labelled = fingerprint(data, config)
    arch = architecture(data.spec, config, labelled)
    key = hashlib.blake2b(json.dumps({"data": digest, "arch": arch}, sort_keys=True).encode(), digest_size=12).hexdigest()
    root = Path(config.cache_dir).expanduser() if config.cache_dir else default_cache_dir()
    file = root / "features" / f"{key}.pt"
    if str(file) in _LOADED and file.exists():
        return _LOADED[str(file)], file
    meta: dict[str, Any] = {"key": key, "data_fingerprint": digest, "architecture": arch}
    with _file_lock(file.with_suffix(".lock")):
        net = _try_load(file, meta)
        if net is None:
            net, info = train_feature_net(data, config, labelled)
            meta["training"] = info
            save_atomic({"meta": meta, "model": net.state_dict()}, file)
            file.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
            net.requires_grad_(False)
    _LOADED[str(file)] = net
    return net, file


def clear_memory_cache() -> None:
    """Forget the networks loaded in this process (the disk cache stays)."""
    _LOADED.clear()


# --------------------------------------------------------------------------- inception
class _InceptionBody(nn.Module):
    """[-1, 1] images ``(B, C, H, W)`` -> uint8 RGB -> torchmetrics' InceptionV3 pool features ``(B, 2048)``."""

    def __init__(self, weights: Path):
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3

        self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                      feature_extractor_weights_path=str(weights))

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        u8 = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return self.net(u8)


def inception_weights(config: FeatureConfig) -> Path:
    """The local InceptionV3 weights file, or ConfigError saying how to provide one."""
    if config.weights:
        path = Path(config.weights).expanduser()
        if not path.is_file():
            raise ConfigError(f"InceptionV3 weights file not found: {path} (feature_extractor = \"inception\" never "
                              f"downloads; copy the file here, or use feature_extractor = \"trained\")", ("weights",))
        return path
    hub = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    if not hub.is_file():
        raise ConfigError(
            f"feature_extractor = \"inception\" needs InceptionV3 weights on this machine, and none were found: "
            f"set weights = \"/path/to/{INCEPTION_FILE}\" (torch-fidelity's FID weights; flowforge never downloads), "
            f"place the file at {hub}, or use feature_extractor = \"trained\" (a feature network trained on this "
            f"data set)", ("feature_extractor",))
    return hub


def build_extractor(config: FeatureConfig, spec: DataSpec, data: DataSource | None) -> FeatureExtractor:
    """The feature extractor `config` asks for; ConfigError when it cannot be had here."""
    if config.feature_extractor == "raw":
        return FeatureExtractor(None, spec, "raw")
    if config.feature_extractor == "inception":
        if len(spec.shape) != 3 or spec.shape[0] not in (1, 3):
            raise ConfigError(f"feature_extractor = \"inception\" needs grey or RGB images (C, H, W); this data set's "
                              f"examples have shape {tuple(spec.shape)}", ("feature_extractor",))
        weights = inception_weights(config)
        from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

        if not _TORCH_FIDELITY_AVAILABLE:
            raise ConfigError("feature_extractor = \"inception\" needs the torch-fidelity package "
                              "(pip install torch-fidelity)", ("feature_extractor",))
        return FeatureExtractor(_InceptionBody(weights), spec, "inception", batch_size=128)
    if data is None:
        raise ConfigError("feature_extractor = \"trained\" needs the data source to train on", ("feature_extractor",))
    net, _ = cached_feature_net(data, config)
    return FeatureExtractor(net.encoder, spec, "trained")
