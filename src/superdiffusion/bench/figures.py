"""Figures: Dice vs labelled fraction, validation curves (is the budget long enough?), one bar chart per ablation,
the qualitative figure (paper fig. 3) and an overlay grid (every method's outline beside the label's).

Matplotlib's object API with the Agg canvas: no pyplot state, no display needed.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..data.case import Case
from ..data.pipeline import load_cases
from ..errors import InputError
from ..evaluation.evaluate import draw_overlay, largest_sections, preview_views
from ..evaluation.inference import predict_probabilities, segment
from ..evaluation.predict import load_run
from ..runlog import log_entries
from .protocols import REFERENCE
from .report import seed_stats, table_rows


def _save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120, bbox_inches="tight")


def write_figures(bench, rows: list[dict]) -> None:
    what = f"{'test' if bench.test else 'validation'} Dice, mean ± std over {len(bench.seeds)} seed(s)"
    picked, key = table_rows(rows, bench.methods)
    dice_vs_fraction(seed_stats(picked, key), bench.methods, bench.fractions, bench.out / "dice_vs_fraction.png",
                     f"{bench.protocol.name}: {what}")
    for a in bench.ablations:
        picked, key = table_rows(rows, bench.labels(a), a)
        keys = [f"{label} ({p})" for label in bench.labels(a) for p in a.predictors] if a.predictors \
            else bench.labels(a)
        ablation_bars(seed_stats(picked, key), keys, bench.fractions, bench.out / f"ablation_{a.name}.png",
                      f"{bench.protocol.name}, ablation {a.name}: {what}")
    validation_curves(bench, bench.out / "val_curves.png")
    pseudo_label_curves(bench, bench.out / "pseudo_labels.png")
    qualitative(bench)
    overlay_grid(bench)


def read_curve(run_dir: Path) -> list[tuple[int, float]]:
    """(step, best validation Dice over the run's predictors) from log.jsonl; [] without periodic validation."""
    points = []
    for entry in log_entries(run_dir / "log.jsonl"):
        scores = [v for k, v in entry.items() if k.startswith("val_dice_")]
        if scores:
            points.append((int(entry["step"]), max(scores)))
    return points


def validation_curves(bench, path: Path) -> Path | None:
    """Validation Dice against the step, one line per finished run (colour = method and fraction): where the
    curves flatten, the budget is long enough; validation monitors, the reported checkpoint is the protocol's."""
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    colours: dict[str, str] = {}
    cycle = iter([f"C{i % 10}" for i in range(1000)])
    for spec in bench.runs():
        curve = read_curve(spec.run_dir) if (spec.run_dir / "DONE").is_file() else []
        if not curve:
            continue
        frac = "all" if spec.run_dir.parent.name == "fracall" else f"{spec.fraction:g}"
        name = f"{spec.label}, {frac}"
        first = name not in colours
        colour = colours.setdefault(name, next(cycle))
        x, y = zip(*curve)
        ax.plot(x, y, marker="o", ms=3, color=colour, alpha=0.8, label=name if first else None)
    if not colours:
        return None
    ax.set_xlabel("step")
    ax.set_ylabel("validation Dice (monitoring only)")
    ax.set_title(f"{bench.protocol.name}: validation Dice during training, one line per run and seed", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)
    return path


def read_pseudo_labels(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """{labeller: [(step, Dice of its pseudo-labels against the withheld labels)]} from log.jsonl's `pl_<labeller>_dice`
    entries (eval.monitor_pseudo_labels); {} for a run without the monitor."""
    curves: dict[str, list[tuple[int, float]]] = {}
    for entry in log_entries(run_dir / "log.jsonl"):
        for k, v in entry.items():
            if k.startswith("pl_") and k.endswith("_dice"):
                curves.setdefault(k[3:-5], []).append((int(entry["step"]), float(v)))
    return curves


def pseudo_label_curves(bench, path: Path) -> Path | None:
    """The pseudo-label monitor: each labeller's pseudo-label Dice on unlabelled slices against their withheld
    labels, one line per run (colour = method, fraction and labeller): which labels the student learns from, and
    how good they are. Monitoring only; those labels never reach a loss."""
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    colours: dict[str, str] = {}
    cycle = iter([f"C{i % 10}" for i in range(1000)])
    for spec in bench.runs():
        if not (spec.run_dir / "DONE").is_file():
            continue
        frac = "all" if spec.run_dir.parent.name == "fracall" else f"{spec.fraction:g}"
        for labeller, curve in read_pseudo_labels(spec.run_dir).items():
            name = f"{spec.label}, {frac}: {labeller}"
            first = name not in colours
            x, y = zip(*curve)
            ax.plot(x, y, marker="o", ms=3, color=colours.setdefault(name, next(cycle)), alpha=0.8,
                    label=name if first else None)
    if not colours:
        return None
    ax.set_xlabel("step")
    ax.set_ylabel("pseudo-label Dice vs withheld labels")
    ax.set_title(f"{bench.protocol.name}: pseudo-label quality on unlabelled slices, one line per run and seed",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)
    return path


def dice_vs_fraction(stats: dict, keys: list[str], fractions: list, path: Path, title: str) -> None:
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for k in keys:
        pts = [(f, *stats[(k, f)]["dice"][:2]) for f in fractions if (k, f) in stats]
        if pts:
            x, y, e = map(np.asarray, zip(*pts))
            ax.errorbar(x, y, yerr=np.nan_to_num(e), marker="o", capsize=3, label=k)
    ax.set_xlabel("labelled fraction (or count) of the training pool")
    ax.set_ylabel("Dice")
    ax.set_xticks(list(fractions))
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    _save(fig, path)


def ablation_bars(stats: dict, keys: list[str], fractions: list, path: Path, title: str) -> None:
    fig = Figure(figsize=(max(5.0, 0.9 * len(keys) * len(fractions) + 2), 4))
    ax = fig.add_subplot()
    width = 0.8 / max(len(fractions), 1)
    x = np.arange(len(keys))
    for i, f in enumerate(fractions):
        y = [stats[(k, f)]["dice"][0] if (k, f) in stats else np.nan for k in keys]
        e = [np.nan_to_num(stats[(k, f)]["dice"][1]) if (k, f) in stats else 0 for k in keys]
        ax.bar(x + (i - (len(fractions) - 1) / 2) * width, y, width, yerr=e, capsize=3, label=f"fraction {f:g}")
    ax.set_xticks(x, keys, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("Dice")
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path)


# ------------------------------------------------------------------------------------------ qualitative
def _slice_case(case: Case, cfg: dict) -> tuple[Case, dict, int]:
    """For a 2D network on a 3D case, only the slice with the most foreground: cheap, same preprocessing."""
    d = cfg["data"]
    if not (d["dims"] == 2 and case.spatial_dims == 3):
        return case, d, d["dims"]
    axis = d["slice_axis"]
    k = best_slice(case.label, axis)
    scale = None if d["scale"] is None else [s for a, s in enumerate(d["scale"]) if a != axis]
    size = None if d["size"] is None else [s for a, s in enumerate(d["size"]) if a != axis]
    spacing = tuple(s for a, s in enumerate(case.spacing) if a != axis)
    sliced = Case(case.id, np.take(case.image, k, axis=1 + axis), np.take(case.label, k, axis=axis), spacing,
                  case.source, case.meta)
    return sliced, {**copy.deepcopy(d), "scale": scale, "size": size}, 2


def best_slice(volume_label: np.ndarray, axis: int) -> int:
    """The slice along `axis` with the most foreground."""
    return int(np.argmax((volume_label > 0).sum(axis=tuple(a for a in range(3) if a != axis))))


def qualitative_cases(bench, spec, n: int) -> list[Case]:
    """A few validation cases of the run (test cases when it has no validation split)."""
    results = json.loads((spec.run_dir / "results.json").read_text())
    ids = results["split"]["val"][:n]
    if ids:
        return load_cases(spec.cfg["data"], ids)
    if bench.test is not None:
        return load_cases(bench.test.data_cfg, bench.test.ids[:n])
    return []


def qualitative(bench, n_cases: int | None = None) -> Path | None:
    """Image, teacher pseudo-label, student prediction, ground truth and teacher uncertainty (ensemble std)
    for a few validation cases of the first finished SuperDiffusion run that still has its checkpoints (first
    fraction, first seed, unless its checkpoints were left behind, as when runs are copied back from a GPU)."""
    path = bench.out / "qualitative.png"
    for spec in bench.specs:
        if spec.method == REFERENCE and (spec.run_dir / "DONE").is_file():
            try:
                run = load_run(spec.run_dir)
                break
            except InputError:  # checkpoint not found
                continue
    else:
        return None
    cfg, teacher, preds = run.cfg, run.method.teacher, run.method.predictors()
    dc, ec = cfg["diffusion"], cfg["eval"]

    def uncertainty(x: torch.Tensor) -> torch.Tensor:
        """The ensemble std u as logits [log u, log(1 - u)]: softmax gives u back through the usual inference."""
        u = teacher.predict_ensemble(x, samples=dc["ensemble"], t=dc["t_infer"], noise_seed=dc["noise_seed"])[1]
        return torch.cat([u.clamp_min(1e-6).log(), (1 - u).clamp_min(1e-6).log()], 1)

    cases = qualitative_cases(bench, spec, n_cases or int(bench.protocol.bench["qualitative_cases"]))
    if not cases:
        return None
    titles = ("image", "teacher pseudo-label", "student prediction", "ground truth", "teacher uncertainty")
    fig = Figure(figsize=(2.3 * len(titles), 2.3 * len(cases)))
    axes = fig.subplots(len(cases), len(titles), squeeze=False)
    for row, case in zip(axes, cases):
        view, data_cfg, dims = _slice_case(case, cfg)

        def probs(fn, view=view, data_cfg=data_cfg, dims=dims) -> np.ndarray:
            return predict_probabilities(fn, view, data_cfg=data_cfg, dims=dims, patch=cfg["train"]["patch"],
                                         overlap=ec["overlap"], sw_batch_size=ec["sw_batch_size"],
                                         device=run.device)

        panels = [view.image[0], segment(probs(preds["teacher"])), segment(probs(preds["student"])), view.label,
                  probs(uncertainty)[0]]
        if view.spatial_dims == 3:  # a 3D network: whole-volume inference, then the most-foreground slice
            axis = cfg["data"]["slice_axis"]
            k = best_slice(view.label, axis)
            panels = [np.take(p, k, axis=axis) for p in panels]
        lo, hi = np.percentile(panels[0], [0.5, 99.5])
        for ax, title, img in zip(row, titles, panels):
            kw = {"cmap": "gray", "vmin": lo, "vmax": hi} if title == "image" else \
                {"cmap": "magma", "vmin": 0, "vmax": max(float(img.max()), 1e-3)} if title.endswith("uncertainty") \
                else {"cmap": "viridis", "vmin": 0, "vmax": max(cfg["data"]["num_classes"] - 1, 1)}
            ax.imshow(np.asarray(img, dtype=np.float32).T, origin="lower", interpolation="nearest", **kw)
            ax.set_xticks([])
            ax.set_yticks([])
        row[0].set_ylabel(case.id, fontsize=8)
    for ax, title in zip(axes[0], titles):
        ax.set_title(title, fontsize=9)
    fig.suptitle(f"{bench.protocol.name}: {spec.label}, fraction {spec.fraction:g}, seed {spec.seed} "
                 f"(checkpoint {run.checkpoint.stem})", fontsize=9)
    _save(fig, path)
    return path


def overlay_grid(bench, n_cases: int | None = None) -> Path | None:
    """overlays.png: for a few validation cases of the first fraction and seed, each method's prediction (red) outlined
    beside the label's (green); a volume as three orthogonal slices through the label's largest cross-sections, a 2D
    picture as a photograph (RGB in colour). Methods whose run is unfinished or kept no checkpoint are left out."""
    first = [s for s in bench.specs if s.fraction == bench.fractions[0] and s.seed == bench.seeds[0]
             and s.ablation is None and (s.run_dir / "DONE").is_file()]
    runs = {}
    for spec in first:
        try:
            runs[spec.label] = (spec, load_run(spec.run_dir))
        except InputError:  # checkpoint not found (runs copied back without them)
            continue
    if not runs:
        return None
    spec0 = next(iter(runs.values()))[0]
    cases = qualitative_cases(bench, spec0, n_cases or int(bench.protocol.bench["qualitative_cases"]))
    if not cases:
        return None
    rows = []  # (name, image, label, {method: prediction}, photo, aspect): one per picture
    for case in cases:
        masks = {label: segment(run.probabilities(case)) for label, (_, run) in runs.items()}
        photo = case.spatial_dims == 2
        image = case.image if photo and len(case.image) == 3 else case.image[0]
        if photo:
            rows.append((case.id, image, case.label, masks, True, float(case.spacing[0]) / float(case.spacing[1])))
            continue
        # predict's preview slices (the label's largest sections, in the case's spacing); the masks cut alike
        for (axis, k), (view, label, aspect) in zip(largest_sections(case.label),
                                                    preview_views(image, case.label, case.spacing), strict=True):
            rows.append((f"{case.id}\naxis {axis}, slice {k}", view, label,
                         {m: np.take(p, k, axis=axis) for m, p in masks.items()}, False, aspect))
    fig = Figure(figsize=(2.4 * len(runs), 2.4 * len(rows)))
    axes = fig.subplots(len(rows), len(runs), squeeze=False)
    for ax_row, (name, image, label, masks, photo, aspect) in zip(axes, rows):
        window = tuple(np.percentile(image, [0.5, 99.5]))
        for ax, mask in zip(ax_row, masks.values()):
            draw_overlay(ax, image, [(label > 0, "lime"), (mask > 0, "red")], window=window, aspect=aspect,
                         photo=photo)
        ax_row[0].set_axis_on()
        ax_row[0].set_xticks([])
        ax_row[0].set_yticks([])
        ax_row[0].set_ylabel(name, fontsize=7)
    for ax, method in zip(axes[0], runs):
        ax.set_title(method, fontsize=9)
    fig.suptitle(f"{bench.protocol.name}: label (green) and prediction (red), fraction {bench.fractions[0]:g}, "
                 f"seed {bench.seeds[0]}, each run's reported checkpoint", fontsize=9)
    path = bench.out / "overlays.png"
    _save(fig, path)
    return path
