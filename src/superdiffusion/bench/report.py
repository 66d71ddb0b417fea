"""results.csv and summary.md: per-case rows, mean +- std over seeds, paired Wilcoxon tests vs SuperDiffusion.

Every number is recomputed from the finished runs on each invocation, so a resumed benchmark never mixes
stale tables with new runs.
"""

from __future__ import annotations

import csv
import json
import warnings
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
from scipy.stats import wilcoxon

from ..evaluation.metrics import METRICS
from ..methods import method_class
from ..runlog import log_entries
from .protocols import REFERENCE, Ablation, folder_name

COLUMNS = ("method", "fraction", "seed", "case", "predictor", "chosen", "eval_set", "labelled_cases", *METRICS,
           "wall_s", "run")
BASELINE = "supervised"  # the lower bound every method is also compared with
FIGURES = ("dice_vs_fraction.png", "val_curves.png", "pseudo_labels.png", "qualitative.png", "overlays.png")


def write_results(bench, rows: list[dict]) -> None:
    with open(bench.out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    (bench.out / "summary.md").write_text(summary(bench, rows))


def read_results(path: str | Path) -> list[dict]:
    """The rows of a results.csv as write_results was given them (numbers as numbers), so that the tables can be
    recomputed from the file alone: after rows of several benches are merged into one evidence file."""
    def number(text: str) -> float | int:
        return float(text) if any(c in text for c in ".en") else int(text)

    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k in ("fraction", "seed", "chosen", "labelled_cases", *METRICS):
            r[k] = number(r[k])
        r["wall_s"] = float(r["wall_s"]) if r["wall_s"] else ""
    return rows


# ------------------------------------------------------------------------------------------- statistics
def table_rows(rows: list[dict], labels: list[str], ablation: Ablation | None = None) -> tuple[list[dict], Callable]:
    """The rows a table is made of, and its row key: the method, or (method, predictor) for predictor ablations."""
    if ablation is not None and ablation.predictors:
        picked = [r for r in rows if r["method"] in labels and r["predictor"] in ablation.predictors]
        return picked, lambda r: f"{r['method']} ({r['predictor']})"
    return [r for r in rows if r["method"] in labels and r["chosen"]], lambda r: r["method"]


def seed_stats(rows: list[dict], key: Callable) -> dict[tuple[str, float], dict]:
    """{(key, fraction): {metric: (mean, std, n_seeds)}} of the per-seed case means."""
    per_seed: dict = defaultdict(lambda: defaultdict(list))
    for r in rows:
        per_seed[(key(r), r["fraction"])][r["seed"]].append(r)
    out = {}
    for k, seeds in per_seed.items():
        out[k] = {}
        for m in METRICS:
            means = np.array([np.mean([r[m] for r in rs]) for rs in seeds.values()])
            std = float(means.std(ddof=1)) if len(means) > 1 else float("nan")
            out[k][m] = (float(means.mean()), std, len(means))
        out[k]["labelled"] = sorted({r["labelled_cases"] for rs in seeds.values() for r in rs})
    return out


def paired(rows: list[dict], label: str, fraction, reference: str = REFERENCE) -> tuple[int, float, str]:
    """(n pairs, mean Dice difference label - reference, Wilcoxon p or an n/a reason) over (case, seed) pairs."""
    def dice(name: str) -> dict:
        return {(r["case"], r["seed"]): (r["dice"], r["run"]) for r in rows
                if r["method"] == name and r["fraction"] == fraction and r["chosen"]}

    a, b = dice(label), dice(reference)
    keys = sorted(set(a) & set(b))
    if not keys:
        return 0, float("nan"), "n/a (no pairs)"
    if all(a[k][1] == b[k][1] for k in keys):
        return len(keys), 0.0, f"n/a (the same runs as {reference})"
    d = np.array([a[k][0] - b[k][0] for k in keys])
    return len(d), float(d.mean()) if np.any(d) else 0.0, wilcoxon_p(d)


def wilcoxon_p(d: np.ndarray) -> str:
    """The two-sided Wilcoxon signed-rank p of paired differences, as text; 'n/a (why)' where there is none."""
    if len(d) < 2:
        return "n/a (too few pairs)"
    if not np.any(d):
        return "n/a (all differences zero)"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            p = float(wilcoxon(d).pvalue)
    except ValueError as err:
        return f"n/a ({err})"
    return f"{p:.3g}" if np.isfinite(p) else "n/a"


# --------------------------------------------------------------------------------------------- summary
def _cell(v: tuple[float, float, int], digits: int) -> str:
    mean, std, n = v
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if n > 1 else f"{mean:.{digits}f}"


def metric_table(stats: dict, keys: list[str], fractions: list) -> list[str]:
    lines = ["| method | labelled fraction | labelled cases | seeds | Dice | Jaccard | HD95 | ASD |",
             "|---|---|---|---|---|---|---|---|"]
    for f in fractions:
        for k in keys:
            s = stats.get((k, f))
            if s is None:
                lines.append(f"| {k} | {f:g} | | 0 | not run yet | | | |")
                continue
            lab = "/".join(str(n) for n in s["labelled"])
            lines.append(f"| {k} | {f:g} | {lab} | {s['dice'][2]} | {_cell(s['dice'], 3)} | "
                         f"{_cell(s['jaccard'], 3)} | {_cell(s['hd95'], 2)} | {_cell(s['asd'], 2)} |")
    return lines


def paired_table(rows: list[dict], labels: list[str], fractions: list, reference: str = REFERENCE) -> list[str]:
    if not any(r["method"] == reference for r in rows):
        return [f"No {reference} runs in this benchmark: no paired statistics against it."]
    others = [x for x in labels if x != reference]
    if not others:
        return [f"Only {reference} was run: nothing to compare (Wilcoxon signed-rank: n/a)."]
    lines = [f"Wilcoxon signed-rank test of the per-case Dice differences (method − {reference}), on the same "
             "evaluation cases, pairs matched by case id and seed and pooled over seeds (scipy.stats.wilcoxon, "
             "two-sided, zero differences dropped).", "",
             f"| method | labelled fraction | pairs (n) | mean ΔDice vs {reference} | Wilcoxon p |",
             "|---|---|---|---|---|"]
    for f in fractions:
        for label in others:
            n, mean, p = paired(rows, label, f, reference)
            lines.append(f"| {label} | {f:g} | {n} | {mean:+.4f} | {p} |" if n else f"| {label} | {f:g} | 0 | | {p} |")
    return lines


def validation_seconds(run_dir: Path) -> float:
    """Seconds of periodic validation in a run's log.jsonl (`val_s`; older logs: the step time jumps there)."""
    total, last_time, pending = 0.0, None, False
    for entry in log_entries(run_dir / "log.jsonl"):
        if "val_s" in entry:
            total += float(entry["val_s"])
        elif any(k.startswith("val_dice_") for k in entry):
            pending = True  # older log: the next step's time includes this validation
        elif "time" in entry:
            if pending and last_time is not None:
                gap = float(entry["time"]) - last_time
                total += gap
            pending, last_time = False, float(entry["time"])
    return total


def wall_table(bench, results: dict[Path, dict]) -> list[str]:
    """Wall time per run (training, validation and final evaluation; every stage of a pipeline) and the share
    of it that periodic validation took."""
    per: dict = defaultdict(list)
    for spec in bench.runs():
        r = results.get(spec.run_dir)
        if r is not None and "wall_time_s" in r:
            per[spec.label].append((float(r["wall_time_s"]), validation_seconds(spec.run_dir)))
    if not per:
        return ["No finished run yet."]
    shares = {label: 100 * sum(v for _, v in pairs) / max(sum(t for t, _ in pairs), 1e-9)
              for label, pairs in per.items()}
    return _wall_lines({label: [t for t, _ in pairs] for label, pairs in per.items()}, shares)


def _wall_lines(times: dict[str, list[float]], shares: dict[str, float] | None = None) -> list[str]:
    """The wall-time table: mean, min and max per label, and the share periodic validation took where known."""
    extra = " periodic validation, % of wall time |" if shares is not None else ""
    lines = ["| method | runs | wall time per run, s (mean) | min | max |" + extra,
             "|---|---|---|---|---|" + ("---|" if shares is not None else "")]
    for label, t in times.items():
        share = f" {shares[label]:.1f} |" if shares is not None else ""
        lines.append(f"| {label} | {len(t)} | {np.mean(t):.0f} | {min(t):.0f} | {max(t):.0f} |" + share)
    return lines


def _steps(cfg: dict) -> str:
    t, cls = cfg["train"], method_class(cfg["method"])
    text = f"{t['steps']} steps (batch {t['batch_size']}"
    text += f" + {t['unlabelled_batch_size']} unlabelled)" if cls.uses_unlabelled else ")"
    note = cls.stages_note(cfg)
    return f"{note}, then {text}" if note else text


def _run_results(bench) -> dict[Path, dict]:
    out = {}
    for spec in bench.runs():
        path = spec.run_dir / "results.json"
        if (spec.run_dir / "DONE").is_file() and path.is_file():
            out[spec.run_dir] = json.loads(path.read_text())
    return out


def _distinct(values) -> str:
    return "; ".join(dict.fromkeys(str(v) for v in values)) or "(no finished run yet)"


def evaluation_text(bench, results: dict[Path, dict]) -> list[str]:
    cfg = bench.specs[0].cfg
    val = cfg["split"]["val"]
    carve = (f"a validation split carved from the training cases (split.val = {val}: "
             f"{'a fraction' if isinstance(val, float) and val < 1 else 'a count'} of the cases, drawn with the "
             "split seed, so it differs between seeds)") if val else "no validation split (split.val = 0)"
    data = cfg["data"]
    train = f"`{data['root']}`" + (f" (list `{data['list']}`)" if data["list"] else "") \
        if data["format"] != "synthetic" else f"built-in synthetic data ({data['synthetic']})"
    lines = [f"- Training cases: {train}, format {data['format']}, dims {data['dims']}, "
             + (f"size {data['size']}." if data["size"] else f"scale {data['scale']}.")]
    chosen = " and ".join(what for what, on_val in (
        ("the checkpoint", any(s.cfg["eval"]["checkpoint"] != "last" for s in bench.specs)),
        ("the predictor", any(s.cfg["eval"]["predictor"] == "auto" for s in bench.specs)),
        ("BCP's stage-1 checkpoint", any(s.cfg["method"] == "bcp" and s.cfg["bcp"]["pretrain_checkpoint"] == "best"
                                         for s in bench.specs))) if on_val)
    if bench.test is not None:
        t = bench.test
        lines.append(f"- **Evaluation set: the separate test set** `{t.root}`"
                     + (f" (list `{t.list}`)" if t.list else "") + f": {len(t.ids)} cases. Training used "
                     f"{carve}, " + (f"to choose {chosen} only." if chosen else "to monitor only."))
    elif chosen:
        lines.append(f"- **Evaluation set: {carve}.** No separate test set was given (--test-data), so these are "
                     f"validation numbers, and the same cases chose {chosen}: optimistic compared "
                     "with a withheld test set.")
    else:
        lines.append(f"- **Evaluation set: {carve}.** No separate test set was given (--test-data), so these are "
                     "validation numbers; nothing was chosen on these cases (the last checkpoint, each method's "
                     "first or named predictor), so they are not optimistic for that reason.")
    sizes = _distinct(f"fraction {s.fraction:g}: {len(r['split']['labelled'])} labelled / "
                      f"{len(r['split']['unlabelled'])} unlabelled / {len(r['split']['val'])} validation"
                      for s in bench.runs() if (r := results.get(s.run_dir)) and s.label in bench.methods
                      and not getattr(method_class(s.method), "all_labelled", False))
    lines.append("- Split rule: case ids sorted, then shuffled with the split seed; validation carved first, the "
                 "labelled fraction is a fraction of the remaining training pool (a count when >= 1); "
                 f"fully-supervised labels the whole pool. Sizes: {sizes}.")
    return lines


def summary(bench, rows: list[dict]) -> str:
    p = bench.protocol
    results = _run_results(bench)
    first = {}
    for s in bench.specs:
        first.setdefault(s.label, s.cfg)
    lines = [f"# Benchmark: protocol `{p.name}`", "", p.description, "",
             f"- Protocol file: `{p.path}`; methods: {', '.join(bench.methods)}"
             + (f"; ablations: {', '.join(a.name for a in bench.ablations)}" if bench.ablations else "") + ".",
             *([f"- Config overrides for every run (--set): {', '.join(f'`{o}`' for o in bench.overrides)}."]
               if bench.overrides else []),
             *evaluation_text(bench, results),
             f"- Labelled fractions: {', '.join(f'{f:g}' for f in bench.fractions)}; seeds: "
             f"{', '.join(map(str, bench.seeds))} (each seed sets both the training seed and the split seed).",
             "- Steps per method:", *[f"  - {label}: {_steps(cfg)}" for label, cfg in first.items()],
             f"- Checkpoint rule: {_distinct(r['checkpoint_rule'] for r in results.values())} "
             f"(eval.checkpoint = {_distinct(s.cfg['eval']['checkpoint'] for s in bench.specs)}).",
             f"- Threshold: {_distinct(r['threshold'] for r in results.values())}.",
             f"- Predictor: eval.predictor = {_distinct(s.cfg['eval']['predictor'] for s in bench.specs)} "
             "(auto = each run's student or teacher, whichever has the better validation Dice; the method's "
             "first predictor when there is no validation split); chosen: "
             f"{_distinct(sorted({r['predictor'] for r in results.values()}))}.",
             "- Metrics per case at the original resolution (HD95 and ASD in voxel-spacing units), averaged over "
             "cases per run; tables give mean ± sample std (ddof 1) over seeds of these per-seed means.",
             f"- Runs finished: {len(results)} of {len(bench.runs())} (identical configurations share one run folder)."]
    lines += [f"- Note: {n}" for n in bench.notes]
    lines += [f"- FAILED: {f}" for f in bench.failures]
    rows_main, key = table_rows(rows, bench.methods)
    variants = [label for a in bench.ablations for label in bench.labels(a)]
    lines += ["", "## Main results", "", *metric_table(seed_stats(rows_main, key), bench.methods, bench.fractions),
              "", "## Paired statistics", "", *paired_table(rows, bench.methods + variants, bench.fractions)]
    if BASELINE in bench.methods and any(m not in (BASELINE, REFERENCE) for m in bench.methods + variants):
        lines += ["", *paired_table(rows, bench.methods + variants, bench.fractions, BASELINE)]
    lines += ["", "## Wall time", "", *wall_table(bench, results)]
    for a in bench.ablations:
        picked, key = table_rows(rows, bench.labels(a), a)
        keys = [f"{label} ({pr})" for label in bench.labels(a) for pr in a.predictors] if a.predictors \
            else bench.labels(a)
        lines += ["", f"## Ablation: {a.name}", ""]
        for v, over in a.variants.items():
            shared = {s.run_dir.relative_to(bench.out).parts[1] for s in bench.specs if s.label == a.label(v)}
            own = folder_name(a.label(v))
            note = f" (identical configuration: the runs in runs/{', '.join(sorted(shared - {own}))})" \
                if shared - {own} else ""
            lines.append(f"- {a.label(v)}: {json.dumps(over)}{note}")
        if a.predictors:
            lines.append(f"- Each variant's runs evaluated with each predictor ({', '.join(a.predictors)}); "
                         "no extra training.")
        lines += ["", *metric_table(seed_stats(picked, key), keys, bench.fractions), "",
                  f"Figure: `ablation_{a.name}.png`."]
    figures = [f for f in (*FIGURES, *(f"ablation_{a.name}.png" for a in bench.ablations))
               if (bench.out / f).is_file()]
    lines += ["", "## Files", "", "- `results.csv`: one row per method, fraction, seed, evaluation case and "
              "predictor (`chosen` = 1 for the run's own predictor).",
              *[f"- `{f}`" for f in figures], "- `runs/<method>/frac<f>/seed<s>/`: the run folders."]
    return "\n".join(lines) + "\n"


def tables_from_rows(rows: list[dict], title: str, source: str = "results.csv") -> str:
    """summary.md's tables from results.csv rows alone (read_results): for an evidence file that gathers the rows
    of several benches, whose run folders are gone; wall time per run from the `wall_s` column."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fractions = sorted({r["fraction"] for r in rows})
    picked, key = table_rows(rows, methods)
    lines = [f"# {title}", "", f"Recomputed from every row of {source}; per seed the mean over its evaluation "
             "cases, then mean ± sample std over seeds.", "", "## Main results", "",
             *metric_table(seed_stats(picked, key), methods, fractions)]
    for reference in (BASELINE, REFERENCE):
        if reference in methods:
            lines += ["", f"## Paired against {reference}", "", *paired_table(rows, methods, fractions, reference)]
    walls: dict = defaultdict(dict)
    for r in rows:
        if r["chosen"] and r["wall_s"] != "":
            walls[r["method"]][r["run"]] = r["wall_s"]
    times = {m: list(walls[m].values()) for m in methods if walls[m]}
    lines += ["", "## Wall time", "", *_wall_lines(times)]
    return "\n".join(lines) + "\n"
