"""The ``digits_cnn`` feature extractor: a small network trained on the run's own training split.

The way MNIST-scale papers use a LeNet in place of Inception. With class labels
it is a classifier (cross-entropy), without them an autoencoder (mean squared
reconstruction error); the features ``(B, feature_dim)`` are its penultimate
layer (the code, for the autoencoder). Images ``(C, H, W)`` get a three-block
CNN, anything else an MLP. The trained network is cached on disk under
``cache_dir`` (default ``$FLOWFORGE_CACHE``, else ``$XDG_CACHE_HOME/flowforge``,
else ``~/.cache/flowforge``) in ``features/<key>.pt``, where the key hashes the
training data it sees (a fingerprint of its first batches, after the input
normalisation of `plugins.metrics.features.to_float`), the architecture, the
training options and the seed. The same data therefore gives the same network
whatever the data source's surface options are: the continuous and the discrete
form of the digits share one, so their Frechet distances are comparable. A
corrupt cache file is rebuilt with a warning; concurrent processes take a file
lock, so one trains and the others load.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import Tensor, nn

from core.interfaces import DataSource, DataSpec
from core.validate import positive
from registry import ConfigError

from .features import FeatureExtractor, default_cache_dir, to_float

#: Bumped whenever the architecture or training changes in a way the key does not capture.
FORMAT_VERSION = 1
#: Batches of training data hashed into the cache key.
FINGERPRINT_BATCHES = 4
#: Channels of the image encoder's conv blocks; width of the vector encoder's hidden layers.
CONV_CHANNELS = (16, 32, 64)
MLP_HIDDEN = 256


@attrs.define
class DigitsCNNConfig:
    """Options of the digits_cnn feature extractor.

    Attributes:
        feature_dim: width of the feature layer.
        train_steps: optimizer steps of its training (cosine learning-rate decay).
        train_batch_size: examples per training step.
        train_lr: peak learning rate (AdamW).
        feature_seed: seed of the initialisation and of the training batches.
        cache_dir: where trained networks are cached (default $FLOWFORGE_CACHE, else
            $XDG_CACHE_HOME/flowforge, else ~/.cache/flowforge).
    """

    feature_dim: int = 128
    train_steps: int = 1000
    train_batch_size: int = 128
    train_lr: float = 1e-3
    feature_seed: int = 0
    cache_dir: str = ""

    def __attrs_post_init__(self) -> None:
        positive(self, "feature_dim", "train_steps", "train_batch_size", "train_lr")


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


def architecture(spec: DataSpec, config: DigitsCNNConfig, labelled: bool) -> dict[str, Any]:
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


def _batches(data: DataSource, config: DigitsCNNConfig) -> Iterator[dict[str, Tensor]]:
    from core.data import derive_seed

    seed = derive_seed(config.feature_seed, "feature-net-batches")
    for batch in data.train_batches(config.train_batch_size, seed=seed):
        out = {"x": to_float(batch["x"], data.spec)}
        if "y" in batch:
            out["y"] = batch["y"].long()
        yield out


def fingerprint(data: DataSource, config: DigitsCNNConfig) -> tuple[str, bool]:
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


def train_feature_net(data: DataSource, config: DigitsCNNConfig, labelled: bool) -> tuple[FeatureNet, dict[str, float]]:
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


def cached_feature_net(data: DataSource, config: DigitsCNNConfig) -> tuple[FeatureNet, Path]:
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


def make_digits_cnn(config: DigitsCNNConfig, spec: DataSpec, data: DataSource | None = None) -> FeatureExtractor:
    """Feature-extractor factory for ``plugin = "digits_cnn"``: the (cached) trained network's encoder."""
    if data is None:
        raise ConfigError("the digits_cnn feature extractor trains on the run's data, and none was given: "
                          "score against a run, or choose features = \"inception\" or \"raw\"", ("plugin",))
    net, file = cached_feature_net(getattr(data, "evaluation_data", data), config)
    return FeatureExtractor(net.encoder, spec, "digits_cnn", identity={"network": file.stem})
