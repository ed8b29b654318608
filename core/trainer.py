"""The trainer: one loop for every plugin, on one process or many.

Per optimizer step ``s`` (0-based), on each of ``W`` processes:

1. take this rank's share of the global batch (``batch_size / W`` examples,
   a pure function of seed, step and rank), add ``batch["seeds"]``, the
   `core.rng.example_seeds` of the examples' global positions (every
   per-example draw of the objective is keyed by them, so it does not depend
   on ``W`` or the split), and split into ``grad_accum`` micro-batches;
2. for each micro-batch compute ``objective.loss`` under autocast and
   backpropagate ``loss / grad_accum`` (gradients are all-reduced once, on
   the last micro-batch);
3. stop with `NonFiniteLossError` if the loss is NaN or infinite (the last
   checkpoint is left intact). On the CPU each step's loss is checked before
   its update. On an accelerator, where reading a value back would make the
   host wait for the step it has just queued, the interval's loss sum is
   checked instead, at every log and before any checkpoint, evaluation or
   sample is written (a NaN or inf loss makes the sum NaN or inf);
4. clip the gradient norm, set ``lr = lr_max * schedule(s)``, take an AdamW
   step, and update the EMA weights;
5. every ``log_every`` steps log the mean loss; every ``checkpoint_every``
   steps write a checkpoint atomically; evaluate and draw samples as
   ``[eval]`` says.

Precision: ``bf16``/``fp16`` run the loss under ``torch.autocast``; ``fp16``
also scales the loss dynamically (``torch.amp.GradScaler``): a step whose
gradients overflow is skipped (parameters and EMA unchanged), the scale is
halved, and the skip is counted in the logs.

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

from registry import ConfigError

from . import checkpoint as ckpt
from . import rng, signals, validate
from .build import build, build_components
from .config import Experiment, TrainerConfig, resolve
from .data import derive_seed, device_prefetch, to_device
from .data import generator as make_generator
from .ema import EMA
from .events import Events
from .optim import param_groups, scheduled_lr
from .generate import evaluate, floor, generate
from .progress import Progress
from .progress import phase as progress_phase
from .rundir import RunDir


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stopped before writing anything that absorbed it."""


def checks_every_step(device: torch.device) -> bool:
    """Whether each step's loss is checked before its update (the CPU: reading it back costs nothing)."""
    return device.type == "cpu"


def check_finite(loss: torch.Tensor, first: int, last: int, run_dir: Any) -> None:
    """Raise `NonFiniteLossError` if `loss` (of step `first`, or summed over steps ``first..last``) is not finite."""
    if torch.isfinite(loss):
        return
    where = (f"at step {first}; stopped before applying it" if first == last else
             f"at one of steps {first}-{last} (on an accelerator the loss is checked at each log, checkpoint, "
             f"evaluation and sample, not every step)")
    saved = ckpt.latest(run_dir.checkpoints) if getattr(run_dir, "checkpoints", None) is not None else None
    state = f"The last good checkpoint {saved} is intact" if saved else "No checkpoint had been written yet"
    raise NonFiniteLossError(
        f"loss is {loss.item()} {where}. {state} "
        f"(try a lower trainer.lr, trainer.grad_clip, or fp32 precision)")


def lr_factor(step: int, cfg: TrainerConfig, total: int | None = None, warmup: int | None = None) -> float:
    """The learning-rate multiplier at optimizer step `step` (see the module docstring).

    `total` and `warmup` default to ``cfg.steps`` and ``cfg.warmup_steps``.
    """
    total = cfg.steps if total is None else total
    warmup = cfg.warmup_steps if warmup is None else warmup
    if warmup and step < warmup:
        return (step + 1) / warmup
    if cfg.lr_schedule == "constant":
        return 1.0
    span = max(1, total - warmup)
    p = min(1.0, max(0.0, (step - warmup) / span))
    m = cfg.min_lr_ratio
    if cfg.lr_schedule == "cosine":
        return m + (1.0 - m) * 0.5 * (1.0 + math.cos(math.pi * p))
    return m + (1.0 - m) * (1.0 - p)


def scaled_lr(cfg: TrainerConfig) -> float:
    """``lr`` after the batch-size scaling rule: ``lr * (batch_size / base_batch_size) ** k``, k = 1 (linear), 1/2 (sqrt)."""
    ratio = cfg.batch_size / cfg.base_batch_size
    return cfg.lr * {"none": 1.0, "linear": ratio, "sqrt": ratio ** 0.5}[cfg.lr_scaling]


