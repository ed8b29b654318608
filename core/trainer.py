"""The trainer: one loop for every plugin, on one process or many.

Per optimizer step ``s`` (0-based), on each of ``W`` processes:

1. take this rank's share of the global batch (``batch_size / W`` examples,
   a pure function of seed, step and rank), split into ``grad_accum``
   micro-batches;
2. for each micro-batch compute ``objective.loss`` under autocast and
   backpropagate ``loss / grad_accum`` (gradients are all-reduced once, on
   the last micro-batch);
3. stop with `NonFiniteLossError` if the loss is NaN or infinite (the last
   checkpoint is left intact);
4. clip the gradient norm, set ``lr = lr_max * schedule(s)``, take an AdamW
   step, and update the EMA weights;
5. every ``log_every`` steps log the mean loss; every ``checkpoint_every``
   steps write a checkpoint atomically; evaluate and draw samples as
   ``[eval]`` says.

The learning-rate factor is linear warmup ``(s + 1) / warmup_steps`` and then
constant, cosine ``m + (1 - m)(1 + cos(pi p)) / 2`` or linear ``m + (1 - m)(1 - p)``
decay over ``p = (s - warmup) / (steps - warmup)`` with ``m = min_lr_ratio``.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

import registry
from registry import ConfigError

from . import checkpoint as ckpt
from .config import Experiment, TrainerConfig, resolve
from .data import derive_seed
from .data import generator as make_generator
from .ema import EMA
from .generate import Components, evaluate, floor, generate, metric_names
from .progress import Progress
from .rundir import RunDir


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stopped before applying that step."""


