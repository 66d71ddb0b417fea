"""`superdiffusion bench`: plan methods x labelled fractions x seeds under a protocol, check everything,
train (skipping finished runs, resuming interrupted ones), evaluate, then write the tables and figures.

Output folder: results.csv, summary.md, dice_vs_fraction.png, ablation_<name>.png, qualitative.png, overlays.png
and runs/<method>/frac<f>/seed<s>/ (ordinary run folders; `test_eval.json` caches test-set metrics there).
"""

from __future__ import annotations

import copy
import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import merge, parse_sets, read_stored_config
from ..data.pipeline import case_ids, case_listing, load_cases, split_cases
from ..engine.run import DONE, check_config, config_changes, train_run
from ..engine.trainer import NonFiniteLossError
from ..errors import InputError
from ..evaluation.inference import segment
from ..evaluation.metrics import METRICS, case_metrics
from ..evaluation.predict import load_run
from ..methods import method_class
from .protocols import Ablation, Protocol, apply, folder_name, load_protocol, same_config

RESERVED_SETS = {"method": "--methods", "seed": "--seeds", "split.seed": "--seeds", "split.labelled": "--fractions"}


@dataclass
class RunSpec:
    """One (method label, fraction, seed) cell; several cells may share a run folder (identical configs)."""

    label: str  # `supervised`, or an ablation variant `superdiffusion[R3-chained]`
    method: str
    fraction: float | int
    seed: int
    cfg: dict
    run_dir: Path
    ablation: Ablation | None = None


@dataclass
class TestSet:
    root: Path
    list: str | None
    ids: list[str]
    data_cfg: dict  # the runs' data config pointed at the test folder


@dataclass
class Bench:
    """Everything the report and the figures need."""

    protocol: Protocol
    out: Path
    methods: list[str]
    ablations: list[Ablation]
    fractions: list[float | int]
    seeds: list[int]
    specs: list[RunSpec]
    test: TestSet | None = None
    overrides: list[str] = field(default_factory=list)  # --set KEY=VALUE, as given
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def labels(self, ablation: Ablation | None = None) -> list[str]:
        if ablation is None:
            return list(self.methods)
        return [ablation.label(v) for v in ablation.variants]

    def runs(self) -> list[RunSpec]:
        """One spec per distinct run folder, in plan order."""
        seen, out = set(), []
        for s in self.specs:
            if s.run_dir not in seen:
                seen.add(s.run_dir)
                out.append(s)
        return out


def parse_fraction(text: str) -> float | int:
    try:
        value = float(text)
    except ValueError:
        raise InputError(f"--fractions: {text!r} is not a number") from None
    if not value > 0:
        raise InputError(f"--fractions: {text!r} must be > 0 (a fraction < 1 or a case count >= 1)")
    if value >= 1:
        if value != int(value):
            raise InputError(f"--fractions: {text!r}: values >= 1 are case counts and must be whole")
        return int(value)
    return value


def parse_list(text: str | None, what: str) -> list[str]:
    items = [t.strip() for t in (text or "").split(",") if t.strip()]
    if text is not None and not items:
        raise InputError(f"{what}: empty list")
    return list(dict.fromkeys(items))


def _absolute_data(cfg: dict) -> None:
    """Absolute data paths in the stored config, so a run resumes from any working directory."""
    d = cfg["data"]
    if d["root"]:
        d["root"] = str(Path(d["root"]).expanduser().resolve())
    if d["list"] and Path(d["list"]).is_file():
        d["list"] = str(Path(d["list"]).resolve())


def make_config(protocol: Protocol, method: str, fraction: float | int, seed: int, *, sets: dict, data: dict,
                steps: int | None, variant: dict | None = None, where: str = "") -> dict:
    """protocol <- methods[method] <- --set <- training data <- fraction and seed <- variant <- --steps."""
    cfg = copy.deepcopy(protocol.base)
    cfg["method"] = method
    apply(cfg, protocol.methods.get(method, {}), where=f"{protocol.path}: methods.{method}")
    merge(cfg, copy.deepcopy(sets), where="--set")
    merge(cfg, copy.deepcopy(data), where="--train-data")
    if not getattr(method_class(method), "all_labelled", False):  # fully-supervised ignores the fraction
        cfg["split"]["labelled"] = fraction
    cfg["seed"] = cfg["split"]["seed"] = seed
    if variant:
        apply(cfg, copy.deepcopy(variant), where=where)
    if steps:
        cfg["train"]["steps"] = steps
        cfg["superdiffusion"]["pretrain_steps"] = min(cfg["superdiffusion"]["pretrain_steps"], steps)
    _absolute_data(cfg)
    check_config(cfg)
    return cfg