def enable_gradient_checkpointing(model: nn.Module) -> int:
    """Set ``gradient_checkpointing = True`` on every submodule that has that attribute; return how many."""
    count = 0
    for module in model.modules():
        if hasattr(module, "gradient_checkpointing"):
            module.gradient_checkpointing = True
            count += 1
    return count


class Trainer:
    """Trains the experiment's backbone with its objective; see the module docstring."""

    def __init__(self, accelerator: Any, exp: Experiment, run_dir: RunDir, resume: bool = False):
        self.acc, self.exp, self.run_dir, self.resume = accelerator, exp, run_dir, resume
        self.cfg = cfg = exp.trainer
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        self.is_main = accelerator.is_main_process
        self.device = accelerator.device
        self.seed = exp.experiment.seed
        per_process, rem = divmod(cfg.batch_size, self.world)
        accum = cfg.grad_accum
        if cfg.microbatch:
            accum, rem2 = divmod(per_process, cfg.microbatch)
            rem = rem or rem2
        if rem or accum == 0 or per_process % accum:
            what = (f"processes x microbatch = {self.world} x {cfg.microbatch}" if cfg.microbatch
                    else f"processes x grad_accum = {self.world} x {cfg.grad_accum}")
            raise ConfigError(f"batch_size {cfg.batch_size} (the global batch) must divide by {what}",
                              ("trainer", "batch_size"), exp.file)
        self.accum, self.per_process = accum, per_process
        self.components = build_components(exp)
        validate.monitor_result(cfg.monitor, self.components.metrics, exp.file)
        self.events = Events(self, enabled=self.is_main)
        if self.is_main:
            config = exp.to_dict()
            run_dir.loggers = [build("logger", f"loggers[{i}]", entry, exp.file, run_dir=run_dir.root, experiment=config)
                               for i, entry in enumerate(exp.lists.get("loggers", []))]
        n = getattr(self.components.data, "num_examples", None)
        if cfg.epochs or cfg.warmup_epochs:
            if not n:
                raise ConfigError(f"trainer.epochs / warmup_epochs need a finite data set; data plugin "
                                  f"{exp.components['data']['plugin']!r} is endless: set trainer.steps", ("trainer", "epochs"), exp.file)
        self.steps_per_epoch = math.ceil(n / cfg.batch_size) if n else None
        self.total_steps = cfg.epochs * self.steps_per_epoch if cfg.epochs else cfg.steps
        self.warmup = round(cfg.warmup_epochs * self.steps_per_epoch) if cfg.warmup_epochs else cfg.warmup_steps
        self.lr = scaled_lr(cfg)
        model = self.components.model
        if cfg.gradient_checkpointing and not enable_gradient_checkpointing(model):
            raise ConfigError(f"backbone {exp.components['backbone']['plugin']!r} does not support gradient checkpointing "
                              "(no submodule has a gradient_checkpointing attribute)", ("trainer", "gradient_checkpointing"), exp.file)
        model = model.to(self.device)
        if cfg.sync_batchnorm and self.world > 1:
            if self.device.type == "cuda":
                model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            elif self.is_main:
                print("flowforge: trainer.sync_batchnorm needs GPUs (NCCL); kept per-process BatchNorm on CPU")
        self.model = model
        self.emas = {rate: EMA(model, rate) for rate in cfg.ema_decays}
        params = param_groups(model, cfg.weight_decay, cfg.no_decay_ndim, cfg.no_decay_patterns)
        fused = cfg.fused == "on" or (cfg.fused == "auto" and self.device.type == "cuda")
        self.optimizer = torch.optim.AdamW(params, lr=self.lr, betas=cfg.betas, eps=cfg.eps,
                                           weight_decay=cfg.weight_decay, **({"fused": True} if fused else {}))
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if cfg.tf32:
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        self.raw_model = self.model  # the plain module (shares parameters with the DDP / compiled wrappers)
        self.model = self.acc.prepare_model(self.model)
        if cfg.compile:
            self.model = torch.compile(self.model)
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
        self.scaler = torch.amp.GradScaler(self.device.type) if cfg.precision == "fp16" else None
        self.step = 0
        self.state: dict[str, Any] = {"skipped_steps": 0}
        torch.manual_seed(derive_seed(self.seed, "train", self.rank))

    @property
    def ema(self) -> EMA | None:
        """The first EMA (the one evaluated and sampled), or None."""
        return next(iter(self.emas.values()), None)

    def autocast(self) -> Any:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    # -- checkpoints -------------------------------------------------------------
    def eval_model(self, rate: float | None = None) -> nn.Module:
        """The model used for evaluation and sampling: an EMA (the first rate by default) when enabled."""
        if rate is not None:
            return self.emas[rate].model
        if self.ema is not None and self.exp.eval.use_ema:
            return self.ema.model
        return self.raw_model

    def checkpoint_state(self) -> dict[str, Any]:
        rng = [ckpt.rng_state()]
        if self.world > 1:
            from accelerate.utils import gather_object

            rng = gather_object(rng)
        state = {
            "step": self.step,
            "model": self.raw_model.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "ema_rates": {str(rate): e.state_dict() for rate, e in self.emas.items()},
            "optimizer": self.optimizer.state_dict(),
            "objective": self.components.objective.state_dict(),
            "rng": rng,
            "world_size": self.world,
            "state": self.state,
        }
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def save_checkpoint(self, best: bool = False) -> None:
        state = self.checkpoint_state()  # every rank takes part in gathering RNG states
        if self.is_main:
            if best:
                path = ckpt.save_atomic(state, self.run_dir.checkpoints / "best.pt")
            else:
                path = ckpt.save_atomic(state, ckpt.path_for(self.run_dir.checkpoints, self.step))
                ckpt.prune(self.run_dir.checkpoints, self.cfg.keep_checkpoints, protect=(path,))
            self.events("checkpoint_written", step=self.step, path=path)
        self.acc.wait_for_everyone()

    def load_checkpoint(self) -> bool:
        found = ckpt.load_newest_readable(self.run_dir.checkpoints, report=print if self.is_main else None)
        if found is None:
            return False
        path, state = found
        try:
            self.raw_model.load_state_dict(state["model"])
            for rate, e in self.emas.items():
                saved = state.get("ema_rates", {}).get(str(rate))
                if saved is None and e is self.ema:
                    saved = state.get("ema")
                e.load_state_dict(saved if saved is not None else state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (KeyError, RuntimeError, ValueError) as exc:
            raise ConfigError(f"checkpoint {path} does not match this experiment's model or optimizer "
                              f"(was it trained with other options?): {ckpt.mismatch_detail(exc)}") from None
        self.components.objective.load_state_dict(state.get("objective", {}))
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        if self.step > self.total_steps:
            raise ConfigError(f"trainer.steps: the run asks for {self.total_steps} steps but its checkpoint "
                              f"{path.name} is already at step {self.step}; ask for at least {self.step} "
                              f"(--set trainer.steps=N) or start a new run with --out DIR")
        self.state = dict(state.get("state", {}))
        rngs, saved_world = state.get("rng", []), int(state.get("world_size", 1))
        if saved_world != self.world and self.is_main:
            print(f"flowforge: resuming a run checkpointed on {saved_world} process(es) on {self.world}: "
                  f"the global batch is unchanged, but each rank's random stream (noise, times) is "
                  f"{'restored where a rank existed before and freshly seeded otherwise' if rngs else 'freshly seeded'}, "
                  f"so the continuation differs from an uninterrupted {saved_world}-process run")
        if self.rank < len(rngs) and saved_world == self.world:
            ckpt.set_rng_state(rngs[self.rank])
        elif self.rank < len(rngs):
            ckpt.set_rng_state(rngs[self.rank])
            torch.manual_seed(derive_seed(self.seed, "train", self.rank, "resumed", self.step))
        else:
            torch.manual_seed(derive_seed(self.seed, "train", self.rank, "resumed", self.step))
        if self.is_main:
            dropped = self.run_dir.truncate_metrics(self.step)
            print(f"flowforge: resumed from step {self.step} ({path.name})"
                  + (f"; dropped {dropped} metrics.jsonl record(s) logged after it" if dropped else ""))
        return True

    # -- evaluation ----------------------------------------------------------------
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        e = self.exp.eval
        return evaluate(self.components, model, e.num_samples, self.seed, rank=self.rank, world_size=self.world,
                        guidance_scale=e.guidance_scale, batch_size=e.batch_size, device=self.device)

    def phase(self, what: str) -> Any:
        """Announce an evaluation phase and its duration on the main process (see `core.progress.phase`)."""
        names = ", ".join(self.components.metrics) or "no metrics"
        return progress_phase(what, f"{self.exp.eval.num_samples} samples; {names}",
                              enabled=self.is_main and self.cfg.progress != "off")

    def write_samples(self, tag: str, model: nn.Module | None = None) -> list[str]:
        if not self.is_main or not self.components.can_generate or self.exp.eval.num_pictures <= 0:
            return []
        batch, nfe = generate(self.components, model or self.eval_model(), self.exp.eval.num_pictures,
                              make_generator(self.seed, "pictures"), guidance_scale=self.exp.eval.guidance_scale,
                              batch_size=self.exp.eval.batch_size, device=self.device)
        self.state["nfe"] = nfe
        return self.components.data.render(batch, str(self.run_dir.samples / tag))

    def _monitor_improved(self, result: dict[str, float]) -> bool | None:
        """Record the monitored metric; True when it is the best so far (None when not monitored)."""
        key = self.cfg.monitor
        if not key:
            return None
        if key not in result:
            raise ConfigError(f"trainer.monitor = {key!r} is not an evaluation result; available: "
                              f"{', '.join(sorted(result)) or '(none: add [[metrics]])'}", ("trainer", "monitor"), self.exp.file)
        mode = self.cfg.monitor_mode
        if mode == "auto":
            metric = self.components.metrics.get(key.split("/")[0])
            mode = "max" if getattr(metric, "higher_is_better", False) else "min"
        value, best = result[key], self.state.get("best")
        better = best is None or (value < best["value"] if mode == "min" else value > best["value"])
        if better:
            self.state["best"] = {"metric": key, "value": value, "step": self.step}
            self.state["since_best"] = 0
        else:
            self.state["since_best"] = self.state.get("since_best", 0) + 1
        return better

    # -- the loop ------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train, evaluate, checkpoint; return the summary. The loggers are closed however it ends."""
        try:
            return self._fit()
        finally:
            if self.is_main:
                self.run_dir.close_loggers()

    def _fit(self) -> dict[str, Any]:
        cfg, e = self.cfg, self.exp.eval
        total = self.total_steps
        resumed = self.resume and self.load_checkpoint()
        self.events("run_start")
        has_metrics = bool(self.components.metrics)
        if not resumed and has_metrics:
            if e.floor:
                with self.phase("computing the data floor"):
                    self.state["floor"] = floor(self.components, e.num_samples, self.seed, rank=self.rank,
                                                world_size=self.world, batch_size=e.batch_size)
            if e.untrained:
                with self.phase("evaluating the untrained model"):
                    self.state["untrained"] = self.evaluate(self.eval_model())
        start_step, t_start = self.step, time.perf_counter()
        progress = Progress(total, start_step, cfg.progress if self.is_main else "off", cfg.log_every)
        batches = self.components.data.train_batches(self.per_process, seed=self.seed, start_step=self.step,
                                                     rank=self.rank, world_size=self.world)
        if self.device.type == "cuda" and cfg.prefetch:
            batches = device_prefetch(batches, self.device, cfg.prefetch)
        objective, models = self.components.objective, {"model": self.model}
        loss_sum, loss_count, logs_sum = torch.zeros((), device=self.device), 0, {}
        last_loss, skipped_in_window, consecutive_skips = float("nan"), 0, 0
        t_log = time.perf_counter()
        stopped_early = False
        data_wait = 0.0
        every_step, checked_to = checks_every_step(self.device), self.step  # steps < checked_to are known finite
        step_end = self.events.step_end
        self.model.train()
        t_loop = time.perf_counter()
        while self.step < total:
            t_data = time.perf_counter()
            batch = next(batches)
            data_wait += time.perf_counter() - t_data
            micro = self._split(batch)
            step_loss = torch.zeros((), device=self.device) if len(micro) > 1 else None
            for i, mb in enumerate(micro):
                sync = contextlib.nullcontext() if i == len(micro) - 1 else self.acc.no_sync(self.model)
                with sync:
                    with self.autocast():
                        loss, logs = objective.loss(models, mb, self.step)
                    scaled = loss / len(micro) if len(micro) > 1 else loss  # no extra autograd node
                    if self.scaler is not None:
                        scaled = self.scaler.scale(scaled)
                    scaled.backward()
                if step_loss is None:
                    step_loss = loss.detach().float()
                else:
                    step_loss += loss.detach().float() / len(micro)
                accumulate_logs(logs_sum, logs, 1.0 / len(micro))
            if self.scaler is None and every_step:
                check_finite(step_loss, self.step, self.step, self.run_dir)
            if self.scaler is not None and cfg.grad_clip > 0:
                self.scaler.unscale_(self.optimizer)
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            lr = self.lr * lr_factor(self.step, cfg, total, self.warmup)
            for group in self.optimizer.param_groups:
                group["lr"] = scheduled_lr(group, lr)
            skipped = False
            if self.scaler is not None:
                scale = self.scaler.get_scale()
                self.scaler.step(self.optimizer)
                self.scaler.update()
                skipped = self.scaler.get_scale() < scale
            else:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if skipped:
                skipped_in_window += 1
                consecutive_skips += 1
                self.state["skipped_steps"] = self.state.get("skipped_steps", 0) + 1
                if consecutive_skips >= 50:
                    raise NonFiniteLossError(f"fp16: 50 consecutive steps overflowed up to step {self.step}; "
                                             f"the loss scale is {self.scaler.get_scale():.3g}. Try bf16 or a lower lr")
            else:
                consecutive_skips = 0
                unwrapped = self.raw_model
                for ema in self.emas.values():
                    ema.update(unwrapped)
                loss_sum += step_loss
                loss_count += 1
            self.step += 1
            if step_end is not None:
                step_end(step=self.step, logs=logs)
            last = self.step == total  # the final evaluation, samples and checkpoint follow the loop
            log_now = last or self.step % cfg.log_every == 0
            evaluate_now = not last and has_metrics and bool(e.every) and self.step % e.every == 0
            samples_now = not last and bool(e.samples_every) and self.step % e.samples_every == 0
            checkpoint_now = not last and bool(cfg.checkpoint_every) and self.step % cfg.checkpoint_every == 0
            if not every_step and self.scaler is None and (log_now or evaluate_now or samples_now or checkpoint_now):
                check_finite(loss_sum, checked_to, self.step - 1, self.run_dir)  # before anything is saved or reset
                checked_to = self.step
            if log_now:
                last_loss = self._log(loss_sum, loss_count, logs_sum, lr, t_log, skipped_in_window)
                loss_sum.zero_()
                loss_count, logs_sum, t_log, skipped_in_window = 0, {}, time.perf_counter(), 0
                progress.update(self.step, loss=last_loss, lr=lr)
            elif progress.mode == "bar":
                progress.update(self.step, loss=last_loss)
            if evaluate_now:
                result = self.evaluate(self.eval_model())
                if self.is_main:
                    self.run_dir.log({"step": self.step, **{f"eval/{k}": v for k, v in result.items()}})
                    self.events("evaluated", step=self.step, results=result)
                if self._monitor_improved(result):
                    self.save_checkpoint(best=True)
                patience = cfg.early_stopping_patience
                if patience and self.state.get("since_best", 0) >= patience:
                    if self.is_main:
                        best = self.state["best"]
                        print(f"flowforge: early stopping at step {self.step}: {best['metric']} has not improved for "
                              f"{patience} evaluations (best {best['value']:.5g} at step {best['step']})")
                    stopped_early = True
                    break
            if samples_now:
                self.write_samples(f"step-{self.step:08d}")
            if checkpoint_now:
                self.save_checkpoint()
            stop = None if last else signals.should_stop(self.acc, every_step or log_now)
            if stop:
                self._stop(stop, saved=checkpoint_now, batches=batches, progress=progress)
        loop_time = time.perf_counter() - t_loop
        if hasattr(batches, "close"):
            batches.close()  # stops a prefetching thread and releases the data plugin's workers
        progress.close()
        final = {}
        if has_metrics:
            with self.phase("evaluating the trained model"):
                final = self.evaluate(self.eval_model())
        if final and self._monitor_improved(final):
            self.save_checkpoint(best=True)
        self.save_checkpoint()
        wall = time.perf_counter() - t_start
        pictures = self.write_samples("final")
        by_rate = {}
        if len(self.emas) > 1:
            for rate in list(self.emas)[1:]:
                by_rate[str(rate)] = self.evaluate(self.eval_model(rate)) if has_metrics else {}
                pictures += self.write_samples(f"final-ema{rate}", self.eval_model(rate))
        summary = {
            "experiment": self.exp.experiment.name,
            "steps": self.step,
            "epochs": round(self.step / self.steps_per_epoch, 3) if self.steps_per_epoch else None,
            "processes": self.world,
            "train_wall_time_s": round(wall, 3),
            "steps_per_s": round((self.step - start_step) / loop_time, 3) if loop_time > 0 else None,
            "loop_time_s": round(loop_time, 4),
            "data_wait_fraction": round(data_wait / loop_time, 4) if loop_time > 0 else None,
            "final_loss": last_loss,
            "metrics": final,
            "untrained": self.state.get("untrained", {}),
            "floor": self.state.get("floor", {}),
            "nfe": self.state.get("nfe"),
            "skipped_steps": self.state.get("skipped_steps", 0),
            "samples": [str(p) for p in pictures],
        }
        if by_rate:
            summary["metrics_by_ema"] = {str(list(self.emas)[0]): final, **by_rate}
        if "best" in self.state:
            summary["best"] = self.state["best"]
        if stopped_early:
            summary["stopped_early"] = True
        if self.is_main:
            self.run_dir.log({"step": self.step, **{f"eval/{k}": v for k, v in final.items()}})
            if has_metrics:
                self.events("evaluated", step=self.step, results=final)
            self.run_dir.write_summary(summary)
            self.events("run_end", summary=summary)
        return summary

    def _stop(self, signum: int, saved: bool, batches: Any, progress: Progress) -> None:
        """A signal asked to stop: checkpoint at this step boundary (unless just done), then raise StopRequested."""
        if not saved:
            self.save_checkpoint()
        if hasattr(batches, "close"):
            batches.close()
        progress.close()
        raise signals.StopRequested(signum, self.step, str(ckpt.path_for(self.run_dir.checkpoints, self.step)))

    def _split(self, batch: Mapping[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        moved = {k: to_device(v, self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        moved["seeds"] = rng.shard_seeds(self.seed, self.step, self.per_process, self.rank, self.device)
        if self.cfg.channels_last:
            moved = {k: v.contiguous(memory_format=torch.channels_last) if isinstance(v, torch.Tensor) and v.ndim == 4 else v
                     for k, v in moved.items()}
        if self.accum == 1:
            return [moved]
        parts = {k: v.chunk(self.accum) if isinstance(v, torch.Tensor) else [v] * self.accum for k, v in moved.items()}
        return [{k: parts[k][i] for k in moved} for i in range(self.accum)]

    def _log(self, loss_sum: torch.Tensor, count: int, logs_sum: dict[str, float], lr: float, t0: float,
             skipped: int) -> float:
        total = loss_sum.clone()
        if self.world > 1:
            total = self.acc.reduce(total, reduction="mean")
        mean = total.item() / max(1, count)
        if self.is_main:
            dt = time.perf_counter() - t0
            steps = count + skipped
            record = {"step": self.step, "loss": mean, "lr": lr, "it_per_s": steps / dt if dt > 0 else None}
            if self.scaler is not None:
                record["loss_scale"] = self.scaler.get_scale()
                record["skipped_steps"] = skipped
            record.update({k: v / max(1, steps) for k, v in read_logs(logs_sum).items()})
            self.run_dir.log(record)
        return mean


def accumulate_logs(sums: dict, logs: Mapping[str, Any], scale: float) -> None:
    """Add ``scale * logs`` to `sums` without reading tensors back from their device.

    Python numbers are summed under their key; the tensor values of one call are stacked into one
    vector and summed under the tuple of their keys (one device op per step, however many keys).
    """
    tensors = [k for k, v in logs.items() if isinstance(v, torch.Tensor)]
    for k, v in logs.items():
        if not isinstance(v, torch.Tensor):
            sums[k] = sums.get(k, 0.0) + float(v) * scale
    if tensors:
        key = tuple(tensors)
        vec = torch.stack([logs[k].detach().float() for k in tensors]) * scale
        sums[key] = sums[key] + vec if key in sums else vec


def read_logs(sums: dict) -> dict[str, float]:
    """`accumulate_logs`' sums as ``{key: float}`` (one device read per vector)."""
    out = {}
    for k, v in sums.items():
        if isinstance(k, tuple):
            out.update(zip(k, v.tolist()))
        else:
            out[k] = v
    return out


def train_entry(accelerator: Any, config: dict[str, Any], file: str | None, out: str, resume: bool) -> dict[str, Any]:
    """The function every launcher runs on every process (picklable, top-level)."""
    exp = resolve(config, file=file)
    return Trainer(accelerator, exp, RunDir(out), resume=resume).fit()
