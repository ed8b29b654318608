"""Cached contrastive accumulation on 2 processes (gloo, DistributedDataParallel) equals one global batch.

Each of 2 ranks holds half of a global batch of 8 and computes it in ``accum_chunks = 2``
chunks of 2; after the backward pass every rank's gradients (and the loss of its rows)
must equal those of the whole batch of 8 on one process in a single pass, for the
contrastive loss and for TinyCLIP's distillation loss (affinity + contrastive mix).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from plugins.tinyclip.losses import ClipContrastive, ContrastiveConfig, DistillConfig, TinyCLIPDistill
from tests.plugins.tinyclip.test_tinyclip import grads, make_batch, make_clip

GLOBAL, WORLD, CHUNKS = 8, 2, 2


def objectives():
    teacher = make_clip(width=48, depth=1, heads=3, seed=7)
    return {
        "contrastive": lambda chunks: ClipContrastive(ContrastiveConfig(accum_chunks=chunks)),
        "distill": lambda chunks: TinyCLIPDistill(
            DistillConfig(teacher="(in memory)", alpha=0.6, weight=1.5, teacher_logit_scale=50.0,
                          accum_chunks=chunks), spec=None, teacher=teacher),
    }


def _worker(rank: int, out: str) -> None:
    # a file rendezvous: no TCP port that a test running beside this one could take first
    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        image, text = make_batch(GLOBAL)
        share = slice(rank * GLOBAL // WORLD, (rank + 1) * GLOBAL // WORLD)
        result = {}
        for name, make in objectives().items():
            model = make_clip()
            ddp = DistributedDataParallel(model)
            loss, _ = make(CHUNKS).loss({"model": ddp}, {"image": image[share], "text": text[share]}, 0)
            loss.backward()
            result[name] = {"loss": loss.detach(), "grads": grads(model)}
        torch.save(result, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_with_chunks_equal_one_global_batch(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    image, text = make_batch(GLOBAL)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for name, make in objectives().items():
        model = make_clip()
        loss, _ = make(1).loss({"model": model}, {"image": image, "text": text}, 0)
        loss.backward()
        reference = grads(model)
        # the loss of the global batch is the mean of the ranks' losses (each the mean over its rows)
        mean_loss = sum(r[name]["loss"] for r in ranks) / WORLD
        torch.testing.assert_close(mean_loss, loss.detach(), rtol=1e-5, atol=1e-6)
        for r in ranks:
            assert set(r[name]["grads"]) == set(reference), name
            for key, g in reference.items():
                scale = float(g.abs().max()) or 1.0  # float32 reduction order: error relative to the gradient's scale
                torch.testing.assert_close(r[name]["grads"][key], g, rtol=1e-4, atol=1e-5 * scale,
                                           msg=lambda m, name=name, key=key: f"{name} {key}: {m}")
        assert reference["logit_scale"].abs() > 0  # the learned scale's gradient is part of the comparison
