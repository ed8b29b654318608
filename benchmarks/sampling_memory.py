"""Peak memory of ``flowforge sample -n N --npz`` as N grows: streaming keeps it flat.

Trains a tiny digits run (rectified flow, 8x8 images), then samples it with -n 500 (the baseline) and
larger counts, each in a fresh process, and reports the peak resident set size of each relative to the
baseline's. Before streaming, every sample was kept in memory and rendered into one PNG (measured at
3.4 GB for 4,000 CIFAR-sized images); now one block and the --grid samples are held.

    python benchmarks/sampling_memory.py [--counts 500,5000,20000] [--out docs/results/sampling_memory.md]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import ROOT, table

CHILD = ("import resource, sys; from core.cli import main; rc = main(sys.argv[1:]); "
         "print('PEAK_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)")


def peak_kb(run: Path, n: int, out: Path) -> int:
    proc = subprocess.run([sys.executable, "-c", CHILD, "sample", str(run), "-n", str(n), "--npz", "--batch-size", "500",
                           "--out", str(out / f"n{n}")], cwd=ROOT, capture_output=True, text=True, check=True)
    return int(proc.stdout.split("PEAK_KB")[1].split()[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="500,5000,20000")
    parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "sampling_memory.md"))
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run([sys.executable, "-m", "core.run", "experiments/rf_digits.toml", "--out", str(tmp / "run"),
                        "--set", "trainer.steps=5", "--set", "metrics=[]", "--set", "eval.num_pictures=0"],
                       cwd=ROOT, check=True, capture_output=True)
        peaks = {n: peak_kb(tmp / "run", n, tmp) for n in counts}
        sizes = {n: (tmp / f"n{n}.npz").stat().st_size for n in counts}
    base = peaks[counts[0]]
    rows = [[n, round(peaks[n] / 1024, 1), round(peaks[n] / base, 3), round(sizes[n] / 1024, 1)] for n in counts]
    text = ("# Peak memory of `flowforge sample -n N --npz` (rf_digits, 8x8 images, blocks of 500)\n\n"
            f"Each count in a fresh process; ratio = peak RSS / peak RSS at -n {counts[0]}.\n\n"
            + table(["N", "peak RSS (MiB)", "ratio", "npz (KiB)"], rows) + "\n")
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
