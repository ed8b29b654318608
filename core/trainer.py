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
   step, call the model's ``after_optimizer_step()`` if it has one (e.g. to
   project parameters back into their range), and update the EMA weights;
5. every ``log_every`` steps log the mean loss; every ``checkpoint_every``
   steps write a checkpoint atomically; evaluate and draw samples as
   ``[eval]`` says.

Precision: ``bf16``/``fp16`` run the loss under ``torch.autocast``; ``fp16``
also scales the loss dynamically (``torch.amp.GradScaler``): a step whose
gradients overflow is skipped (parameters and EMA unchanged), the scale is
halved, and the skip is counted in the logs.

The learning-rate factor (`core.optim.lr_factor`) is linear warmup ``(s + 1) / warmup_steps`` and then
constant, cosine ``m + (1 - m)(1 + cos(pi p)) / 2`` or linear ``m + (1 - m)(1 - p)``
decay over ``p = (s - warmup) / (steps - warmup)`` with ``m = min_lr_ratio``.
"""

from __future__ import annotations

import contextlib
import gc
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import attrs
import torch
from torch import nn

from registry import ConfigError

from . import checkpoint as ckpt
from . import posthoc_ema, rng, signals, validate
from .build import build, build_components
from .config import Experiment
from .data import derive_seed, device_prefetch, to_device
from .data import generator as make_generator
from .ema import EMA, Warmup
from .errors import NonFiniteLossError
from .events import Events
from .interfaces import Binned
from .optim import lr_factor, param_groups, scaled_lr, scheduled_lr  # noqa: F401 - lr_factor public here
from .generate import evaluate, floor, generate
from .progress import Progress
from .progress import phase as progress_phase
from .rundir import RunDir


def checks_every_step(device: torch.device) -> bool:
    """Whether each step's loss is checked before its update (the CPU: reading it back costs nothing)."""
    return device.type == "cpu"


def check_finite(loss: torch.Tensor, first: int, last: int, run_dir: Any) -> None:
    """Raise `NonFiniteLossError` if `loss` (of step `first`, or summed over steps ``first..last``) is not finite."""
    value = loss.item()  # one read (the CPU check of every step: cheaper than an isfinite op and its read)
    if math.isfinite(value):
        return
    where = (f"at step {first}; stopped before applying it" if first == last else
             f"at one of steps {first}-{last} (on an accelerator the loss is checked at each log, checkpoint, "
             f"evaluation and sample, not every step)")
    saved = ckpt.latest(run_dir.checkpoints) if getattr(run_dir, "checkpoints", None) is not None else None
    state = f"The last good checkpoint {saved} is intact" if saved else "No checkpoint had been written yet"
    raise NonFiniteLossError(
        f"loss is {value} {where}. {state} "
        f"(try a lower trainer.lr, trainer.grad_clip, or fp32 precision)")


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """Keep the objects alive at entry out of Python's cyclic garbage collector until exit (`gc.freeze`).

    The young generations are collected first, then everything alive (torch, the plugins, the model:
    some 300k objects) is frozen, so a full collection during training traverses only what the loop
    made since (two full collections took 257 ms at a run's start on the 2-core development machine).
    Reference counting frees tensors as before; exit unfreezes, so the objects are collected as usual.
    """
    gc.collect(1)
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def enable_gradient_checkpointing(model: nn.Module) -> int:
    """Set ``gradient_checkpointing = True`` on every submodule that has that attribute; return how many."""
    count = 0
    for module in model.modules():
        if hasattr(module, "gradient_checkpointing"):
            module.gradient_checkpointing = True
            count += 1
    return count


@attrs.define
class Periodic:
    """An action of the training loop, run after optimizer step ``s`` (counted from 1) when due.

    Due when ``every > 0`` and ``s % every == 0`` on steps before the last; on the last step only
    when `at_end` (the final evaluation, samples and checkpoint are the finish's, not the loop's).
    `run` returns True to end the loop (early stopping). An action that `saves` (writes, logs or
    resets something the loss went into) is preceded by the loss check of the window on an
    accelerator. `idle` runs instead on the steps the action is not due (the progress bar).
    """

    name: str
    every: int
    run: Callable[[], Any]
    at_end: bool = False
    saves: bool = True
    idle: Callable[[], Any] | None = None

    def due(self, step: int, last: bool) -> bool:
        if last:
            return self.at_end
        return self.every > 0 and step % self.every == 0


