"""Reference statistics cached on disk: the features of a reference set are computed once.

A feature metric's reference statistics (``count, mean (1, F), cov (1, F, F)``
for the Frechet distance; the features ``(N, F)`` for KID and precision/recall)
depend only on the reference examples and on the extractor. They are stored as
``DIR/reference/<key>.safetensors``, where the key hashes

* the data fingerprint: blake2b of the reference examples themselves (shape,
  dtype, every byte, in order), so it changes with the data set, with the
  global reference selection (which rows, in which order) and with any
  preprocessing, and is the same on any number of processes (the metrics see
  the gathered set);
* the extractor's ``identity`` (plugin, data spec, options, weights hash or
  trained network's key);
* the statistic's name and `FORMAT_VERSION`.

Files are written atomically (a temporary file in the same folder, then
``os.replace``) and read as data with safetensors (no unpickling); an
unreadable file is recomputed with a warning.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

#: Bumped when what a cached file holds changes.
FORMAT_VERSION = 1


def fingerprint(x: Tensor | np.ndarray) -> str:
    """blake2b (32 hex digits) of ``x (N, ...)``: shape, dtype and contents, in order (a tensor and an
    array of the same values have the same fingerprint)."""
    if isinstance(x, Tensor):
        t = x.detach().cpu().contiguous()
        x = t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()
        dtype = str(t.dtype).removeprefix("torch.")
    else:
        x, dtype = np.ascontiguousarray(x), str(x.dtype)
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{tuple(x.shape)} {dtype}".encode())
    h.update(memoryview(x).cast("B"))
    return h.hexdigest()


def cache_key(data_fingerprint: str, identity: Any, statistic: str) -> str:
    """The file stem for `statistic` of the data `data_fingerprint` seen through the extractor `identity`."""
    text = json.dumps({"data": data_fingerprint, "extractor": identity, "statistic": statistic,
                       "format": FORMAT_VERSION}, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


class ReferenceCache:
    """``root/reference/<key>.safetensors`` files of named float tensors."""

    def __init__(self, root: str | Path):
        self.folder = Path(root).expanduser() / "reference"

    def file(self, key: str) -> Path:
        return self.folder / f"{key}.safetensors"

    def load(self, key: str) -> dict[str, Tensor] | None:
        """The tensors stored under `key` (float64), or None when there are none or the file is unreadable."""
        from safetensors.torch import load_file

        path = self.file(key)
        if not path.is_file():
            return None
        try:
            return {k: v.double() for k, v in load_file(str(path)).items()}
        except Exception as exc:  # noqa: BLE001 - any failure means an unusable cache file
            warnings.warn(f"flowforge: the cached reference statistics {path} are unreadable ({exc}); recomputing",
                          RuntimeWarning, stacklevel=2)
            return None

    def save(self, key: str, tensors: dict[str, Tensor], meta: dict[str, Any]) -> Path:
        """Store `tensors` under `key` atomically; float64 tensors that float32 holds exactly are stored as float32."""
        from safetensors.torch import save_file

        out = {}
        for name, t in tensors.items():
            t = t.detach().cpu().contiguous()
            small = t.float()
            out[name] = small if torch.equal(small.double(), t.double()) else t
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.file(key)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            save_file(out, str(tmp), metadata={"flowforge": json.dumps(meta, sort_keys=True, default=str)})
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
        return path

