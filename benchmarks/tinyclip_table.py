"""TinyCLIP: teacher vs distilled student vs the same student trained from scratch.

    python benchmarks/tinyclip_table.py [--out runs/tinyclip-table] [--short] [--set KEY=VALUE ...]

Runs experiments/tinyclip_teacher.toml, then tinyclip_distill.toml (affinity
mimicking + weight inheritance from that teacher) and tinyclip_scratch.toml
(the same student, contrastive loss, same steps), and prints a markdown table
of parameters, zero-shot top-1/top-5 accuracy and retrieval recall@1/5 on the
held-out pairs (also written to OUT/table.md and OUT/table.json). ``--short``
runs a few dozen steps of each: a smoke test, not a comparison.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from plugins.tinyclip.table import compare, markdown


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/tinyclip-table", help="folder for the three run directories")
    parser.add_argument("--short", action="store_true", help="a few dozen steps per run (smoke test)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override for all three runs (repeatable)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    rows = compare(args.out, args.overrides, short=args.short)
    print(markdown(rows))
    print(f"total wall time {time.perf_counter() - start:.0f} s; table in {Path(args.out) / 'table.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