@attrs.define
class Loop:
    """The training loop's running state between two logs (the window) and over the whole loop."""

    batches: Iterator[Any]
    progress: Progress
    every_step: bool  # each step's loss is checked before its update (the CPU)
    checked_to: int  # steps before it are known finite
    loss_sum: torch.Tensor  # over the window's applied steps, on the device
    t_log: float
    loss_count: int = 0
    logs_sum: dict = attrs.Factory(dict)
    logs: Mapping[str, Any] = attrs.Factory(dict)  # the last micro-batch's logs (for the step_end event)
    last_loss: float = float("nan")
    lr: float = float("nan")
    skipped_in_window: int = 0
    consecutive_skips: int = 0
    data_wait: float = 0.0
    stopped_early: bool = False


class Trainer:
    """Trains the experiment's backbone with its objective; see the module docstring."""

    def __init__(self, accelerator: Any, exp: Experiment, run_dir: RunDir, resume: bool = False):
        self.acc, self.exp, self.run_dir, self.resume = accelerator, exp, run_dir, resume
        self.cfg = cfg = exp.trainer
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        self.is_main = accelerator.is_main_process
        self.device = accelerator.device
        self.seed = exp.experiment.seed
        self.accum, self.per_process = self._micro_batches()
        self.components = build_components(exp)
        validate.monitor_result(cfg.monitor, self.components.metrics, exp.file)
        self.events = Events(self, enabled=self.is_main)
        if self.is_main:
            config = exp.to_dict()
            run_dir.loggers = [build("logger", f"loggers[{i}]", entry, exp.file, configs=exp.configs,
                                     run_dir=run_dir.root, experiment=config)
                               for i, entry in enumerate(exp.lists.get("loggers", []))]
        self.steps_per_epoch, self.total_steps, self.warmup = self._run_length()
        self.lr = scaled_lr(cfg)
        self._prepare_model()
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
        self.scaler = torch.amp.GradScaler(self.device.type) if cfg.precision == "fp16" else None
        self.step = 0
        self.state: dict[str, Any] = {"skipped_steps": 0}
        torch.manual_seed(derive_seed(self.seed, "train", self.rank))

    def _micro_batches(self) -> tuple[int, int]:
        """(micro-batches per step, examples per process): ``batch_size = world * per_process``,
        ``per_process = accum * micro-batch``; ConfigError when they do not divide."""
        cfg = self.cfg
        per_process, rem = divmod(cfg.batch_size, self.world)
        accum = cfg.grad_accum
        if cfg.microbatch:
            accum, rem2 = divmod(per_process, cfg.microbatch)
            rem = rem or rem2
        if rem or accum == 0 or per_process % accum:
            what = (f"processes x microbatch = {self.world} x {cfg.microbatch}" if cfg.microbatch
                    else f"processes x grad_accum = {self.world} x {cfg.grad_accum}")
            raise ConfigError(f"batch_size {cfg.batch_size} (the global batch) must divide by {what}",
                              ("trainer", "batch_size"), self.exp.file)
        return accum, per_process

    def _run_length(self) -> tuple[int | None, int, int]:
        """(steps per epoch or None, total steps, warmup steps), from steps or epochs."""
        cfg, exp = self.cfg, self.exp
        n = getattr(self.components.data, "num_examples", None)
        if (cfg.epochs or cfg.warmup_epochs) and not n:
            raise ConfigError(f"trainer.epochs / warmup_epochs need a finite data set; data plugin "
                              f"{exp.components['data']['plugin']!r} is endless: set trainer.steps", ("trainer", "epochs"), exp.file)
        steps_per_epoch = math.ceil(n / cfg.batch_size) if n else None
        total = cfg.epochs * steps_per_epoch if cfg.epochs else cfg.steps
        warmup = round(cfg.warmup_epochs * steps_per_epoch) if cfg.warmup_epochs else cfg.warmup_steps
        return steps_per_epoch, total, warmup

    def _prepare_model(self) -> None:
        """The model on the device (gradient checkpointing, SyncBatchNorm, channels-last), its EMAs, the
        optimizer, and the wrapped model (DDP, torch.compile) that trains; `raw_model` is the plain module."""
        cfg, exp = self.cfg, self.exp
        model = self.components.model
        if cfg.gradient_checkpointing and not enable_gradient_checkpointing(model):
            raise ConfigError(f"backbone {exp.components['backbone']['plugin']!r} does not support gradient checkpointing "
                              "(no submodule has a gradient_checkpointing attribute)", ("trainer", "gradient_checkpointing"), exp.file)
        if cfg.init_from and not (self.resume and ckpt.latest(self.run_dir.checkpoints)):
            self._initialise_from(model, cfg.init_from, ema=cfg.init_weights == "ema")
        model = model.to(self.device)
        if cfg.sync_batchnorm and self.world > 1:
            if self.device.type == "cuda":
                model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            elif self.is_main:
                print("flowforge: trainer.sync_batchnorm needs GPUs (NCCL); kept per-process BatchNorm on CPU")
        self.emas = {rate: EMA(model, rate, Warmup.of(cfg)) for rate in cfg.ema_decays}
        self.posthoc = posthoc_ema.PowerEMA(model, cfg.posthoc_ema) if cfg.posthoc_ema else None
        params = param_groups(model, cfg.weight_decay, cfg.no_decay_ndim, cfg.no_decay_patterns)
        fused = cfg.fused == "on" or (cfg.fused == "auto" and self.device.type == "cuda")
        self.optimizer = torch.optim.AdamW(params, lr=self.lr, betas=cfg.betas, eps=cfg.eps,
                                           weight_decay=cfg.weight_decay, **({"fused": True} if fused else {}))
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if cfg.tf32:
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        self.raw_model = model  # the plain module (shares parameters with the DDP / compiled wrappers)
        after = getattr(model, "after_optimizer_step", None)  # looked up once: a missing nn.Module attribute is slow
        self.after_optimizer_step = after if callable(after) else None
        self.model = self.acc.prepare_model(model)
        if cfg.compile:
            self.model = torch.compile(self.model)

    def _initialise_from(self, model: nn.Module, source: str, ema: bool) -> None:
        """Load `source` (a run directory's newest checkpoint, or a checkpoint file) into `model`, strictly;
        ConfigError when it is missing or its architecture differs."""
        from pathlib import Path

        where = ("trainer", "init_from")
        path = Path(source)
        if not path.exists():
            raise ConfigError(f"{source} does not exist: name a run directory or a checkpoint file "
                              f"(train the source run first)", where, self.exp.file)
        file = ckpt.latest(RunDir(path).checkpoints) if path.is_dir() else path
        if file is None:
            raise ConfigError(f"{source} holds no checkpoint yet (a run saves one at its end)", where, self.exp.file)
        try:
            which, tensors, state = ckpt.model_weights(file, ema=ema)
        except ConfigError as exc:
            raise ConfigError(str(exc), where, self.exp.file) from None
        try:
            model.load_state_dict(tensors)
        except (RuntimeError, KeyError, ValueError) as exc:
            raise ConfigError(f"the weights of {source} do not fit this backbone (same plugin and options as the "
                              f"source run?): {ckpt.mismatch_detail(exc)}", where, self.exp.file) from None
        if self.is_main:
            print(f"flowforge: initialised the backbone from {source} ({which} weights, step {state.get('step', '?')})")

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
            "posthoc_ema": self.posthoc.state_dict() if self.posthoc is not None else {},
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
            if self.posthoc is not None:
                self.posthoc.load_state_dict(state["posthoc_ema"])
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
        """Baselines, then `train_step` and the `periodic_actions` after each step, then `_finish`."""
        resumed = self.resume and self.load_checkpoint()
        self.events("run_start")
        if not resumed and self.components.metrics:
            self._baselines()
        start_step, t_start = self.step, time.perf_counter()
        loop = self._start_loop()
        actions = self.periodic_actions(loop)
        self.model.train()
        t_loop = time.perf_counter()
        with frozen_heap():
            while self.step < self.total_steps:
                self.train_step(loop)
                if self._after_step(loop, actions):
                    break
        loop_time = time.perf_counter() - t_loop
        return self._finish(loop, start_step, t_start, loop_time)

    def _baselines(self) -> None:
        """Before the first step: the data floor and the untrained model's metrics (as ``[eval]`` asks)."""
        e = self.exp.eval
        if e.floor:
            with self.phase("computing the data floor"):
                self.state["floor"] = floor(self.components, e.num_samples, self.seed, rank=self.rank,
                                            world_size=self.world, batch_size=e.batch_size)
        if e.untrained:
            with self.phase("evaluating the untrained model"):
                self.state["untrained"] = self.evaluate(self.eval_model())

    def _start_loop(self) -> "Loop":
        """The loop's state at `self.step`: the batch stream, the progress display, empty sums."""
        cfg = self.cfg
        progress = Progress(self.total_steps, self.step, cfg.progress if self.is_main else "off", cfg.log_every)
        batches = self.components.data.train_batches(self.per_process, seed=self.seed, start_step=self.step,
                                                     rank=self.rank, world_size=self.world)
        if self.device.type == "cuda" and cfg.prefetch:
            batches = device_prefetch(batches, self.device, cfg.prefetch)
        return Loop(batches=batches, progress=progress, every_step=checks_every_step(self.device),
                    checked_to=self.step, loss_sum=torch.zeros((), device=self.device), t_log=time.perf_counter())

    def periodic_actions(self, loop: "Loop") -> list[Periodic]:
        """What runs after optimizer steps, in this order, each with its period (see `Periodic`)."""
        cfg, e, step_end = self.cfg, self.exp.eval, self.events.step_end
        return [
            Periodic("events", int(step_end is not None), lambda: step_end(step=self.step, logs=loop.logs),
                     at_end=step_end is not None, saves=False),
            Periodic("log", cfg.log_every, lambda: self._log_window(loop), at_end=True,
                     idle=lambda: loop.progress.update(self.step, loss=loop.last_loss)
                     if loop.progress.mode == "bar" else None),
            Periodic("eval", e.every if self.components.metrics else 0, self._periodic_eval),
            Periodic("samples", e.samples_every, lambda: self.write_samples(f"step-{self.step:08d}") and None),
            Periodic("checkpoint", cfg.checkpoint_every, self.save_checkpoint),
        ]

    def train_step(self, loop: "Loop") -> None:
        """One optimizer step: a batch, its micro-batches' backward passes, the update, the EMA; ``step += 1``."""
        t_data = time.perf_counter()
        batch = next(loop.batches)
        loop.data_wait += time.perf_counter() - t_data
        step_loss = self._backward(self._split(batch), loop)
        if self.scaler is None and loop.every_step:
            check_finite(step_loss, self.step, self.step, self.run_dir)
        loop.lr, skipped = self._update()
        if skipped:
            loop.skipped_in_window += 1
            loop.consecutive_skips += 1
            self.state["skipped_steps"] = self.state.get("skipped_steps", 0) + 1
            if loop.consecutive_skips >= 50:
                raise NonFiniteLossError(f"fp16: 50 consecutive steps overflowed up to step {self.step}; "
                                         f"the loss scale is {self.scaler.get_scale():.3g}. Try bf16 or a lower lr")
        else:
            loop.consecutive_skips = 0
            for ema in self.emas.values():
                ema.update(self.raw_model, self.step)
            if self.posthoc is not None:
                posthoc_ema.after_step(self.posthoc, self.raw_model, self.step, self.cfg.posthoc_ema_every,
                                       self.run_dir.root / "ema_snapshots", self.is_main)
            loop.loss_sum += step_loss
            loop.loss_count += 1
        self.step += 1

    def _backward(self, micro: list[dict[str, torch.Tensor]], loop: "Loop") -> torch.Tensor:
        """Backpropagate ``loss / len(micro)`` of each micro-batch (gradients synced on the last); the step's loss."""
        objective, models = self.components.objective, {"model": self.model}
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
            accumulate_logs(loop.logs_sum, logs, 1.0 / len(micro))
            loop.logs = logs
        return step_loss

    def _update(self) -> tuple[float, bool]:
        """Clip, set the scheduled learning rate, step the optimizer; (lr, whether fp16 skipped the step)."""
        cfg = self.cfg
        if self.scaler is not None and cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        lr = self.lr * lr_factor(self.step, cfg, self.total_steps, self.warmup)
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
        if self.after_optimizer_step is not None and not skipped:
            self.after_optimizer_step()
        return lr, skipped

    def _after_step(self, loop: "Loop", actions: Sequence[Periodic]) -> bool:
        """Run the due actions (after the loss check they need), then poll for a stop signal; True: stop early."""
        last = self.step == self.total_steps  # the final evaluation, samples and checkpoint follow the loop
        due = {a.name for a in actions if a.due(self.step, last)}
        checked = loop.every_step or self.scaler is not None
        for action in actions:
            if action.name not in due:
                if action.idle is not None:
                    action.idle()
                continue
            if action.saves and not checked:  # before anything is saved or reset
                check_finite(loop.loss_sum, loop.checked_to, self.step - 1, self.run_dir)
                loop.checked_to, checked = self.step, True
            if action.run() is True:
                loop.stopped_early = True
                return True
        stop = None if last else signals.should_stop(self.acc, loop.every_step or "log" in due)
        if stop:
            self._stop(stop, saved="checkpoint" in due, batches=loop.batches, progress=loop.progress)
        return False

    def _log_window(self, loop: "Loop") -> None:
        """Log the window's mean loss and logs, then start a new window."""
        loop.last_loss = self._log(loop.loss_sum, loop.loss_count, loop.logs_sum, loop.lr, loop.t_log,
                                   loop.skipped_in_window)
        loop.loss_sum.zero_()
        loop.loss_count, loop.logs_sum, loop.t_log, loop.skipped_in_window = 0, {}, time.perf_counter(), 0
        loop.progress.update(self.step, loss=loop.last_loss, lr=loop.lr)

    def _periodic_eval(self) -> bool:
        """Evaluate, log, keep the best checkpoint; True when early stopping ends the run."""
        result = self.evaluate(self.eval_model())
        if self.is_main:
            self.run_dir.log({"step": self.step, **{f"eval/{k}": v for k, v in result.items()}})
            self.events("evaluated", step=self.step, results=result)
        if self._monitor_improved(result):
            self.save_checkpoint(best=True)
        patience = self.cfg.early_stopping_patience
        if not (patience and self.state.get("since_best", 0) >= patience):
            return False
        if self.is_main:
            best = self.state["best"]
            print(f"flowforge: early stopping at step {self.step}: {best['metric']} has not improved for "
                  f"{patience} evaluations (best {best['value']:.5g} at step {best['step']})")
        return True

    def _finish(self, loop: "Loop", start_step: int, t_start: float, loop_time: float) -> dict[str, Any]:
        """After the loop: the final evaluation, checkpoint and samples, the summary and the run_end event."""
        if hasattr(loop.batches, "close"):
            loop.batches.close()  # stops a prefetching thread and releases the data plugin's workers
        loop.progress.close()
        has_metrics, final = bool(self.components.metrics), {}
        if has_metrics:
            with self.phase("evaluating the trained model"):
                final = self.evaluate(self.eval_model())
        if final and self._monitor_improved(final):
            self.save_checkpoint(best=True)
        self.save_checkpoint()
        wall = time.perf_counter() - t_start
        pictures = self.write_samples("final")
        by_rate = {}
        for rate in list(self.emas)[1:]:
            by_rate[str(rate)] = self.evaluate(self.eval_model(rate)) if has_metrics else {}
            pictures += self.write_samples(f"final-ema{rate}", self.eval_model(rate))
        summary = self._summary(loop, final, by_rate, pictures, wall, (self.step - start_step, loop_time))
        if self.is_main:
            self.run_dir.log({"step": self.step, **{f"eval/{k}": v for k, v in final.items()}})
            if has_metrics:
                self.events("evaluated", step=self.step, results=final)
            self.run_dir.write_summary(summary)
            self.events("run_end", summary=summary)
        return summary

    def _summary(self, loop: "Loop", final: dict[str, float], by_rate: dict[str, Any], pictures: list[str],
                 wall: float, timing: tuple[int, float]) -> dict[str, Any]:
        """summary.json: `timing` is (steps taken in this process's loop, the loop's seconds)."""
        steps, loop_time = timing
        summary = {
            "experiment": self.exp.experiment.name,
            "steps": self.step,
            "epochs": round(self.step / self.steps_per_epoch, 3) if self.steps_per_epoch else None,
            "processes": self.world,
            "train_wall_time_s": round(wall, 3),
            "steps_per_s": round(steps / loop_time, 3) if loop_time > 0 else None,
            "loop_time_s": round(loop_time, 4),
            "data_wait_fraction": round(loop.data_wait / loop_time, 4) if loop_time > 0 else None,
            "final_loss": loop.last_loss,
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
        if loop.stopped_early:
            summary["stopped_early"] = True
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
            record.update(read_logs(logs_sum, steps))
            self.run_dir.log(record)
        return mean


#: `Binned` values a log interval keeps unbinned before it bins them (bounds the memory of a long interval).
FOLD_AT = 1 << 20


@attrs.define
class BinnedSums:
    """A log interval's `Binned` values under one key: kept as given, binned when read (or when more than
    `FOLD_AT` values are pending) into the running ``sums (K,)`` and ``counts (K,)``."""

    bins: int
    pending: list = attrs.Factory(list)
    pending_count: int = 0
    sums: Any = None
    counts: Any = None

    def add(self, value: Binned) -> None:
        self.pending.append(value)
        self.pending_count += value.values.shape[0]
        if self.pending_count >= FOLD_AT:
            self.fold()

    def fold(self) -> None:
        if not self.pending:
            return
        joined = Binned(torch.cat([b.values for b in self.pending]), torch.cat([b.positions for b in self.pending]),
                        self.bins)
        sums, counts = joined.totals()
        self.sums, self.counts = (sums, counts) if self.sums is None else (self.sums + sums, self.counts + counts)
        self.pending, self.pending_count = [], 0

    def means(self) -> dict[int, float]:
        """``{bin: mean}`` of the bins any value fell in."""
        self.fold()
        if self.sums is None:
            return {}
        pairs = zip(self.sums.double().tolist(), self.counts.tolist())
        return {i: total / count for i, (total, count) in enumerate(pairs) if count}


def accumulate_logs(sums: dict, logs: Mapping[str, Any], scale: float) -> None:
    """Add ``scale * logs`` to `sums` without reading tensors back from their device.

    Python numbers are summed as floats; a tensor value (0-d, or a 1-D vector logged as ``key/0`` ...
    ``key/(n-1)``) is summed on its device under its key: one add per tensor key and step, no
    conversion when it is already float32. A `Binned` value is kept as given (`BinnedSums`): no op.
    """
    for k, v in logs.items():
        if isinstance(v, Binned):
            if k not in sums:
                sums[k] = BinnedSums(v.bins)
            sums[k].add(v)
            continue
        if not isinstance(v, torch.Tensor):
            sums[k] = sums.get(k, 0.0) + float(v) * scale
            continue
        v = v.detach()
        if v.dtype != torch.float32:
            v = v.float()
        if scale != 1.0:
            v = v * scale
        sums[k] = sums[k] + v if k in sums else v.clone()


def read_logs(sums: dict, steps: int = 1) -> dict[str, float]:
    """`accumulate_logs`' sums of `steps` steps as ``{key: float}`` means: a vector ``v`` under ``key`` becomes
    ``key/i`` = ``v[i] / steps``; `Binned` values become ``key/i`` = the mean of bin i (bins without a value
    are left out)."""
    out, n = {}, max(1, steps)
    for k, v in sums.items():
        if isinstance(v, BinnedSums):
            out.update((f"{k}/{i}", mean) for i, mean in v.means().items())
        elif not isinstance(v, torch.Tensor):
            out[k] = v / n
        elif v.ndim == 0:
            out[k] = v.item() / n
        else:
            out.update((f"{k}/{i}", x / n) for i, x in enumerate(v.tolist()))
    return out


def train_entry(accelerator: Any, exp: Experiment, out: str, resume: bool) -> dict[str, Any]:
    """Train the structured experiment `exp` on this process (picklable, top-level; not re-validated)."""
    return Trainer(accelerator, exp, RunDir(out), resume=resume).fit()
