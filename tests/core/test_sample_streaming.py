"""Building blocks of process-count-invariant sampling: block sharding, global reference slices, streamed npz."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.collectives import blocks
from core.data import TensorDataSource
from core.interfaces import DataSpec
from core.npzfile import NpzWriter, read_npz


@pytest.mark.parametrize("n,size", [(1, 4), (10, 3), (1000, 64), (7, 7)])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_blocks_partition_the_same_blocks_in_rank_order(n, size, world):
    one = blocks(n, size)
    shared = [b for r in range(world) for b in blocks(n, size, r, world)]
    assert shared == one  # the same blocks, and rank order is global order
    assert one[0][0] == 0 and one[-1][1] == n and all(a[1] == b[0] for a, b in zip(one, one[1:]))


@pytest.mark.parametrize("n", [5, 20, 50])
def test_reference_slices_are_the_global_selection(n):
    x = torch.arange(20.0).reshape(20, 1)
    data = TensorDataSource({"x": x}, {"x": x}, DataSpec(shape=(1,)))
    whole = data.reference(n, torch.Generator().manual_seed(3))["x"]
    parts = torch.cat([data.reference_slice(n, 3, a, b)["x"] for a, b in blocks(n, 7)])
    assert torch.equal(parts, whole)
    if n == 20:  # all of the set means all of it
        assert sorted(whole.flatten().tolist()) == x.flatten().tolist()


def test_streamed_npz_is_what_np_savez_writes(tmp_path):
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (11, 4, 4, 3), dtype=np.uint8), np.arange(11)
    path = tmp_path / "s.npz"
    with NpzWriter(path, {"arr_0": (np.uint8, (4, 4, 3), 11), "arr_1": (np.int64, (), 11)}) as w:
        for a, b in blocks(11, 4):
            w.write("arr_0", images[a:b])
        w.write("arr_1", labels)
    with np.load(path) as f:
        assert f["arr_0"].dtype == np.uint8 and np.array_equal(f["arr_0"], images)
        assert np.array_equal(f["arr_1"], labels)
    mapped = read_npz(path, ["arr_0"], set(), True, (), "an archive")["arr_0"]
    assert isinstance(mapped, np.memmap) and np.array_equal(mapped, images)


def test_unfilled_npz_member_is_an_error(tmp_path):
    w = NpzWriter(tmp_path / "s.npz", {"arr_0": (np.uint8, (2,), 3)})
    w.write("arr_0", np.zeros((2, 2), np.uint8))
    with pytest.raises(ValueError, match="not filled"):
        w.close()