def run_folder(out: Path, label: str, fraction: float | int, seed: int, cfg: dict) -> Path:
    name = folder_name(label)
    frac = "all" if getattr(method_class(cfg["method"]), "all_labelled", False) else f"{fraction:g}"
    return out / "runs" / name / f"frac{frac}" / f"seed{seed}"


def plan(protocol: Protocol, methods: list[str], ablations: list[Ablation], fractions: list, seeds: list[int],
         out: Path, *, sets: dict, data: dict, steps: int | None) -> list[RunSpec]:
    """Every cell, seed-major (so comparable results arrive together); identical configs share a folder."""
    specs: list[RunSpec] = []
    folders: dict[str, Path] = {}  # canonical config -> its run folder

    def add(label: str, method: str, f, s: int, cfg: dict, ablation: Ablation | None, plain: dict | None) -> None:
        key = json.dumps(cfg, sort_keys=True)
        if plain is not None and same_config(cfg, plain):  # a variant equal to the plain method: its folder
            folders.setdefault(key, run_folder(out, method, f, s, cfg))
        run_dir = folders.setdefault(key, run_folder(out, label, f, s, cfg))
        specs.append(RunSpec(label, method, f, s, cfg, run_dir, ablation))

    common = dict(sets=sets, data=data, steps=steps)
    for s in seeds:
        for f in fractions:
            for m in methods:
                add(m, m, f, s, make_config(protocol, m, f, s, **common), None, None)
            for a in ablations:
                for v, over in a.variants.items():
                    m = a.variant_method(v)
                    cfg = make_config(protocol, m, f, s, variant=over, where=f"ablations.{a.name}.{v}", **common)
                    add(a.label(v), m, f, s, cfg, a, make_config(protocol, m, f, s, **common))
    return specs


def check_plan(bench: Bench) -> None:
    """Before any training: folders hold the same configs, splits are possible, data are listed."""
    listed: dict[str, tuple[list[str], set[str]]] = {}
    for spec in bench.runs():
        cfg, run_dir = spec.cfg, spec.run_dir
        stored = run_dir / "config.yaml"
        if stored.is_file():
            changed = config_changes(read_stored_config(stored), cfg)
            if changed:
                raise InputError(f"{run_dir}: this run was made with a different config "
                                 f"({', '.join(changed)}); use another --out or the same "
                                 "protocol and options")
        elif run_dir.exists() and any(run_dir.iterdir()):
            raise InputError(f"{run_dir}: folder is not empty but holds no run (no config.yaml); remove it")
        key = json.dumps(cfg["data"], sort_keys=True)
        if key not in listed:
            listed[key] = case_listing(cfg["data"])  # lists the training data (nothing read yet)
        split = split_cases(cfg, listed[key])
        cls = method_class(cfg["method"])
        if cls.uses_unlabelled and not getattr(cls, "all_labelled", False) and not split["unlabelled"]:
            raise InputError(f"{spec.label} at fraction {spec.fraction:g}: no unlabelled case is left "
                             f"(split.labelled {cfg['split']['labelled']} of {len(listed[key][0])} cases)")
        if not split["val"] and bench.test is None:
            raise InputError(f"protocol {bench.protocol.name}: split.val is 0 (no validation cases), so there is "
                             "nothing to evaluate on; give --test-data/--test-list, or --set split.val=N")


def load_test_set(cfg: dict, test_data: str, test_list: str | None) -> TestSet:
    """Read every test case once (all readable, labelled) before any training starts."""
    data_cfg = copy.deepcopy(cfg["data"])
    if data_cfg["format"] == "synthetic":
        raise InputError("--test-data: the protocol generates synthetic data; also pass --set data.format=... "
                         "(la, volumes, folders, ...) naming the format of the test folder")
    data_cfg.update(root=str(Path(test_data).expanduser().resolve()), list=test_list)
    cases = load_cases(data_cfg)
    return TestSet(Path(data_cfg["root"]), test_list, [c.id for c in cases], data_cfg)