def lr_factor(step: int, cfg: TrainerConfig) -> float:
    """The learning-rate multiplier at optimizer step `step` (see the module docstring)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    span = max(1, cfg.steps - cfg.warmup_steps)
    p = min(1.0, max(0.0, (step - cfg.warmup_steps) / span))
    m = cfg.min_lr_ratio
    if cfg.lr_schedule == "cosine":
        return m + (1.0 - m) * 0.5 * (1.0 + math.cos(math.pi * p))
    return m + (1.0 - m) * (1.0 - p)


def _build(kind: str, section: str, mapping: Mapping[str, Any], file: str | None, **context: Any) -> Any:
    try:
        return registry.build(kind, mapping, **context)
    except ConfigError as exc:
        raise exc.within(section, file=file) from None


def build_components(exp: Experiment) -> Components:
    """Build every component of `exp` through the registry (model initialised from the seed)."""
    sections, file = exp.components, exp.file
    data = _build("data", "data", sections["data"], file)
    spec = data.spec
    scheduler = _build("scheduler", "scheduler", sections["scheduler"], file, spec=spec) if "scheduler" in sections else None
    path = _build("path", "path", sections["path"], file, spec=spec, scheduler=scheduler) if "path" in sections else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(exp.experiment.seed, "init"))
        model = _build("backbone", "backbone", sections["backbone"], file, spec=spec)
    if not isinstance(model, nn.Module):
        raise TypeError(f"backbone plugin {sections['backbone']['plugin']!r} returned {type(model).__name__}, not an nn.Module")
    ctx = {"spec": spec, "scheduler": scheduler, "path": path}
    objective = _build("objective", "objective", sections["objective"], file, **ctx)
    solver = _build("solver", "solver", sections["solver"], file, **ctx) if "solver" in sections else None
    metrics = {}
    for index, (name, entry) in enumerate(zip(metric_names(exp.metrics), exp.metrics)):
        metrics[name] = _build("metric", f"metrics[{index}]", entry, file, spec=spec, data=data)
    return Components(spec=spec, data=data, model=model, objective=objective, scheduler=scheduler,
                      path=path, solver=solver, metrics=metrics)


class Trainer:
    """Trains the experiment's backbone with its objective; see the module docstring."""

    def __init__(self, accelerator: Any, exp: Experiment, run_dir: RunDir, resume: bool = False):
        self.acc, self.exp, self.run_dir, self.resume = accelerator, exp, run_dir, resume
        self.cfg = exp.trainer
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        self.is_main = accelerator.is_main_process
        self.device = accelerator.device
        self.seed = exp.experiment.seed
        per_process, rem = divmod(self.cfg.batch_size, self.world * self.cfg.grad_accum)
        if rem or per_process == 0:
            raise ConfigError(
                f"batch_size {self.cfg.batch_size} (the global batch) must divide by processes x grad_accum = "
                f"{self.world} x {self.cfg.grad_accum}", ("trainer", "batch_size"), exp.file)
        self.micro_batch = per_process
        self.components = build_components(exp)
        self.model = self.components.model.to(self.device)
        self.ema = EMA(self.model, self.cfg.ema_decay) if self.cfg.ema_decay > 0 else None
        self.optimizer = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad], lr=self.cfg.lr,
            betas=self.cfg.betas, eps=self.cfg.eps, weight_decay=self.cfg.weight_decay)
        self.model, self.optimizer = self.acc.prepare(self.model, self.optimizer)
        self.step = 0
        self.state: dict[str, Any] = {}
        torch.manual_seed(derive_seed(self.seed, "train", self.rank))

    # -- checkpoints -------------------------------------------------------------
    def eval_model(self) -> nn.Module:
        """The model used for evaluation and sampling: the EMA weights when enabled."""
        if self.ema is not None and self.exp.eval.use_ema:
            return self.ema.model
        return self.acc.unwrap_model(self.model)

    def checkpoint_state(self) -> dict[str, Any]:
        rng = [ckpt.rng_state()]
        if self.world > 1:
            from accelerate.utils import gather_object

            rng = gather_object(rng)
        state = {
            "step": self.step,
            "model": self.acc.unwrap_model(self.model).state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "objective": self.components.objective.state_dict(),
            "rng": rng,
            "world_size": self.world,
            "state": self.state,
        }
        scaler = getattr(self.acc, "scaler", None)
        if scaler is not None:
            state["scaler"] = scaler.state_dict()
        return state

    def save_checkpoint(self) -> None:
        state = self.checkpoint_state()  # every rank takes part in gathering RNG states
        if self.is_main:
            path = ckpt.save_atomic(state, ckpt.path_for(self.run_dir.checkpoints, self.step))
            ckpt.prune(self.run_dir.checkpoints, self.cfg.keep_checkpoints, protect=(path,))
        self.acc.wait_for_everyone()

    def load_checkpoint(self) -> bool:
        path = ckpt.latest(self.run_dir.checkpoints)
        if path is None:
            return False
        state = ckpt.load(path)
        try:
            self.acc.unwrap_model(self.model).load_state_dict(state["model"])
            if self.ema is not None and state.get("ema") is not None:
                self.ema.load_state_dict(state["ema"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (KeyError, RuntimeError, ValueError) as exc:
            raise ConfigError(f"checkpoint {path} does not match this experiment's model or optimizer: "
                              f"{str(exc).splitlines()[0][:300]}") from None
        self.components.objective.load_state_dict(state.get("objective", {}))
        scaler = getattr(self.acc, "scaler", None)
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.state = dict(state.get("state", {}))
        rngs, saved_world = state.get("rng", []), int(state.get("world_size", 1))
        if saved_world != self.world and self.is_main:
            print(f"flowforge: resuming a run checkpointed on {saved_world} process(es) on {self.world}: "
                  f"the global batch is unchanged, but each rank's random stream (noise, times) is "
                  f"{'restored where a rank existed before and freshly seeded otherwise' if rngs else 'freshly seeded'}, "
                  f"so the continuation differs from an uninterrupted {saved_world}-process run")
        if self.rank < len(rngs) and saved_world == self.world:
            ckpt.set_rng_state(rngs[self.rank])
        else:
            torch.manual_seed(derive_seed(self.seed, "train", self.rank, "resumed", self.step))
        return True

    # -- evaluation ----------------------------------------------------------------
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        e = self.exp.eval
        return evaluate(self.components, model, e.num_samples, self.seed, rank=self.rank, world_size=self.world,
                        guidance_scale=e.guidance_scale, batch_size=e.batch_size, device=self.device)

    def write_samples(self, tag: str) -> list[str]:
        if not self.is_main or not self.components.can_generate or self.exp.eval.num_pictures <= 0:
            return []
        batch, nfe = generate(self.components, self.eval_model(), self.exp.eval.num_pictures,
                              make_generator(self.seed, "pictures"), guidance_scale=self.exp.eval.guidance_scale,
                              batch_size=self.exp.eval.batch_size, device=self.device)
        self.state["nfe"] = nfe
        return self.components.data.render(batch, str(self.run_dir.samples / tag))

    # -- the loop ------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        cfg, e = self.cfg, self.exp.eval
        resumed = self.resume and self.load_checkpoint()
        has_metrics = bool(self.components.metrics)
        if not resumed and has_metrics:
            if e.floor:
                self.state["floor"] = floor(self.components, e.num_samples, self.seed, rank=self.rank, world_size=self.world)
            if e.untrained:
                self.state["untrained"] = self.evaluate(self.eval_model())
        start_step, t_start = self.step, time.perf_counter()
        progress = Progress(cfg.steps, start_step, cfg.progress if self.is_main else "off", cfg.log_every)
        batches = self.components.data.train_batches(self.micro_batch * cfg.grad_accum, seed=self.seed,
                                                     start_step=self.step, rank=self.rank, world_size=self.world)
        objective, models = self.components.objective, {"model": self.model}
        loss_sum, loss_count, logs_sum = torch.zeros((), device=self.device), 0, {}
        last_loss = float("nan")
        t_log = time.perf_counter()
        self.model.train()
        while self.step < cfg.steps:
            batch = next(batches)
            micro = self._split(batch)
            step_loss = torch.zeros((), device=self.device)
            for i, mb in enumerate(micro):
                sync = contextlib.nullcontext() if i == len(micro) - 1 else self.acc.no_sync(self.model)
                with sync, self.acc.autocast():
                    loss, logs = objective.loss(models, mb, self.step)
                self.acc.backward(loss / len(micro))
                step_loss += loss.detach().float() / len(micro)
                for k, v in logs.items():
                    logs_sum[k] = logs_sum.get(k, 0.0) + float(v) / len(micro)
            if not torch.isfinite(step_loss):
                raise NonFiniteLossError(
                    f"loss is {step_loss.item()} at step {self.step}; stopped before applying it. "
                    f"The last good checkpoint in {self.run_dir.checkpoints} is intact "
                    f"(try a lower trainer.lr, trainer.grad_clip, or fp32 precision)")
            if cfg.grad_clip > 0:
                self.acc.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            lr = cfg.lr * lr_factor(self.step, cfg)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.ema is not None:
                self.ema.update(self.acc.unwrap_model(self.model))
            self.step += 1
            loss_sum += step_loss
            loss_count += 1
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                last_loss = self._log(loss_sum, loss_count, logs_sum, lr, t_log)
                loss_sum.zero_()
                loss_count, logs_sum, t_log = 0, {}, time.perf_counter()
                progress.update(self.step, loss=last_loss, lr=lr)
            elif progress.mode == "bar":
                progress.update(self.step, loss=last_loss)
            if e.every and self.step % e.every == 0 and self.step < cfg.steps and has_metrics:
                result = self.evaluate(self.eval_model())
                if self.is_main:
                    self.run_dir.log({"step": self.step, **{f"eval/{k}": v for k, v in result.items()}})
            if e.samples_every and self.step % e.samples_every == 0 and self.step < cfg.steps:
                self.write_samples(f"step-{self.step:08d}")
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step < cfg.steps:
                self.save_checkpoint()
        progress.close()
        self.save_checkpoint()
        wall = time.perf_counter() - t_start
        final = self.evaluate(self.eval_model()) if has_metrics else {}
        pictures = self.write_samples("final")
        summary = {
            "experiment": self.exp.experiment.name,
            "steps": self.step,
            "processes": self.world,
            "train_wall_time_s": round(wall, 3),
            "steps_per_s": round((self.step - start_step) / wall, 3) if wall > 0 else None,
            "final_loss": last_loss,
            "metrics": final,
            "untrained": self.state.get("untrained", {}),
            "floor": self.state.get("floor", {}),
            "nfe": self.state.get("nfe"),
            "samples": [str(p) for p in pictures],
        }
        if self.is_main:
            self.run_dir.log({"step": self.step, **{f"eval/{k}": v for k, v in final.items()}})
            self.run_dir.write_summary(summary)
        return summary

    def _split(self, batch: Mapping[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        moved = {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        if self.cfg.grad_accum == 1:
            return [moved]
        parts = {k: v.chunk(self.cfg.grad_accum) if isinstance(v, torch.Tensor) else [v] * self.cfg.grad_accum
                 for k, v in moved.items()}
        return [{k: parts[k][i] for k in moved} for i in range(self.cfg.grad_accum)]

    def _log(self, loss_sum: torch.Tensor, count: int, logs_sum: dict[str, float], lr: float, t0: float) -> float:
        total = loss_sum.clone()
        if self.world > 1:
            total = self.acc.reduce(total, reduction="mean")
        mean = total.item() / max(1, count)
        if self.is_main:
            dt = time.perf_counter() - t0
            record = {"step": self.step, "loss": mean, "lr": lr, "it_per_s": count / dt if dt > 0 else None}
            record.update({k: v / max(1, count) for k, v in logs_sum.items()})
            self.run_dir.log(record)
        return mean


def train_entry(accelerator: Any, config: dict[str, Any], file: str | None, out: str, resume: bool) -> dict[str, Any]:
    """The function every launcher runs on every process (picklable, top-level)."""
    exp = resolve(config, file=file)
    return Trainer(accelerator, exp, RunDir(out), resume=resume).fit()
