"""Paired per-case comparison of two methods from bench results.csv files (they may come from different benches).

Why: a variant run in its own bench folder (`bench --set ...`) is compared with the runs of another bench on the same
validation cases (same protocol, fraction and seeds, hence the same splits), as the bench's own summary compares the
methods of one folder: mean per seed, mean over cases, and the Wilcoxon signed-rank test over the paired cases.

    python benchmarks/compare_results.py A/results.csv:superdiffusion docs/evidence/la2d/results.csv:supervised \
        --fraction 8 --metric dice
"""

from __future__ import annotations

import argparse
from statistics import mean

import numpy as np

from superdiffusion.bench.report import read_results, wilcoxon_p


def load(spec: str, fraction: str, metric: str) -> dict[tuple[int, str], float]:
    """FILE:METHOD -> {(seed, case): metric} over the run's own predictor (chosen = 1)."""
    path, _, method = spec.rpartition(":")
    return {(r["seed"], r["case"]): r[metric] for r in read_results(path)
            if r["method"] == method and f"{r['fraction']:g}" == fraction and r["chosen"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", help="FILE:METHOD, e.g. runs/results.csv:superdiffusion")
    parser.add_argument("b", help="FILE:METHOD to compare against")
    parser.add_argument("--fraction", default="8", help="the results.csv fraction column (default 8)")
    parser.add_argument("--metric", default="dice", choices=["dice", "jaccard", "hd95", "asd"])
    args = parser.parse_args()
    a, b = (load(spec, args.fraction, args.metric) for spec in (args.a, args.b))
    pairs = sorted(set(a) & set(b))
    if not pairs:
        raise SystemExit(f"no case of fraction {args.fraction} is in both {args.a} and {args.b}")
    for seed in sorted({s for s, _ in pairs}):
        cases = [p for p in pairs if p[0] == seed]
        print(f"seed {seed}: {mean(a[p] for p in cases):.3f} vs {mean(b[p] for p in cases):.3f} ({len(cases)} cases)")
    diff = [a[p] - b[p] for p in pairs]
    print(f"{args.metric}: {mean(a[p] for p in pairs):.4f} vs {mean(b[p] for p in pairs):.4f}, difference "
          f"{mean(diff):+.4f}, {sum(d > 0 for d in diff)} of {len(diff)} cases higher, Wilcoxon p = "
          f"{wilcoxon_p(np.array(diff))}")  # the bench summary's test, with its n/a reasons


if __name__ == "__main__":
    main()
