"""`superdiffusion report DIR --out report.html`: one self-contained HTML file for a run or a bench folder.

Everything is inline (CSS, and figures as base64 PNGs), so the file can be mailed or attached as it is.
A run folder gives its protocol and split, validation metrics, learning curves (log.jsonl) and overlays of a
few validation cases; a bench folder gives its summary (tables, statistics), its figures (Dice against the
labelled cases, validation curves, ablations, qualitative) and the overlays of its first finished run.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import re
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..config import read_stored_config
from ..errors import InputError
from ..outputs import check_output_file
from ..runlog import log_entries

STYLE = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1100px;
       color: #222; line-height: 1.45; padding: 0 1em; }
h1 { font-size: 1.6em; border-bottom: 2px solid #1f77b4; padding-bottom: .2em; }
h2 { font-size: 1.25em; margin-top: 1.6em; color: #1f4e79; }
table { border-collapse: collapse; margin: .6em 0; font-size: .9em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: left; }
th { background: #eef3f8; }
code { background: #f3f3f3; padding: 0 .25em; border-radius: 3px; }
img { max-width: 100%; border: 1px solid #ddd; margin: .4em 0; }
.note { color: #555; font-size: .9em; }
"""


def write_report(folder: str | Path, out: str | Path) -> Path:
    """Write the report of a run folder or a bench folder to `out` (never over an existing file)."""
    folder, out = Path(folder), check_output_file(out)  # before any figure is drawn
    if not folder.is_dir():
        raise InputError(f"{folder}: folder not found")
    if (folder / "config.yaml").is_file():
        title, body = f"Run {folder.name}", run_sections(folder)
    elif (folder / "summary.md").is_file():
        title, body = f"Benchmark {folder.name}", bench_sections(folder)
    else:
        raise InputError(f"{folder}: neither a run folder (config.yaml) nor a bench folder (summary.md)")
    page = (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>\n<h1>{html.escape(title)}</h1>\n{body}\n"
            "<p class=\"note\">Made by <code>superdiffusion report</code>.</p></body></html>\n")
    tmp = out.with_name(f".tmp-{os.getpid()}-{out.name}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(page, encoding="utf-8")
        tmp.replace(out)
    except OSError as err:  # e.g. the disk filled up while the figures were drawn
        raise InputError(f"{out}: could not write the report ({err.strerror or type(err).__name__})") from err
    finally:
        tmp.unlink(missing_ok=True)
    return out


# ------------------------------------------------------------------------------------------------ a run
def run_sections(run_dir: Path) -> str:
    cfg = read_stored_config(run_dir / "config.yaml")
    results = json.loads((run_dir / "results.json").read_text()) if (run_dir / "results.json").is_file() else None
    split = json.loads((run_dir / "split.json").read_text()) if (run_dir / "split.json").is_file() else {}
    parts = ["<h2>Protocol</h2>", table(["key", "value"], [[k, v] for k, v in protocol_rows(cfg)])]
    if split:
        parts += ["<h2>Split</h2>", table(["part", "cases", "ids"], [
            [k, len(split.get(k, [])), ", ".join(split.get(k, []))] for k in ("labelled", "unlabelled", "val")])]
    if results is None:
        parts.append("<p><b>Not finished</b>: no results.json yet; the curves show the steps logged so far.</p>")
    elif "val" in results:
        parts += ["<h2>Validation metrics</h2>",
                  f"<p>Checkpoint: {html.escape(results['checkpoint_rule'])}; threshold: "
                  f"{html.escape(results['threshold'])}; reported predictor: <b>{html.escape(results['predictor'])}"
                  f"</b>; HD95 and ASD in the images' spacing units; wall time "
                  f"{results.get('wall_time_s', '?')} s.</p>",
                  table(["predictor", "Dice", "Jaccard", "HD95", "ASD", "cases"],
                        [[name, *(f"{v['mean'][m]['mean']:.4f} ± {v['mean'][m]['std']:.4f}"
                                  for m in ("dice", "jaccard", "hd95", "asd")), v["mean"]["n_cases"]]
                         for name, v in results["val"].items()]),
                  "<details><summary>per case</summary>",
                  table(["case", "Dice", "Jaccard", "HD95", "ASD"],
                        [[c, *(f"{m[k]:.4f}" for k in ("dice", "jaccard", "hd95", "asd"))]
                         for c, m in sorted(results["val"][results["predictor"]]["per_case"].items())]),
                  "</details>"]
    curves = learning_curves(run_dir / "log.jsonl")
    if curves:
        parts += ["<h2>Learning curves</h2>", img(curves, "learning curves")]
    if results is not None and split.get("val"):
        overlays = case_overlays(run_dir, cfg, split["val"][:3])
        parts.append("<h2>Validation cases</h2>")
        if isinstance(overlays, str):
            parts.append(f"<p><b>No validation pictures</b>: {html.escape(overlays)}.</p>")
        else:
            parts += ["<p class=\"note\">Ground truth in green, the reported predictor's mask in red; for volumes "
                      "the slice with the most ground-truth foreground.</p>", img(overlays, "overlays")]
    return "\n".join(parts)


def protocol_rows(cfg: dict) -> list[tuple[str, object]]:
    d, t, m, e = cfg["data"], cfg["train"], cfg["model"], cfg["eval"]
    return [("method", cfg["method"]), ("seed", cfg["seed"]), ("data", f"{d['format']} {d['root'] or ''}"),
            ("network dims", f"{d['dims']}D"),
            ("input grid", f"spacing {d['spacing']}, size {d['size']}, scale {d['scale']}, "
                           f"orientation {d['orientation']}"),
            ("intensity", d["intensity"]),
            ("split", f"labelled {cfg['split']['labelled']}, validation {cfg['split']['val']}, "
                      f"seed {cfg['split']['seed']}"),
            ("network", f"{m['arch']} {m['channels']}, {m['norm']} norm, dropout {m['dropout']}"),
            ("training", f"{t['steps']} steps, batch {t['batch_size']}, patch {t['patch']}, {t['optimizer']} "
                         f"lr {t['lr']} ({t['lr_schedule']})"),
            ("evaluation", f"checkpoint {e['checkpoint']}, predictor {e['predictor']}")]


def learning_curves(log_path: Path) -> bytes | None:
    """Training loss (and its moving mean) and validation Dice against the step."""
    steps, losses, val = [], [], {}
    for entry in log_entries(log_path):
        if "loss" in entry:
            steps.append(entry["step"])
            losses.append(entry["loss"])
        for k, v in entry.items():
            if k.startswith("val_dice_"):
                val.setdefault(k[9:], []).append((entry["step"], v))
    if not steps:
        return None
    fig = Figure(figsize=(10, 3.4))
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(steps, losses, lw=0.5, alpha=0.4, color="C0")
    window = max(1, len(losses) // 50)
    ax1.plot(steps[window - 1:], np.convolve(losses, np.ones(window) / window, mode="valid"), color="C0")
    ax1.set(xlabel="step", ylabel="training loss", title="loss")
    for name, pts in val.items():
        ax2.plot(*zip(*pts), marker="o", label=name)
    ax2.set(xlabel="step", ylabel="Dice", title="validation Dice (monitoring)")
    if val:
        ax2.legend()
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    return png(fig)


def case_overlays(run_dir: Path, cfg: dict, ids: list[str]) -> bytes | str:
    """Image, ground truth (green) and the reported predictor's mask (red) of a few validation cases, or why they
    could not be drawn (checkpoint or data unreadable), for the report to say."""
    from ..data.pipeline import load_cases
    from ..evaluation.evaluate import draw_overlay
    from ..evaluation.predict import load_run
    from .figures import best_slice

    try:
        run = load_run(run_dir)
    except InputError as err:  # checkpoint gone or damaged (a run copied without it): the report says so
        return f"the checkpoint could not be loaded ({err})"
    try:
        cases = load_cases(cfg["data"], ids)
    except InputError as err:  # the data moved: the report says so
        return f"the validation cases could not be read ({err})"
    fig = Figure(figsize=(3.4 * len(cases), 3.6))
    for i, case in enumerate(cases):
        pred = run.predict(case.image, spacing=case.spacing)
        image, gt = case.image[0], case.label
        if image.ndim == 3:
            axis = cfg["data"]["slice_axis"]
            k = best_slice(gt, axis)
            image, gt, pred = (np.take(a, k, axis=axis) for a in (image, gt, pred))
        ax = fig.add_subplot(1, len(cases), i + 1)
        draw_overlay(ax, image, [(gt > 0, "lime"), (pred > 0, "red")])
        ax.set_title(case.id, fontsize=8)
    return png(fig)


# ------------------------------------------------------------------------------------------------ a bench
def bench_sections(bench_dir: Path) -> str:
    parts = [markdown_html((bench_dir / "summary.md").read_text(), skip_title=True)]
    figures = sorted(bench_dir.glob("*.png"), key=lambda p: (p.name != "dice_vs_fraction.png", p.name))
    if figures:
        parts.append("<h2>Figures</h2>")
        parts += [f"<h3>{html.escape(p.stem)}</h3>{img(p.read_bytes(), p.stem)}" for p in figures]
    first = next((p.parent for p in sorted(bench_dir.glob("runs/*/*/*/results.json"))), None)
    if first is not None:
        cfg = read_stored_config(first / "config.yaml")
        split = json.loads((first / "split.json").read_text())
        overlays = case_overlays(first, cfg, split.get("val", [])[:3])
        if isinstance(overlays, str):
            parts.append(f"<p><b>No validation pictures of {html.escape(str(first.relative_to(bench_dir)))}</b>: "
                         f"{html.escape(overlays)}.</p>")
        elif overlays:
            parts += [f"<h2>Validation cases of {html.escape(str(first.relative_to(bench_dir)))}</h2>",
                      "<p class=\"note\">Ground truth in green, the run's mask in red.</p>", img(overlays, "overlays")]
    return "\n".join(parts)


def markdown_html(text: str, *, skip_title: bool = False) -> str:
    """The Markdown that summary.md uses (headings, bullet lists, tables, paragraphs, `code`, **bold**)."""
    out: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            if not (skip_title and level == 1):
                out.append(f"<h{level + 1}>{inline(line[level:].strip())}</h{level + 1}>")
        elif line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                cells = [c.strip() for c in lines[i].strip().strip("|").split("|")]
                if not all(re.fullmatch(r":?-+:?", c) for c in cells):
                    rows.append(cells)
                i += 1
            out.append(table(rows[0], rows[1:], escape=False, cell=inline))
            continue
        elif line.lstrip().startswith("- "):
            out.append("<ul>")
            while i < len(lines) and lines[i].lstrip().startswith("- "):
                indent = ' style="margin-left:1.5em"' if lines[i].startswith("  ") else ""
                out.append(f"<li{indent}>{inline(lines[i].lstrip()[2:])}</li>")
                i += 1
            out.append("</ul>")
            continue
        elif line.strip():
            out.append(f"<p>{inline(line)}</p>")
        i += 1
    return "\n".join(out)


def inline(text: str) -> str:
    text = html.escape(text)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", text)


# ------------------------------------------------------------------------------------------------ helpers
def table(head: list, rows: list[list], *, escape: bool = True, cell=None) -> str:
    fmt = cell or (lambda v: html.escape(str(v)) if escape else str(v))
    lines = ["<table><tr>" + "".join(f"<th>{fmt(str(h))}</th>" for h in head) + "</tr>"]
    lines += ["<tr>" + "".join(f"<td>{fmt(str(v))}</td>" for v in row) + "</tr>" for row in rows]
    return "\n".join(lines) + "</table>"


def png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def img(data: bytes, alt: str) -> str:
    return f"<img alt=\"{html.escape(alt)}\" src=\"data:image/png;base64,{base64.b64encode(data).decode()}\">"