def run_bench(protocol: str, *, out: str | Path, methods: str | None = None, fractions: str | None = None,
              seeds: str | None = None, ablation: str | None = None, train_data: str | None = None,
              train_list: str | None = None, test_data: str | None = None, test_list: str | None = None,
              steps: int | None = None, overrides: list[str] = (), progress: bool = True, jobs: int = 1,
              train: bool = True) -> Bench:
    """Check the whole plan, train what is missing (unless `train` is False), then (re)write every table and
    figure."""
    from . import figures, report

    proto = load_protocol(protocol)
    method_names = parse_list(methods, "--methods") or list(proto.bench["methods"])
    for m in method_names:
        method_class(m)
    ablations = []
    for name in parse_list(ablation, "--ablation"):
        if name not in proto.ablations:
            raise InputError(f"--ablation {name}: protocol {proto.name} defines "
                             f"{', '.join(proto.ablations) or 'no ablations'}")
        ablations.append(proto.ablations[name])
    fracs = sorted(dict.fromkeys([parse_fraction(f) for f in parse_list(fractions, "--fractions")] or
                                 [parse_fraction(str(f)) for f in proto.bench["fractions"]]))
    try:
        seed_list = [int(s) for s in parse_list(seeds, "--seeds")] or [int(s) for s in proto.bench["seeds"]]
    except ValueError:
        raise InputError(f"--seeds: {seeds!r} must be integers, e.g. 0,1,2") from None
    if jobs < 1:
        raise InputError(f"--jobs: {jobs} must be a positive integer")
    if steps is not None and steps < 1:
        raise InputError(f"--steps: {steps} must be a positive integer")
    if test_list and not test_data:
        raise InputError("--test-list needs --test-data (the folder the listed test cases live in)")
    if train_list and not train_data and not proto.base["data"]["root"]:
        raise InputError("--train-list needs --train-data (the protocol names no data folder)")
    for item in overrides:
        key = item.partition("=")[0].strip()
        if key in RESERVED_SETS:
            raise InputError(f"--set {key}: set by {RESERVED_SETS[key]}, not by --set")
    sets = parse_sets(list(overrides))
    data: dict = {}
    if train_data:
        data = {"data": {"root": train_data, "list": train_list}}
    elif train_list:
        data = {"data": {"list": train_list}}
    if train_data and {**proto.base["data"], **sets.get("data", {})}["format"] == "synthetic":
        raise InputError("--train-data: the protocol generates synthetic data; also pass --set data.format=... "
                         "(la, volumes, folders, ...) naming the format of the training folder")
    out = Path(out)
    specs = plan(proto, method_names, ablations, fracs, seed_list, out, sets=sets, data=data, steps=steps)
    bench = Bench(proto, out, method_names, ablations, fracs, seed_list, specs, overrides=list(overrides))
    if test_data:
        bench.test = load_test_set(specs[0].cfg, test_data, test_list)
        overlap = set(bench.test.ids) & set(case_ids(specs[0].cfg["data"]))
        if overlap:
            bench.notes.append(f"{len(overlap)} test case id(s) also name training cases (e.g. {sorted(overlap)[0]}): "
                               "check that the test set is really separate.")
    check_plan(bench)

    out.mkdir(parents=True, exist_ok=True)
    runs = bench.runs()
    todo = []
    for i, spec in enumerate(runs, 1):
        head = f"[{i}/{len(runs)}] {spec.run_dir.relative_to(out)}"
        if (spec.run_dir / DONE).is_file():
            print(f"{head}: finished, skipped", flush=True)
        elif not train:
            print(f"{head}: not finished, left out (--report-only)", flush=True)
        else:
            todo.append((head, spec, (spec.run_dir / "config.yaml").is_file()))
    if jobs > 1 and len(todo) > 1:
        train_parallel(bench, todo, jobs)
    else:
        for head, spec, resume in todo:
            print(f"{head}: {'resuming' if resume else 'training'}", flush=True)
            try:
                train_run(spec.cfg, spec.run_dir, resume=resume, progress=progress)
                run_finished(bench, head, spec)
            except NonFiniteLossError as err:
                run_finished(bench, head, spec, err)
    rows = collect_rows(bench)
    report.write_results(bench, rows)
    figures.write_figures(bench, rows)
    report.write_results(bench, rows)  # again: summary.md lists the figures that were made
    print(f"wrote {out / 'results.csv'}, {out / 'summary.md'} and figures", flush=True)
    return bench


def _train_in_worker(cfg: dict, run_dir: str, resume: bool, threads: int) -> float:
    """One run in a worker process (quiet); returns its wall time."""
    if not cfg["train"]["threads"]:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    train_run(cfg, run_dir, resume=resume, progress=False)
    return time.perf_counter() - t0


