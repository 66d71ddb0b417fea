"""The bench summary's tables recomputed from a results.csv alone (no run folders needed).

Why: an evidence folder's results.csv gathers rows from several benches (runs made in later benches are appended
to it, their run folders gone); its summary.md, written by the bench that made the first runs, then lags. This
prints, as markdown, the main table (mean ± std over seeds), the paired per-case Wilcoxon tests against supervised
and against SuperDiffusion, and the wall time per run, from every row of the file.

    python benchmarks/results_tables.py docs/evidence/la2d/results.csv > docs/evidence/la2d/tables.md
"""

from __future__ import annotations

import argparse
from pathlib import Path

from superdiffusion.bench.report import read_results, tables_from_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="a bench results.csv")
    parser.add_argument("--title", default="Tables from results.csv")
    args = parser.parse_args()
    print(tables_from_rows(read_results(args.results), args.title, Path(args.results).name), end="")


if __name__ == "__main__":
    main()
