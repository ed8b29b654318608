"""``flowforge compare RUN_DIR...``: one table of several runs and their loss curves in one plot.

The table has one row per run: its name, the config keys whose values differ
between the runs (dotted paths of config.toml, e.g. ``objective.time_sampler``),
and the numbers of summary.json (final loss, steps, speed, metrics, and each
metric's floor). Written as ``OUT/compare.md`` and ``OUT/compare.csv``
(``OUT`` defaults to ``./compare``) and printed.

``OUT/compare.png`` plots each run's training loss against the step from
metrics.jsonl; when the runs log the loss by time bin (``loss_bin/...`` keys,
as minRF does) a second panel shows each run's mean loss per bin over its last
quarter of logged steps, and metrics evaluated during training (``eval/...``
keys at several steps) get a panel each.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

NAME = "compare"
HELP = "compare runs: config differences and summaries in one table, loss curves in one plot"

#: summary.json numbers shown for every run (when present), in this order.
SUMMARY_KEYS = ("steps", "final_loss", "train_wall_time_s", "steps_per_s", "nfe")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories written by flowforge run")
    parser.add_argument("--out", default="compare", help="output folder (default ./compare)")
    parser.add_argument("--all-keys", action="store_true", help="show every config key, not only those that differ")


def differing_keys(configs: Sequence[Mapping[str, Any]]) -> list[str]:
    """Keys (in first-seen order) whose values are not the same in every config.

    A key some config lacks counts only when its component is the same plugin in every config: where
    the plugins differ (``solver.plugin = "ode"`` vs ``"ddim"``), the ``plugin`` column says it all
    and each plugin's own options would only add empty cells.
    """
    keys: dict[str, None] = {}
    for cfg in configs:
        keys.update(dict.fromkeys(cfg))
    missing = object()

    def differs(key: str) -> bool:
        return len({repr(cfg.get(key, missing)) for cfg in configs}) > 1

    def explained_by_plugin(key: str) -> bool:
        owner = key.rsplit(".", 1)[0] + ".plugin" if "." in key else None
        return (owner is not None and owner != key and differs(owner)
                and any(key not in cfg for cfg in configs))

    return [k for k in keys if differs(k) and not explained_by_plugin(k)]


def _read_config(root: Path) -> dict[str, Any]:
    from core.config import read_toml

    path = root / "config.toml"
    return read_toml(path) if path.is_file() else {}


def loss_bins(records: Sequence[Mapping[str, Any]]) -> list[tuple[str, float]]:
    """(bin key, mean value over the last quarter of the records that log it), bins in numeric order."""
    keys = sorted({k for r in records for k in r if k.startswith("loss_bin/")}, key=_bin_order)
    out = []
    for key in keys:
        values = [r[key] for r in records if isinstance(r.get(key), (int, float))]
        if values:
            tail = values[-max(1, len(values) // 4):]
            out.append((key, sum(tail) / len(tail)))
    return out


def _bin_order(key: str) -> tuple[float, str]:
    m = re.search(r"[-+]?\d*\.?\d+(?:[eE][-+]?\d+)?", key.split("/", 1)[-1])
    return (float(m.group()) if m else float("inf"), key)


def plot(runs: Sequence[tuple[str, list[dict[str, Any]]]], path: Path) -> Path:
    """Loss curves of every run; loss by time bin and eval/ metrics over training when logged."""
    from core.runs import pyplot

    plt = pyplot()
    eval_keys = sorted({k for _, recs in runs for r in recs for k in r if k.startswith("eval/")})
    eval_keys = [k for k in eval_keys if max(sum(1 for r in recs if k in r) for _, recs in runs) > 1]
    has_bins = any(loss_bins(recs) for _, recs in runs)
    panels = ["loss", *(["loss_bin"] if has_bins else []), *eval_keys]
    cols = min(3, len(panels))
    nrows = -(-len(panels) // cols)
    fig, axs = plt.subplots(nrows, cols, figsize=(4.6 * cols, 3.5 * nrows), dpi=100, squeeze=False)
    for ax, panel in zip(axs.flat, panels):
        for label, recs in runs:
            if panel == "loss_bin":
                bins = loss_bins(recs)
                if bins:
                    ax.plot(range(len(bins)), [v for _, v in bins], marker="o", label=label)
                    ax.set_xticks(range(len(bins)), [k.split("/", 1)[1] for k, _ in bins], rotation=45, fontsize=7)
                continue
            pts = [(r["step"], r[panel]) for r in recs if isinstance(r.get(panel), (int, float)) and "step" in r]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label, marker="." if panel != "loss" else None)
        if panel == "loss":
            ax.set_yscale("log")
            ax.set_title("training loss", fontsize=9)
            ax.set_xlabel("step")
        elif panel == "loss_bin":
            ax.set_title("loss by time bin (last quarter of training)", fontsize=9)
            ax.set_xlabel("time bin")
        else:
            ax.set_title(panel, fontsize=9)
            ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axs.flat)[len(panels):]:
        ax.axis("off")
    axs.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def main(args: argparse.Namespace) -> int:
    from core.rundir import RunDir
    from core.runs import flatten, read_summary, write_table
    from registry import ConfigError

    roots = [Path(r) for r in args.runs]
    for root in roots:
        if not root.is_dir():
            raise ConfigError(f"run directory not found: {root}")
        if not (root / "config.toml").is_file() and not (root / "summary.json").is_file():
            raise ConfigError(f"{root} is not a flowforge run directory (no config.toml or summary.json)")
    configs = [flatten(_read_config(r)) for r in roots]
    summaries = [read_summary(r) for r in roots]
    labels = [str(r) for r in roots]
    cfg_keys = list(dict.fromkeys(k for c in configs for k in c)) if args.all_keys else differing_keys(configs)
    rows: list[dict[str, Any]] = []
    metric_cols: dict[str, None] = {}
    for label, cfg, summary in zip(labels, configs, summaries):
        row: dict[str, Any] = {"run": label}
        row.update({k: cfg.get(k) for k in cfg_keys})
        row.update({k: summary.get(k) for k in SUMMARY_KEYS})
        for group, suffix in (("metrics", ""), ("floor", " (floor)")):
            for k, v in (summary.get(group) or {}).items():
                row[k + suffix] = v
                metric_cols[k + suffix] = None
        rows.append(row)
    summary_cols = [k for k in SUMMARY_KEYS if any(r.get(k) is not None for r in rows)]
    # each metric followed by its floor
    ordered = sorted(metric_cols, key=lambda k: (k.removesuffix(" (floor)"), k.endswith(" (floor)")))
    columns = ["run", *cfg_keys, *summary_cols, *ordered]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    preamble = (f"# Comparison of {len(roots)} runs\n\nConfig columns: the keys of config.toml whose values differ; "
                f"metric columns: summary.json (\"(floor)\": data vs data).")
    files = write_table(rows, columns, out / "compare", preamble)
    files.append(plot([(label, RunDir(r).read_metrics()) for label, r in zip(labels, roots)], out / "compare.png"))
    print((out / "compare.md").read_text())
    print("wrote " + ", ".join(str(f) for f in files))
    return 0
