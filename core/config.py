"""Experiment files: TOML -> validated, defaults-filled configuration.

An experiment file has core sections (``[experiment]``, ``[trainer]``,
``[eval]``) whose schema lives here, and component sections (``[data]``,
``[backbone]``, ...) whose ``plugin`` key names a registered component and
whose other keys are that component's options. Everything is validated before
anything is built; every error names the file, the key path, what was expected
and the closest valid key.
"""

from __future__ import annotations

import copy
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import attrs

import registry
from registry import ConfigError, did_you_mean

from .validate import non_negative, positive

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

#: Component sections and the registry kind each one builds.
COMPONENT_SECTIONS: dict[str, str] = {
    "data": "data",
    "backbone": "backbone",
    "scheduler": "scheduler",
    "path": "path",
    "objective": "objective",
    "solver": "solver",
    "launcher": "launcher",
}
REQUIRED_SECTIONS = ("data", "backbone", "objective")
#: Sections an experiment may leave out: it then gets the component that declares itself its kind's
#: default (``register(..., default=True)``; flowforge's one-process launcher does).
DEFAULTED_SECTIONS = ("launcher",)
#: Lists of tables, each entry a component: ``[[metrics]] plugin = "..."``; ``[[loggers]]`` (default
#: none) receive every metrics.jsonl record, which is always written.
LIST_SECTIONS: dict[str, str] = {"metrics": "metric", "loggers": "logger"}
#: ``[[stages]]``: a run of several trainings, each the base file plus overrides (see `split_stages`).
STAGES_KEY = "stages"
PREVIOUS = "{previous}"


@attrs.define
class ExperimentConfig:
    """``[experiment]``: what the run is called and its seed."""

    name: str = "experiment"
    seed: int = 0
    description: str = ""


def _compiles(patterns: list[str]) -> bool:
    try:
        for p in patterns:
            re.compile(p)
    except re.error:
        return False
    return True


