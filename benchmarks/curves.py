"""Validation and pseudo-label curves of a bench's runs as text, for an evidence folder (the run folders are not kept).

Why: the bench's figures need the run folders; an evidence folder keeps results.csv and this text. For each run under
RUNS (a bench's `runs/` folder or any folder holding run folders), one line per validation: each predictor's
validation Dice and, with the pseudo-label monitor, each labeller's Dice and confident coverage against the unlabelled
cases' withheld labels.

    python benchmarks/curves.py bench/la2d/runs > docs/evidence/la2d-recipe/curves.txt
"""

from __future__ import annotations

import argparse
from pathlib import Path

from superdiffusion.runlog import log_entries


def run_curve(run_dir: Path) -> list[str]:
    lines = []
    for entry in log_entries(run_dir / "log.jsonl"):
        val = {k.removeprefix("val_dice_"): v for k, v in entry.items() if k.startswith("val_dice_")}
        if not val:
            continue
        text = f"  {entry['step']}: val " + ", ".join(f"{k} {v:.3f}" for k, v in val.items())
        pseudo = {k.removeprefix("pl_"): v for k, v in entry.items()
                  if k.startswith("pl_") and k.endswith(("_dice", "_coverage")) and not k.endswith("_confident")}
        if pseudo:
            text += " | pseudo-labels " + ", ".join(f"{k} {v:.3f}" for k, v in pseudo.items())
        lines.append(text)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, help="a folder holding run folders (searched recursively)")
    args = parser.parse_args()
    for log in sorted(args.runs.rglob("log.jsonl")):
        run = log.parent
        if run.name == "pretrain":  # SuperDiffusion's stage 1: no validation
            continue
        state = "finished" if (run / "DONE").is_file() else "unfinished"
        print(f"{run.relative_to(args.runs)} ({state}):")
        print("\n".join(run_curve(run)) or "  no validation logged")


if __name__ == "__main__":
    main()