def run_cost(spec: RunSpec) -> float:
    """A run's training cost in supervised steps (its method's step_cost x steps)."""
    return method_class(spec.cfg["method"]).step_cost * spec.cfg["train"]["steps"]


def train_parallel(bench: Bench, todo: list[tuple[str, RunSpec, bool]], jobs: int) -> None:
    """Up to `jobs` runs at once in spawned processes (safe with CUDA); tables are rewritten as runs finish.

    Runs never share a folder, so they cannot collide; an interrupted bench resumes as in the serial case.
    """
    threads = max(1, (os.cpu_count() or 1) // jobs)
    todo = sorted(todo, key=lambda t: -run_cost(t[1]))  # dearest first: no long run left alone at the end
    print(f"training {len(todo)} runs, {jobs} at a time ({threads} torch thread(s) each)", flush=True)
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {}
        for head, spec, resume in todo:
            print(f"{head}: {'resuming' if resume else 'training'}", flush=True)
            futures[pool.submit(_train_in_worker, spec.cfg, str(spec.run_dir), resume, threads)] = (head, spec)
        for future in as_completed(futures):
            head, spec = futures[future]
            try:
                seconds = future.result()
                print(f"{head}: finished in {seconds:.0f} s", flush=True)
                run_finished(bench, head, spec)
            except NonFiniteLossError as err:
                run_finished(bench, head, spec, err)


def run_finished(bench: Bench, head: str, spec: RunSpec, error: NonFiniteLossError | None = None) -> None:
    """Record a failed run, or rewrite the partial tables after a finished one (while the rest trains)."""
    from . import report

    if error is not None:
        bench.failures.append(f"{spec.run_dir.relative_to(bench.out)}: {error}")
        print(f"{head}: failed ({error})", flush=True)
        return
    report.write_results(bench, collect_rows(bench))


# ------------------------------------------------------------------------------------------ evaluation
def wanted_predictors(spec: RunSpec, chosen: str) -> list[str]:
    return list(dict.fromkeys([chosen, *(spec.ablation.predictors if spec.ablation else [])]))


def test_metrics(bench: Bench, run_dir: Path, predictors: list[str]) -> dict[str, dict]:
    """Per-case test metrics of each predictor, cached in the run folder (test_eval.json)."""
    test = bench.test
    cache_path = run_dir / "test_eval.json"
    key = {"root": str(test.root), "list": test.list, "ids": test.ids}
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    if cache.get("test") != key:
        cache = {"test": key, "per_predictor": {}}
    missing = [p for p in predictors if p not in cache["per_predictor"]]
    if missing:
        run = load_run(run_dir)
        offered = set(run.method.predictors())
        missing = [p for p in missing if p in offered]
        per = {p: {} for p in missing}
        for case in load_cases(test.data_cfg):
            for p in missing:
                per[p][case.id] = case_metrics(segment(run.probabilities(case, p)), case.label,
                                               spacing=case.spacing, num_classes=test.data_cfg["num_classes"])
        cache["per_predictor"].update(per)
        cache_path.write_text(json.dumps(cache, indent=1))
    return {p: cache["per_predictor"][p] for p in predictors if p in cache["per_predictor"]}


def collect_rows(bench: Bench) -> list[dict]:
    """results.csv rows from every finished run: the chosen predictor, plus an ablation's extra predictors."""
    rows = []
    for spec in bench.specs:
        if not (spec.run_dir / DONE).is_file():
            continue
        results = json.loads((spec.run_dir / "results.json").read_text())
        chosen = results["predictor"]
        wanted = wanted_predictors(spec, chosen)
        if bench.test is not None:
            per_predictor, eval_set = test_metrics(bench, spec.run_dir, wanted), "test"
        else:
            per_predictor = {p: results["val"][p]["per_case"] for p in wanted if p in results.get("val", {})}
            eval_set = "validation"
        for p, per_case in per_predictor.items():
            for case_id, m in sorted(per_case.items()):
                rows.append({"method": spec.label, "fraction": spec.fraction, "seed": spec.seed, "case": case_id,
                             "predictor": p, "chosen": int(p == chosen), "eval_set": eval_set,
                             "labelled_cases": results["labelled_cases"],
                             **{k: float(m[k]) for k in METRICS},
                             "wall_s": results.get("wall_time_s", ""),
                             "run": spec.run_dir.relative_to(bench.out).as_posix()})
    return rows
