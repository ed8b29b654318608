"""``clip_shards`` (plugins/tinyclip/shards.py): webdataset-format tar shards read lazily give the
batches of the same pairs held in memory, per step, rank and worker count, and resume mid-stream."""

from __future__ import annotations

import io
import math
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



def test_random_resized_crop_box_closed_forms():
    from plugins.tinyclip.shards import CROP_ATTEMPTS, random_resized_crop_box

    u = torch.full((CROP_ATTEMPTS, 4), 0.5)
    u[0, 2:] = 0.999
    # A = 100 * 100 * 0.95, r = exp(0) = 1: w = h = round(sqrt(9500)) = 97; top = left = floor(0.999 * 4) = 3
    assert random_resized_crop_box(100, 100, u) == (3, 3, 97, 97)
    u[0] = torch.tensor([0.0, 1.0, 0.0, 0.0])  # A = 9000, r = 4/3: w = round(sqrt(12000)) = 110 > 100
    u[1] = torch.tensor([1.0, 0.0, 0.0, 0.0])  # A = 10000, r = 3/4: h = round(sqrt(13333.3)) = 115 > 100
    assert random_resized_crop_box(100, 100, u) == (2, 2, 97, 97)  # attempt 3: floor(0.5 * 4) = 2
    # no attempt fits a 1000 x 10 strip (h >= sqrt(0.9 * 10000 * 3/4) = 82): the center crop of aspect 4/3
    assert random_resized_crop_box(1000, 10, torch.rand(CROP_ATTEMPTS, 4)) == ((1000 - 13) // 2, 0, 13, 10)
    assert random_resized_crop_box(10, 1000, torch.rand(CROP_ATTEMPTS, 4)) == (0, (1000 - 13) // 2, 10, 13)
    assert random_resized_crop_box(50, 60, torch.rand(CROP_ATTEMPTS, 4), (0.1, 0.1), (2.0, 2.0)) != (0, 0, 50, 60)


def _boxes(width, height, scale):
    from core import rng
    from plugins.tinyclip.shards import CROP_ATTEMPTS, random_resized_crop_box

    u = rng.uniform(torch.arange(2000), (CROP_ATTEMPTS, 4), "crop", torch.float64)
    boxes = torch.tensor([random_resized_crop_box(width, height, row, scale) for row in u], dtype=torch.float64)
    left, top, w, h = boxes.T
    assert (left >= 0).all() and (top >= 0).all() and (left + w <= width).all() and (top + h <= height).all()
    return boxes.T


@pytest.mark.parametrize("width, height, scale", [(320, 240, (0.9, 1.0)), (300, 300, (0.08, 1.0))])
def test_random_resized_crop_boxes_stay_in_the_scale_and_aspect_ranges(width, height, scale):
    """2000 crops: inside the image, area fraction in `scale` and aspect in [3/4, 4/3] up to the rounding
    of w and h (+-1/2 each), the area range nearly covered (and, where the image allows, the aspect range)."""
    left, top, w, h = _boxes(width, height, scale)
    area = w * h / (width * height)
    slack = (w + h + 0.5) / (2 * width * height)  # (w +- 1/2)(h +- 1/2) - w h
    assert (area >= scale[0] - slack).all() and (area <= scale[1] + slack).all()
    assert area.min() < scale[0] + 0.01 and area.max() > scale[1] - 0.01
    aspect = w / h
    assert (aspect >= 0.75 * (1 - 1 / h) - 1e-9).all() and (aspect <= 4 / 3 * (1 + 1 / h) + 1e-9).all()
    if scale[0] < 0.5:
        assert aspect.min() < 0.76 and aspect.max() > 1.32
    else:  # w <= 320, h <= 240 and w h >= 0.9 * 320 * 240 leave aspects in [1.2, 4/3]
        assert aspect.min() < 1.21
    assert len({(a, b) for a, b in zip(left.tolist(), top.tolist())}) > 20  # positions vary too


def test_a_whole_image_crop_is_a_plain_resize():
    """Area 15 x 12 = 180 and aspect 5/4 (u_1 = log(5/4 / 3/4) / log(16/9)): the box is the whole image, and
    the crop is PIL's bicubic resize of it."""
    from PIL import Image

    from plugins.tinyclip.shards import CROP_ATTEMPTS, random_resized_crop_box

    data = _image_bytes(COLOURS["green"], 12, "PNG")  # 15 wide, 12 high
    u = torch.rand(CROP_ATTEMPTS, 4, dtype=torch.float64)
    u[0, 1] = math.log(5 / 3) / math.log(16 / 9)
    assert random_resized_crop_box(15, 12, u, (1.0, 1.0)) == (0, 0, 15, 12)
    got = decode_image(data, 8, (u, (1.0, 1.0)))
    with Image.open(io.BytesIO(data)) as im:
        want = np.asarray(im.convert("RGB").resize((8, 8), Image.Resampling.BICUBIC), dtype=np.float32)
    torch.testing.assert_close(got, torch.from_numpy(want).permute(2, 0, 1) / 127.5 - 1.0)


@pytest.mark.parametrize("workers", [0, 2])
def test_random_resized_crops_are_keyed_by_the_example_seed(shards, workers):
    """Each training image is its example's crop drawn from its `core.rng` seed (stream "crop"); rank r's
    rows of 2 processes are the rows of the global batch on 1 process; held-out images keep the center crop."""
    from core import rng
    from core.data import step_index_stream
    from plugins.tinyclip.shards import CROP_ATTEMPTS

    folder, _, _ = shards
    data = _build(folder, train_crop="random_resized", num_workers=workers)
    center = _build(folder)
    one = data.train_batches(4, seed=2, start_step=0)
    ranks = [data.train_batches(2, seed=2, start_step=0, rank=r, world_size=2) for r in range(2)]
    plain = center.train_batches(4, seed=2, start_step=0)
    index = step_index_stream(9, 4, 2, 0, 0, 1)
    differ = 0
    for step in range(3):
        whole = next(one)
        torch.testing.assert_close(torch.cat([next(r)["image"] for r in ranks]), whole["image"])
        flat = next(plain)
        assert torch.equal(whole["text"], flat["text"])
        seeds = rng.shard_seeds(2, step, 4)  # the trainer's batch["seeds"] of this step
        for row, (i, seed) in enumerate(zip(next(index).tolist(), seeds.tolist())):
            image, _ = data.train.pairs[i]
            u = rng.uniform(torch.tensor([seed]), (CROP_ATTEMPTS, 4), "crop")[0]
            want = decode_image(image.read(data.train.handles), 8, (u, (0.9, 1.0)))
            torch.testing.assert_close(whole["image"][row], want)
            differ += not torch.allclose(want, flat["image"][row], atol=1e-3)
    assert differ >= 1  # the pattern is constant along rows: only crops of 11 of the 12 rows change it
    again = next(data.train_batches(4, seed=2, start_step=2))
    torch.testing.assert_close(again["image"], whole["image"])  # resumed at step 2: the same crops
    torch.testing.assert_close(data.reference_slice(3, 1, 0, 3)["image"], center.reference_slice(3, 1, 0, 3)["image"])
    with pytest.raises(ConfigError, match="crop_scale"):
        _build(folder, train_crop="random_resized", crop_scale=[0.0, 1.0])
