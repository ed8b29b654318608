"""``clip_shards`` (plugins/tinyclip/shards.py): webdataset-format tar shards read lazily give the
batches of the same pairs held in memory, per step, rank and worker count, and resume mid-stream."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import torch

import registry
from core.data import TensorDataSource
from plugins.tinyclip.shards import decode_image
from registry import ConfigError

COLOURS = {"red": (230, 20, 20), "green": (20, 200, 40), "blue": (30, 60, 240), "grey": (128, 128, 128)}


def _image_bytes(rgb, size, fmt):
    from PIL import Image

    pixels = np.zeros((size, size + 3, 3), np.uint8) + np.array(rgb, np.uint8)
    pixels[: size // 2, :, 0] = 255 - pixels[: size // 2, :, 0]  # not constant, so the crop matters
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt)
    return out.getvalue()


def write_shard(path, items, orphan=False):
    with tarfile.open(path, "w") as tar:
        for key, (colour, caption, fmt) in items.items():
            for name, data in ((f"{key}.{fmt.lower()}", _image_bytes(COLOURS[colour], 12, fmt)),
                               (f"{key}.txt", caption.encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        if orphan:
            info = tarfile.TarInfo("lonely.png")
            data = _image_bytes(COLOURS["red"], 12, "PNG")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    names = list(COLOURS)
    items = [{f"{s:02d}{i:03d}": (names[(s + i) % 4], f"a {names[(s + i) % 4]} thing number {i}", "PNG")
              for i in range(n)} for s, n in enumerate((5, 4))]
    write_shard(folder / "train-000.tar", items[0], orphan=True)
    write_shard(folder / "train-001.tar", items[1])
    write_shard(folder / "val-000.tar", {f"v{i}": (names[i], f"the {names[i]} one", "PNG") for i in range(3)})
    captions = [c for shard in items for _, c, _ in shard.values()]
    images = torch.stack([decode_image(_image_bytes(COLOURS[c], 12, "PNG"), 8) for shard in items
                          for c, _, _ in shard.values()])
    return folder, captions, images


def _build(folder, **options):
    return registry.build("data", {"plugin": "clip_shards", "train": str(folder / "train-*.tar"),
                                   "held_out": str(folder / "val-*.tar"), "image_size": 8, **options})


def test_indexing_and_decoding(shards):
    folder, captions, images = shards
    data = _build(folder)
    assert data.num_examples == 9 and data.skipped == 1  # lonely.png has no caption
    assert data.spec.shape == (3, 8, 8) and data.spec.extra["context_length"] == max(len(c.split()) for c in captions) + 2
    assert data.tokenizer.decode(data.tokenizer.encode(captions)) == captions
    image, caption = data.train[7]
    torch.testing.assert_close(image, images[7])
    assert caption == captions[7] and image.min() >= -1 and image.max() <= 1


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_equal_the_in_memory_pairs_per_step_and_rank(shards, workers):
    folder, captions, images = shards
    data = _build(folder, num_workers=workers)
    memory = TensorDataSource({"image": images, "text": data.tokenizer.encode(captions)},
                              {"image": images, "text": data.tokenizer.encode(captions)}, data.spec)
    for rank in range(2):
        got = data.train_batches(2, seed=5, start_step=0, rank=rank, world_size=2)
        want = memory.train_batches(2, seed=5, start_step=0, rank=rank, world_size=2)
        for _ in range(6):  # past an epoch of 9 pairs
            a, b = next(got), next(want)
            torch.testing.assert_close(a["image"], b["image"])
            assert torch.equal(a["text"], b["text"])
    resumed = next(data.train_batches(4, seed=5, start_step=3))
    fresh = data.train_batches(4, seed=5, start_step=0)
    for _ in range(3):
        next(fresh)
    assert torch.equal(resumed["text"], next(fresh)["text"])


def test_held_out_rows_and_bad_shards(shards, tmp_path):
    folder, _, _ = shards
    data = _build(folder)
    whole = data.reference(3, torch.Generator().manual_seed(1))
    part = data.reference_slice(3, 1, 1, 3)
    torch.testing.assert_close(part["image"], whole["image"][1:3])
    assert data.reference_slice(3, 1, 2, 2)["text"].shape == (0, data.tokenizer.context_length)
    with pytest.raises(ConfigError, match="no shard matches"):
        _build(tmp_path)
    (tmp_path / "train-0.tar").write_bytes(b"not a tar file at all" * 30)
    (tmp_path / "val-0.tar").write_bytes(b"x")
    with pytest.raises(ConfigError, match="tar shard"):
        registry.build("data", {"plugin": "clip_shards", "train": str(tmp_path / "train-*.tar"),
                                "held_out": str(folder / "val-*.tar")})


def test_openai_pixel_normalisation(shards):
    folder, _, images = shards
    data = _build(folder, pixels="openai")
    batch = next(data.train_batches(9, seed=0))
    plain = next(_build(folder).train_batches(9, seed=0))
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    torch.testing.assert_close(batch["image"], ((plain["image"] + 1) / 2 - mean) / std)
    with pytest.raises(ConfigError, match="channels = 3"):
        registry.build("data", {"plugin": "clip_pairs", "train": "x.csv", "channels": 1, "pixels": "openai"})


def _child_reads(dataset, queue) -> None:
    queue.put((len(dataset.handles), dataset.caption(3)))


def test_a_forked_worker_opens_its_own_shard_files(shards):
    """The OS shares a file's offset between forked processes: a DataLoader worker reusing the parent's open
    shard would race the parent's seeks. The child starts with no open file and reads the right caption."""
    import multiprocessing

    folder, captions, _ = shards
    dataset = _build(folder).train
    assert dataset.caption(0) == captions[0] and len(dataset.handles) >= 1  # the parent holds its files open
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_reads, args=(dataset, queue))
    child.start()
    opened_before, caption = queue.get(timeout=60)
    child.join(timeout=60)
    assert (opened_before, caption, child.exitcode) == (0, captions[3], 0)
