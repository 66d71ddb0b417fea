"""`superdiffusion demo`: the supervised baseline, the teacher-less control (`fixmatch`: SuperDiffusion's
student path with no diffusion teacher) and SuperDiffusion on the built-in synthetic data, same labelled cases,
same validation split, same co-training step budget, side by side: what SuperDiffusion gains over supervised,
and how much of it the diffusion teacher adds over the control."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..bench.report import wilcoxon_p
from ..config import load_config
from ..engine.run import mean_table, train_run

COLUMNS = ("dice", "jaccard", "hd95", "asd")
METHODS = ("supervised", "fixmatch", "superdiffusion")
NAMES = {"supervised": "supervised", "fixmatch": "the teacher-less control", "superdiffusion": "SuperDiffusion"}


def run_demo(out: Path, *, steps: int | None = None, progress: bool = True) -> dict[str, dict]:
    """Train the three methods (resuming finished or interrupted demo runs), print and save a table."""
    rows, per_case = {}, {}
    for method in METHODS:
        overrides = [f"method={method}"]
        if steps:  # a quick look: pre-training capped too, as `bench --steps` caps it
            pretrain = load_config("demo")["superdiffusion"]["pretrain_steps"]
            overrides += [f"train.steps={steps}", f"superdiffusion.pretrain_steps={min(pretrain, steps)}"]
        cfg = load_config("demo", overrides)
        run_dir = out / method
        if (run_dir / "DONE").is_file() and (run_dir / "results.json").is_file():
            results = json.loads((run_dir / "results.json").read_text())
        else:
            results = train_run(cfg, run_dir, resume=(run_dir / "config.yaml").is_file(), progress=progress)
        rows[method] = {**mean_table(results), "predictor": results["predictor"],
                        "steps": results["steps"], "wall_time_s": results["wall_time_s"]}
        per_case[method] = {case: m["dice"] for case, m in results["val"][results["predictor"]]["per_case"].items()}
    split = results["split"]
    table = format_table(rows, n_lab=len(split["labelled"]), n_unlab=len(split["unlabelled"]),
                         n_val=len(split["val"]), seed=cfg["seed"], checkpoint=results["checkpoint_rule"])
    table += "\n\n" + "\n".join(gain_line(per_case[a], per_case[b], NAMES[a], NAMES[b]) for a, b in
                                  [("superdiffusion", "supervised"), ("fixmatch", "supervised"),
                                   ("superdiffusion", "fixmatch")])
    print(table)
    (out / "summary.md").write_text(table + "\n")
    return rows


def gain_line(method: dict[str, float], reference: dict[str, float], name: str = "SuperDiffusion",
              reference_name: str = "supervised") -> str:
    """One method's Dice minus another's, per validation case (paired), in one sentence."""
    d = np.array([method[c] - reference[c] for c in sorted(set(method) & set(reference))])
    verdict = f"gains {d.mean():+.3f} Dice over" if d.mean() > 0 else f"loses {-d.mean():.3f} Dice to"
    return (f"{name[0].upper() + name[1:]} {verdict} {reference_name}: better on "
            f"{int((d > 0).sum())} of {len(d)} validation cases (paired Wilcoxon p = {wilcoxon_p(d)}).")


def format_table(rows: dict[str, dict], *, n_lab: int, n_unlab: int, n_val: int, seed: int, checkpoint: str) -> str:
    lines = [f"Synthetic 2D demo: {n_lab} labelled + {n_unlab} unlabelled training cases, {n_val} validation "
             f"cases (split seed {seed}, training seed {seed}); checkpoint = {checkpoint}, "
             "threshold = argmax. Validation metrics (HD95/ASD in pixels):", "",
             "| method | predictor | Dice | Jaccard | HD95 | ASD | steps | wall time (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['predictor']} | {r['dice']:.3f} | {r['jaccard']:.3f} | {r['hd95']:.2f} | "
                     f"{r['asd']:.2f} | {r['steps']} | {r['wall_time_s']:.0f} |")
    return "\n".join(lines)
