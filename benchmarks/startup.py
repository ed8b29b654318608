"""Start-up cost: `flowforge plugins` and `python -m core.run --help` against `python -c "import torch"`.

    python benchmarks/startup.py [--repeats 5] [--json]

Each command runs in a fresh interpreter; the median wall time of interleaved repeats is reported with
its difference to importing torch alone (goal: at most +0.5 s). Plugins are discovered through their
light hook modules; heavy modules load only when a component is built.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import _common
from _common import emit, table

COMMANDS = {
    "import torch": [sys.executable, "-c", "import torch"],
    "flowforge plugins": [sys.executable, "-m", "core.cli", "plugins"],
    "python -m core.run --help": [sys.executable, "-m", "core.run", "--help"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    times: dict[str, list[float]] = {k: [] for k in COMMANDS}
    for _ in range(args.repeats):
        for name, cmd in COMMANDS.items():
            t0 = time.perf_counter()
            subprocess.run(cmd, cwd=_common.ROOT, capture_output=True, check=True)
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["import torch"]
    figures = {k: {"seconds": v, "over_import_torch": v - base} for k, v in med.items()}
    rows = [[k, v, v - base] for k, v in med.items()]
    emit(figures, "start-up (median of %d)\n" % args.repeats + table(["command", "seconds", "over import torch"], rows),
         args.json)


if __name__ == "__main__":
    main()