@attrs.define
class TrainerConfig:
    """``[trainer]``: optimisation, precision, checkpointing and logging.

    Attributes:
        steps: optimizer steps of the run (ignored when ``epochs`` > 0).
        epochs: run length in passes over the training set (0: use ``steps``); needs a finite data set.
        batch_size: the global batch of one optimizer step, split over processes and micro-batches.
        grad_accum: micro-batches per step on each process (guided-diffusion's micro-batching):
            per-process micro-batch = batch_size / (processes * grad_accum).
        microbatch: alternative to grad_accum: the per-process micro-batch size (0: unused).
        lr: peak learning rate (before the scaling rule).
        lr_scaling: "none", or scale lr by (batch_size / base_batch_size) ("linear") or its square root ("sqrt").
        base_batch_size: the batch size at which ``lr`` was tuned (for lr_scaling).
        weight_decay: AdamW weight decay.
        no_decay_ndim: parameters with fewer dimensions get no weight decay (2: gains, biases,
            scalars, as open_clip and TinyCLIP; 0: none excluded), see `core.optim`.
        no_decay_patterns: regular expressions; parameters whose names match one get no weight decay.
        betas: AdamW betas.
        eps: AdamW epsilon.
        fused: use the fused AdamW kernel (GPU) — "auto" picks it on CUDA, foreach elsewhere.
        warmup_steps: linear warmup from 0 to lr over this many steps.
        warmup_epochs: the same in epochs (used when > 0).
        lr_schedule: after warmup: constant, cosine or linear decay to min_lr_ratio * lr.
        min_lr_ratio: final learning rate as a fraction of lr.
        grad_clip: clip the global gradient norm to this value (0: no clipping).
        ema_decay: EMA decay rate, or a list of rates kept at once (the first is used for evaluation); 0: no EMA.
        ema_warmup: "none" (the constant rate), "meta" (min(decay, (1 + n) / (10 + n)) at update n) or
            "power" (diffusers' EMAModel warm-up, 1 - (1 + m / ema_inv_gamma)^-ema_power clamped to
            [ema_min_decay, decay], m = n - ema_update_after_step - 1); see `core.ema`.
        ema_power: exponent of the power warm-up (2/3; 3/4 for long runs).
        ema_inv_gamma: inverse multiplicative factor of the power warm-up.
        ema_min_decay: lower clamp of the power warm-up.
        ema_update_after_step: updates before the power warm-up starts averaging (copies until then).
        posthoc_ema: sigma_rel of each power-function EMA kept for post-hoc reconstruction (EDM2 uses
            [0.05, 0.10]); empty: none. See `core.posthoc_ema`.
        posthoc_ema_every: store the power EMAs in <run>/ema_snapshots every N steps.
        precision: fp32, bf16 (autocast) or fp16 (autocast with a dynamic loss scale; skipped steps are logged).
        gradient_checkpointing: recompute activations in backward (backbones that support it).
        compile: wrap the backbone in torch.compile for training (evaluation uses the EMA copy, uncompiled).
        channels_last: store 4D activations channels-last (helps convolutional backbones on GPU).
        tf32: allow TensorFloat-32 in float32 matmuls and cuDNN convolutions on the GPU (DiT's train.py
            does); false leaves PyTorch's defaults.
        prefetch: on CUDA, batches a background thread draws, pins and copies to the GPU (on a side
            stream) ahead of the step that uses them; 0 draws each batch when the step asks for it.
            Ignored on the CPU, where the data plugin's own workers do this.
        sync_batchnorm: convert BatchNorm layers to SyncBatchNorm when running on several GPUs.
        checkpoint_every: write a checkpoint every N steps (0: only at the end).
        keep_checkpoints: how many periodic checkpoints to keep (the best one is kept apart).
        monitor: an evaluation metric (a summary key such as "energy_distance") that selects the best checkpoint.
        monitor_mode: "min", "max", or "auto" (from the metric's higher_is_better; min when unknown).
        early_stopping_patience: stop after this many evaluations without improvement of ``monitor`` (0: never).
        log_every: log the mean loss every N steps.
        progress: "auto" (a bar on a terminal, lines otherwise), "bar", "lines" or "off".
        init_from: initialise the backbone from a run directory (its newest checkpoint) or a checkpoint
            file before training (RectifiedFlow's distillation starts from the 2-RF; fine-tuning); the
            architectures must match. Empty: random initialisation. Ignored when the run resumes from
            its own checkpoint. ``"{previous}"`` in a ``[[stages]]`` override names the previous stage.
        init_weights: which weights of ``init_from``: its first EMA ("ema", the raw ones when it kept
            none) or its raw weights ("raw"). The EMAs of the new run start from the loaded weights.
    """

    steps: int = 1000
    epochs: int = 0
    batch_size: int = 256
    grad_accum: int = 1
    microbatch: int = 0
    lr: float = 1e-3
    lr_scaling: Literal["none", "linear", "sqrt"] = "none"
    base_batch_size: int = 256
    weight_decay: float = 0.0
    no_decay_ndim: int = 0
    no_decay_patterns: list[str] = attrs.Factory(list)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    fused: Literal["auto", "on", "off"] = "auto"
    warmup_steps: int = 0
    warmup_epochs: float = 0.0
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    min_lr_ratio: float = 0.0
    grad_clip: float = 0.0
    ema_decay: float | list[float] = 0.999
    ema_warmup: Literal["none", "meta", "power"] = "none"
    ema_power: float = 2.0 / 3.0
    ema_inv_gamma: float = 1.0
    ema_min_decay: float = 0.0
    ema_update_after_step: int = 0
    posthoc_ema: list[float] = attrs.Factory(list)
    posthoc_ema_every: int = 0
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    gradient_checkpointing: bool = False
    compile: bool = False
    channels_last: bool = False
    tf32: bool = False
    prefetch: int = 2
    sync_batchnorm: bool = False
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    monitor: str = ""
    monitor_mode: Literal["auto", "min", "max"] = "auto"
    early_stopping_patience: int = 0
    log_every: int = 50
    progress: Literal["auto", "bar", "lines", "off"] = "auto"
    init_from: str = ""
    init_weights: Literal["ema", "raw"] = "ema"

    @property
    def ema_decays(self) -> list[float]:
        """The EMA rates as a list (empty when EMA is off)."""
        rates = self.ema_decay if isinstance(self.ema_decay, list) else [self.ema_decay]
        return [r for r in rates if r > 0]

    def __attrs_post_init__(self) -> None:
        rates = self.ema_decay if isinstance(self.ema_decay, list) else [self.ema_decay]
        checks = [
            (self.steps >= 0, "steps", "a non-negative integer"),
            (self.epochs >= 0, "epochs", "a non-negative integer"),
            (self.batch_size > 0, "batch_size", "a positive integer"),
            (self.grad_accum > 0, "grad_accum", "a positive integer"),
            (self.microbatch >= 0, "microbatch", "a non-negative integer"),
            (self.prefetch >= 0, "prefetch", "a non-negative integer"),
            (not (self.microbatch and self.grad_accum != 1), "microbatch", "either microbatch or grad_accum, not both"),
            (self.base_batch_size > 0, "base_batch_size", "a positive integer"),
            (self.lr >= 0, "lr", "a non-negative number"),
            (all(0.0 <= r < 1.0 for r in rates) and len(rates) > 0, "ema_decay",
             "a number in [0, 1) or a list of them (0 disables EMA)"),
            (self.ema_power > 0 and self.ema_inv_gamma > 0, "ema_power", "a positive ema_power and ema_inv_gamma"),
            (0.0 <= self.ema_min_decay < 1.0, "ema_min_decay", "a number in [0, 1)"),
            (self.ema_update_after_step >= 0, "ema_update_after_step", "a non-negative integer"),
            (all(0.0 < s < 12 ** -0.5 for s in self.posthoc_ema), "posthoc_ema",
             "sigma_rel values in (0, 0.2887) (EDM2 uses [0.05, 0.10])"),
            (self.posthoc_ema_every >= 0 and (self.posthoc_ema_every > 0) == bool(self.posthoc_ema),
             "posthoc_ema_every", "a positive snapshot interval with posthoc_ema, 0 without"),
            (self.grad_clip >= 0, "grad_clip", "a non-negative number (0 disables clipping)"),
            (self.warmup_steps >= 0, "warmup_steps", "a non-negative integer"),
            (self.warmup_epochs >= 0, "warmup_epochs", "a non-negative number"),
            (self.checkpoint_every >= 0, "checkpoint_every", "a non-negative integer (0: only at the end)"),
            (self.keep_checkpoints >= 1, "keep_checkpoints", "a positive integer"),
            (self.early_stopping_patience >= 0, "early_stopping_patience", "a non-negative integer"),
            (not (self.early_stopping_patience and not self.monitor), "early_stopping_patience",
             "a monitor metric too (set trainer.monitor)"),
            (self.log_every > 0, "log_every", "a positive integer"),
            (self.no_decay_ndim >= 0, "no_decay_ndim", "a non-negative integer (0: no exclusion by rank)"),
            (_compiles(self.no_decay_patterns), "no_decay_patterns", "a list of valid regular expressions"),
            (self.weight_decay >= 0, "weight_decay", "a non-negative number"),
            (all(0.0 <= b < 1.0 for b in self.betas), "betas", "two numbers in [0, 1) (AdamW's beta1, beta2)"),
            (self.eps > 0, "eps", "a positive number"),
            (0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio", "a number in [0, 1]"),
        ]
        for ok, key, expected in checks:
            if not ok:
                raise ConfigError(f"expected {expected}, got {getattr(self, key)!r}", (key,))


@attrs.define
class EvalConfig:
    """``[eval]``: when and how the trained model is evaluated and sampled.

    Attributes:
        every: evaluate the metrics every N steps (0: only at the end).
        samples_every: write sample pictures every N steps (0: only at the end).
        num_samples: generated examples that feed the sample metrics.
        num_pictures: examples drawn into each picture.
        batch_size: generation batch size.
        guidance_scale: classifier-free guidance scale w: (1 + w) cond - w uncond.
        use_ema: evaluate and sample the EMA weights (the first rate) rather than the raw ones.
        untrained: also evaluate the untrained model (summary.json "untrained").
        floor: also compute the data-vs-data floor (summary.json "floor").
    """

    every: int = 0
    samples_every: int = 0
    num_samples: int = 1000
    num_pictures: int = 64
    batch_size: int = 1000
    guidance_scale: float = 0.0
    use_ema: bool = True
    untrained: bool = True
    floor: bool = True

    def __attrs_post_init__(self) -> None:
        non_negative(self, "every", "samples_every", "num_pictures")
        positive(self, "num_samples", "batch_size")


CORE_SECTIONS: dict[str, type] = {"experiment": ExperimentConfig, "trainer": TrainerConfig, "eval": EvalConfig}


@attrs.define
class Experiment:
    """A validated experiment: core sections as objects, component sections as resolved mappings."""

    experiment: ExperimentConfig
    trainer: TrainerConfig
    eval: EvalConfig
    components: dict[str, dict[str, Any]]
    metrics: list[dict[str, Any]]
    file: str | None = None
    #: the other list sections (``loggers``, and those of plugin-declared kinds): section -> entries
    lists: dict[str, list[dict[str, Any]]] = attrs.Factory(dict)
    #: each component's structured config object (None: no options), by key path ("backbone",
    #: "metrics[0]"): structured once by `resolve`, built from by `core.build` (never re-validated)
    configs: dict[str, Any] = attrs.field(factory=dict, eq=False, repr=False)

    def section(self, name: str) -> dict[str, Any] | None:
        """The resolved mapping of a component section, or None when absent."""
        return self.components.get(name)

    def to_dict(self) -> dict[str, Any]:
        """The resolved configuration as plain data (every default filled in)."""
        out: dict[str, Any] = {}
        for name in CORE_SECTIONS:
            out[name] = registry.unstructure(getattr(self, name))
        for name, mapping in self.components.items():
            out[name] = copy.deepcopy(mapping)
        for name, entries in {"metrics": self.metrics, **self.lists}.items():
            if entries:
                out[name] = copy.deepcopy(entries)
        return out


# --------------------------------------------------------------------------- reading
def read_toml(path: str | Path) -> dict[str, Any]:
    """Parse a TOML file; ConfigError (naming the file and line) when unreadable."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"experiment file not found: {path}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[:exc.start].count(b"\n") + 1
        raise ConfigError(f"not UTF-8 text: byte {exc.object[exc.start]:#04x} on line {line} "
                          f"(TOML files are UTF-8; re-save the file as UTF-8)", file=str(path)) from None
    except OSError as exc:
        raise ConfigError(f"cannot read the experiment file: {exc.strerror}", file=str(path)) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}", file=str(path)) from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"trainer.lr=3e-4"`` -> (["trainer", "lr"], 3e-4). Values are TOML; bare words are strings."""
    if "=" not in text:
        raise ConfigError(f"--set expects KEY=VALUE (e.g. trainer.steps=100), got {text!r}")
    key, _, raw = text.partition("=")
    keys = [k.strip() for k in key.strip().split(".")]
    if not all(keys):
        raise ConfigError(f"--set: empty key in {text!r}")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return keys, value


def apply_overrides(raw: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of `raw` with each ``a.b.c=value`` override applied (validated later)."""
    return set_keys(raw, [parse_override(text) + (text,) for text in overrides])


def set_keys(raw: Mapping[str, Any], items: Sequence[tuple[list[str], Any, str]]) -> dict[str, Any]:
    """A copy of `raw` with each (key path, value, text for messages) set."""
    out = copy.deepcopy(dict(raw))
    for keys, value, text in items:
        node: Any = out
        for depth, key in enumerate(keys[:-1]):
            child = _child(node, key, keys[:depth + 1], text)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, (dict, list)):
                raise ConfigError(f"--set {text!r}: {'.'.join(keys[:depth + 1])} is not a table")
            node = child
        if isinstance(node, list):
            node[_list_index(node, keys[-1], keys, text)] = value
        else:
            node[keys[-1]] = value
    return out


def _list_index(node: list, key: str, keys: Sequence[str], text: str) -> int:
    """``metrics.0.x``: the position `key` in a list of tables, checked."""
    if not key.lstrip("-").isdigit():
        raise ConfigError(f"--set {text!r}: {'.'.join(keys[:keys.index(key)])} is a list; "
                          f"address an entry by its index (0..{len(node) - 1}), got {key!r}")
    index = int(key)
    if not -len(node) <= index < len(node):
        raise ConfigError(f"--set {text!r}: index {index} is out of range; the list has {len(node)} entries")
    return index


def _child(node: Any, key: str, path: Sequence[str], text: str) -> Any:
    """The entry `key` of a table, or of a list of tables (``metrics.0``)."""
    if isinstance(node, list):
        return node[_list_index(node, key, list(path), text)]
    return node.get(key)


def declared_kinds() -> list[registry.Kind]:
    """The kinds plugins declared (`registry.declared_kinds`); PluginError when one takes a section
    or a kind name of flowforge's own."""
    own_sections = {*CORE_SECTIONS, *COMPONENT_SECTIONS, *LIST_SECTIONS, STAGES_KEY}
    own_kinds = {*COMPONENT_SECTIONS.values(), *LIST_SECTIONS.values()}
    kinds = registry.declared_kinds()
    for kind in kinds:
        if kind.section in own_sections or kind.name in own_kinds:
            raise registry.PluginError(
                f"kind {kind.name!r} of plugin {kind.plugin!r} (distribution {kind.distribution!r}) declares "
                f"{'section [' + kind.section + ']' if kind.section in own_sections else 'a kind'} that flowforge "
                f"itself defines; that distribution must choose another name")
    return kinds


def section_tables() -> tuple[dict[str, str], dict[str, str], list[str]]:
    """(table section -> kind, list section -> kind, required sections): flowforge's and the plugins'."""
    extra = declared_kinds()
    tables = {**COMPONENT_SECTIONS, **{k.section: k.name for k in extra if not k.many}}
    lists = {**LIST_SECTIONS, **{k.section: k.name for k in extra if k.many}}
    return tables, lists, [*REQUIRED_SECTIONS, *(k.section for k in extra if k.required)]


def _check_sections(raw: Mapping[str, Any], tables: Mapping[str, str], lists: Mapping[str, str],
                    required: Sequence[str], file: str | None) -> None:
    """Every section of `raw` is known and of the right shape; every required one is there."""
    known = [*CORE_SECTIONS, *tables, *lists]
    for key, value in raw.items():
        if key not in known:
            raise ConfigError(f"unknown section{did_you_mean(key, known)}; valid sections: {', '.join(known)}", (key,), file)
        if key in lists:
            if not isinstance(value, list):
                raise ConfigError(f"expected a list of tables ([[{key}]]), got {value!r}", (key,), file)
        elif not isinstance(value, Mapping):
            raise ConfigError(f"expected a table ([{key}]), got {value!r}", (key,), file)
    for name in required:
        if name not in raw:
            kind = tables.get(name) or lists[name]
            brackets = f"[[{name}]]" if name in lists else f"[{name}]"
            raise ConfigError(f"missing required section {brackets} (with a plugin key; installed: "
                              f"{', '.join(registry.available(kind)) or 'none'})", (name,), file)


def resolve(raw: Mapping[str, Any], file: str | None = None) -> Experiment:
    """Validate `raw` (a parsed experiment file) and fill in every default.

    Sections of plugin-declared kinds (`declared_kinds`) are validated like flowforge's own.

    Raises:
        ConfigError: located at the file and key path of the first problem.
    """
    tables, lists, required = section_tables()
    _check_sections(raw, tables, lists, required, file)
    core: dict[str, Any] = {}
    for name, cls in CORE_SECTIONS.items():
        try:
            core[name] = registry.structure(raw.get(name, {}), cls)
        except ConfigError as exc:
            raise exc.within(name, file=file) from None
    configs: dict[str, Any] = {}
    sections = dict(raw)
    for name in DEFAULTED_SECTIONS:
        fallback = registry.default_of(tables[name])
        if name not in sections and fallback is not None:
            sections[name] = {"plugin": fallback}
    components = {name: _configure(kind, sections[name], name, file, configs)
                  for name, kind in tables.items() if name in sections}
    entries = {name: [_configure(kind, item, f"{name}[{index}]", file, configs)
                      for index, item in enumerate(raw.get(name, []))] for name, kind in lists.items()}
    metrics = entries.pop("metrics")
    check_monitor(core["trainer"].monitor, metrics, file)
    return Experiment(core["experiment"], core["trainer"], core["eval"], components, metrics, file, entries, configs)


def _configure(kind: str, mapping: Any, where: str, file: str | None, configs: dict[str, Any]) -> dict[str, Any]:
    """Structure one component section (once): record its config object in `configs` under `where`
    and return the resolved mapping (``plugin`` first, every default filled in)."""
    try:
        comp, config = registry.configure(kind, mapping)
    except ConfigError as exc:
        raise exc.within(where, file=file) from None
    configs[where] = config
    return {"plugin": comp.name, **(registry.unstructure(config) if config is not None else {})}


def check_monitor(monitor: str, metrics: Sequence[Mapping[str, Any]], file: str | None = None) -> None:
    """``trainer.monitor`` must name one of the ``[[metrics]]`` (``NAME`` or ``NAME/RESULT``)."""
    names = metric_names(metrics)
    if monitor and monitor.split("/")[0] not in names:
        raise ConfigError(f"{monitor!r} is not an evaluation result{did_you_mean(monitor, names)}; the metrics are: "
                          f"{', '.join(names) or '(none: add [[metrics]])'}", ("trainer", "monitor"), file)


def metric_names(metrics: Sequence[Mapping[str, Any]]) -> list[str]:
    """Summary keys for ``[[metrics]]`` entries: the plugin name, made unique with a suffix."""
    names: list[str] = []
    for entry in metrics:
        base = entry.get("name") or entry["plugin"]
        name, k = base, 2
        while name in names:
            name, k = f"{base}_{k}", k + 1
        names.append(name)
    return names


@attrs.define
class Stage:
    """One entry of ``[[stages]]``: a name and dotted-key overrides applied to the base file.

    The string ``"{previous}"`` inside an override value is replaced by the
    previous stage's run directory (e.g. to initialise from its weights).
    """

    name: str
    set: dict[str, Any] = attrs.Factory(dict)


def split_stages(raw: Mapping[str, Any], file: str | None = None) -> tuple[dict[str, Any], list[Stage]]:
    """(the file without ``[[stages]]``, the validated stages) ."""
    base = dict(raw)
    entries = base.pop(STAGES_KEY, [])
    if not isinstance(entries, list):
        raise ConfigError(f"expected a list of tables ([[{STAGES_KEY}]]), got {entries!r}", (STAGES_KEY,), file)
    stages = []
    for index, entry in enumerate(entries):
        try:
            stage = registry.structure(entry, Stage)
        except ConfigError as exc:
            raise exc.within(f"{STAGES_KEY}[{index}]", file=file) from None
        if not stage.name.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(f"expected a name of letters, digits, '-' and '_', got {stage.name!r}",
                              (f"{STAGES_KEY}[{index}]", "name"), file)
        stages.append(stage)
    return base, stages


def stage_config(base: Mapping[str, Any], stage: Stage, previous: str | None) -> dict[str, Any]:
    """The base config with the stage's overrides, ``{previous}`` substituted."""
    def subst(value: Any) -> Any:
        if isinstance(value, str) and PREVIOUS in value:
            if previous is None:
                raise ConfigError(f"stage {stage.name!r} refers to {PREVIOUS} but it is the first stage", (STAGES_KEY,))
            return value.replace(PREVIOUS, previous)
        if isinstance(value, list):
            return [subst(v) for v in value]
        if isinstance(value, dict):
            return {k: subst(v) for k, v in value.items()}
        return value

    items = [([k.strip() for k in key.split(".")], subst(value), f"{stage.name}: {key}") for key, value in stage.set.items()]
    return set_keys(base, items)


def load(path: str | Path, overrides: Sequence[str] = ()) -> Experiment:
    """Read, override and resolve an experiment file."""
    raw = read_toml(path)
    try:
        raw = apply_overrides(raw, overrides)
    except ConfigError as exc:
        raise exc.within(file=str(path)) from None
    return resolve(raw, file=str(path))


def dumps(experiment: Experiment) -> str:
    """The resolved experiment as TOML text (None-valued keys omitted: they are defaults)."""
    import tomli_w

    def clean(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {k: clean(v) for k, v in value.items() if v is not None}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    return tomli_w.dumps(clean(experiment.to_dict()))
