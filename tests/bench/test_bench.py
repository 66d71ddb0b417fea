"""`superdiffusion bench` on the seconds-long synthetic protocol: outputs, resume, a separate test set,
ablations, and bad inputs refused before any training."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

import superdiffusion.bench.runner as runner
from superdiffusion.bench.protocols import load_protocol, shipped_protocols
from superdiffusion.bench.report import read_results, tables_from_rows
from superdiffusion.cli.main import main
from superdiffusion.data.splits import make_split
from superdiffusion.data.synthetic import write_synthetic_dataset
from superdiffusion.engine.run import check_config
from superdiffusion.methods import build_method

FAST = ["--set", "train.threads=1", "--no-progress"]
COLUMNS = ["method", "fraction", "seed", "case", "predictor", "chosen", "eval_set", "labelled_cases", "dice",
           "jaccard", "hd95", "asd", "wall_s", "run"]


def bench(out: Path, *args: str) -> int:
    return main(["bench", "--protocol", "synthetic", "--out", str(out), *FAST, *args])


def read_rows(out: Path) -> list[dict]:
    with open(out / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def assert_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 1000, path
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def count_training(monkeypatch):
    """Wraps the real train_run: records (run folder, resume) of every call."""
    calls, real = [], runner.train_run

    def spy(cfg, run_dir, *, resume=False, progress=True):
        calls.append((Path(run_dir), resume))
        return real(cfg, run_dir, resume=resume, progress=progress)

    monkeypatch.setattr(runner, "train_run", spy)
    return calls


@pytest.fixture(scope="module")
def main_bench(tmp_path_factory) -> Path:
    """supervised and superdiffusion x 1 fraction x 2 seeds, on the validation split."""
    out = tmp_path_factory.mktemp("bench") / "out"
    assert bench(out, "--methods", "supervised,superdiffusion", "--fractions", "0.25", "--seeds", "0,1") == 0
    return out


def test_outputs(main_bench):
    out = main_bench
    rows = read_rows(out)
    assert list(rows[0]) == COLUMNS
    assert len(rows) == 2 * 1 * 2 * 4  # methods x fractions x seeds x validation cases
    assert {r["eval_set"] for r in rows} == {"validation"} and {r["chosen"] for r in rows} == {"1"}
    for r in rows:  # the cases are the run's own validation split
        assert r["case"] in json.loads((out / r["run"] / "split.json").read_text())["val"]
        assert 0 <= float(r["dice"]) <= 1
    assert {(r["method"], r["seed"]) for r in rows} == {(m, s) for m in ("supervised", "superdiffusion")
                                                        for s in ("0", "1")}
    text = (out / "summary.md").read_text()
    for needle in ("validation split carved from the training cases", "seeds: 0, 1", "20 steps",
                   "10 cycle pre-training steps", "Checkpoint rule: best validation Dice", "Threshold: argmax",
                   "Wilcoxon", "| supervised | 0.25 | 8 |", "± ", "(--set): `train.threads=1`"):
        assert needle in text, needle
    for name in ("dice_vs_fraction.png", "val_curves.png", "qualitative.png", "overlays.png"):
        assert_png(out / name)
    assert len(list((out / "runs").glob("*/frac0.25/seed*/DONE"))) == 4
    for r in rows:  # each run's wall time, as its results.json records it
        assert float(r["wall_s"]) == json.loads((out / r["run"] / "results.json").read_text())["wall_time_s"] > 0
    assert "## Wall time" in text and "| superdiffusion | 2 |" in text


def test_tables_recomputed_from_results_csv_match_the_summary(main_bench):
    """read_results + tables_from_rows rebuild summary.md's tables from results.csv alone (merged evidence)."""
    rows = read_results(main_bench / "results.csv")
    assert rows[0]["fraction"] == 0.25 and isinstance(rows[0]["seed"], int) and isinstance(rows[0]["dice"], float)
    text, summary = tables_from_rows(rows, "t"), (main_bench / "summary.md").read_text()
    main_table = [line for line in text.splitlines() if line.startswith("| supervised | 0.25 |")]
    assert main_table and all(line in summary for line in main_table)
    paired = [line for line in text.split("## Paired against superdiffusion")[1].splitlines()
              if line.startswith("| supervised | 0.25 |")]
    assert len(paired) == 1 and paired[0] in summary  # the same pairs, difference and Wilcoxon p
    assert "| superdiffusion | 2 |" in text  # two runs' wall times


def test_rerun_skips_finished_runs(main_bench, count_training):
    before = (main_bench / "results.csv").read_text()
    assert bench(main_bench, "--methods", "supervised,superdiffusion", "--fractions", "0.25", "--seeds", "0,1") == 0
    assert count_training == []
    assert (main_bench / "results.csv").read_text() == before


def test_interrupted_run_is_resumed(main_bench, count_training):
    run = main_bench / "runs" / "superdiffusion" / "frac0.25" / "seed1"
    (run / "DONE").unlink()  # as if killed before the end: config.yaml and checkpoints, no DONE
    (run / "results.json").unlink()
    args = ["--methods", "supervised,superdiffusion", "--fractions", "0.25", "--seeds", "0,1"]
    (main_bench / "dice_vs_fraction.png").unlink()
    assert bench(main_bench, *args, "--report-only") == 0  # a bench cut short: tables and figures, no training
    assert count_training == [] and len(read_rows(main_bench)) == 12
    assert "| superdiffusion | 0.25 | 3 | 1 |" in (main_bench / "summary.md").read_text()  # one seed so far
    assert_png(main_bench / "dice_vs_fraction.png")
    assert bench(main_bench, *args) == 0
    assert count_training == [(run, True)]
    assert (run / "DONE").is_file() and len(read_rows(main_bench)) == 16


def test_parallel_jobs_match_serial_runs(main_bench, tmp_path):
    """--jobs 2 trains the runs in two spawned processes and gives the serial bench's numbers."""
    out = tmp_path / "parallel"
    assert bench(out, "--methods", "supervised", "--fractions", "0.25", "--seeds", "0,1", "--jobs", "2") == 0
    def numbers(rows: list[dict]) -> list[dict]:  # every column but the wall time, which differs run to run
        return [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]

    serial = [r for r in read_rows(main_bench) if r["method"] == "supervised"]
    assert numbers(read_rows(out)) == numbers(serial) and len(serial) == 8


def test_parallel_jobs_start_the_dearest_runs_first(tmp_path):
    proto = load_protocol("synthetic")
    specs = runner.plan(proto, ["supervised", "cps", "superdiffusion", "mean-teacher"], [], [0.25], [0], tmp_path,
                        sets={}, data={}, steps=None)
    assert [s.method for s in sorted(specs, key=runner.run_cost, reverse=True)] == \
        ["superdiffusion", "cps", "mean-teacher", "supervised"]


def test_separate_test_set(tmp_path):
    train = write_synthetic_dataset(tmp_path / "train", 10, dims=3, shape=(32, 32, 8), seed=0, fmt="la")
    test = write_synthetic_dataset(tmp_path / "elsewhere" / "test", 12, dims=3, shape=(32, 32, 8), seed=1, fmt="la")
    (test / "test.list").write_text("synth010\nsynth011\n")
    out = tmp_path / "out"
    assert bench(out, "--methods", "supervised", "--fractions", "0.5", "--seeds", "0", "--steps", "4",
                 "--set", "data.format=la", "--train-data", str(train), "--train-list", str(train / "train.list"),
                 "--test-data", str(test), "--test-list", str(test / "test.list")) == 0
    rows = read_rows(out)
    assert sorted(r["case"] for r in rows) == ["synth010", "synth011"]
    assert {r["eval_set"] for r in rows} == {"test"}
    text = (out / "summary.md").read_text()
    assert "separate test set" in text and str(test / "test.list") in text and "No superdiffusion runs" in text
    cfg = json.loads((out / rows[0]["run"] / "split.json").read_text())
    assert not {"synth010", "synth011"} & set(cfg["labelled"] + cfg["unlabelled"] + cfg["val"])
    assert (out / rows[0]["run"] / "test_eval.json").is_file()
    assert_png(out / "overlays.png")  # volumes: three orthogonal slices per case, from the test cases here


def test_ablations_have_tables_and_plots(tmp_path, count_training):
    out = tmp_path / "out"
    assert bench(out, "--methods", "superdiffusion", "--ablation", "rounds,teacher", "--fractions", "0.25",
                 "--seeds", "0", "--steps", "4") == 0
    # R3-independent and pretrained are the plain superdiffusion config: trained once, not three times
    assert sorted(p.parts[-3] for p, _ in count_training) == sorted(
        ["superdiffusion", "superdiffusion--R0", "superdiffusion--R1", "superdiffusion--R3-chained",
         "superdiffusion--scratch"])
    rows = read_rows(out)
    runs = {r["method"]: r["run"] for r in rows}
    assert runs["superdiffusion[R3-independent]"] == runs["superdiffusion"] == runs["superdiffusion[pretrained]"]
    teacher_rows = [r for r in rows if r["method"] == "superdiffusion[scratch]"]
    assert {r["predictor"] for r in teacher_rows} == {"teacher", "student"}
    text = (out / "summary.md").read_text()
    for needle in ("## Ablation: rounds", "| superdiffusion[R0] | 0.25 |", "| superdiffusion[R3-chained] | 0.25 |",
                   "## Ablation: teacher", "| superdiffusion[scratch] (student) | 0.25 |",
                   "| superdiffusion[pretrained] (teacher) | 0.25 |"):
        assert needle in text, needle
    assert_png(out / "ablation_rounds.png")
    assert_png(out / "ablation_teacher.png")


@pytest.mark.parametrize("args, needle", [
    (["--protocol", "nope"], "nope"),
    (["--protocol", "synthetic", "--methods", "supervised,nope"], "nope"),
    (["--protocol", "synthetic", "--ablation", "depth"], "depth"),
    (["--protocol", "synthetic", "--fractions", "0.25,abc"], "abc"),
    (["--protocol", "synthetic", "--set", "seed=3"], "--seeds"),
    (["--protocol", "synthetic", "--set", "split.val=0"], "nothing to evaluate"),
    (["--protocol", "synthetic", "--set", "train.stepz=3"], "train.stepz"),
    (["--protocol", "synthetic", "--fractions", "20"], "split.labelled"),
    (["--protocol", "synthetic", "--jobs", "0"], "--jobs"),
])
def test_bad_inputs_fail_before_training(tmp_path, monkeypatch, capsys, args, needle):
    monkeypatch.setattr(runner, "train_run", lambda *a, **k: pytest.fail("trained despite bad input"))
    out = tmp_path / "out"
    assert main(["bench", "--out", str(out), "--no-progress", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert not out.exists()


def test_unreadable_test_case_fails_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(runner, "train_run", lambda *a, **k: pytest.fail("trained despite bad input"))
    test = write_synthetic_dataset(tmp_path / "test", 2, dims=3, shape=(16, 16, 8), seed=1, fmt="la")
    (test / "synth001" / "mri_norm2.h5").write_bytes(b"not hdf5")
    assert main(["bench", "--protocol", "synthetic", "--out", str(tmp_path / "out"), "--set", "data.format=la",
                 "--set", f"data.root={test}", "--test-data", str(test), "--no-progress"]) == 2
    assert "synth001" in capsys.readouterr().err


def test_shipped_protocols_plan(tmp_path):
    """Every shipped protocol, method and ablation variant gives a valid run config (no data touched)."""
    assert {"synthetic", "la2d", "la3d", "la3d-full"} <= set(shipped_protocols())
    for name in shipped_protocols():
        p = load_protocol(name)
        specs = runner.plan(p, list(p.bench["methods"]), list(p.ablations.values()), [0.1, 0.2], [0], tmp_path,
                            sets={}, data={}, steps=None)
        assert {s.label for s in specs} >= set(p.bench["methods"])
        for spec in specs:  # each method's own checks pass on every variant (no data: one image channel)
            check_config(spec.cfg)
            build_method(spec.cfg, in_channels=1)
    full = load_protocol("la3d-full").base
    assert full["split"]["val"] == 0 and full["eval"]["checkpoint"] == "last"
    ids = [f"case{i:02d}" for i in range(80)]
    assert [len(make_split(ids, labelled=f, val=0)["labelled"]) for f in (0.1, 0.2)] == [8, 16]


def test_la3d_trains_on_la2ds_cases_in_3d():
    """la3d and la2d carve the same validation cases and label the same ones at every seed and count, so 2D and 3D
    are compared case by case; la3d trains full-resolution 112x112x80 patches and validates cheaply during training
    (a few cases, a coarse overlap), every case at the end."""
    la2d, la3d = load_protocol("la2d"), load_protocol("la3d")
    for seed in (0, 1, 2):
        for count in (8, 16):
            a, b = (runner.make_config(p, "supervised", count, seed, sets={}, data={}, steps=None)
                    for p in (la2d, la3d))
            assert a["split"] == b["split"] and a["seed"] == b["seed"] == seed
            assert {k: a["data"][k] for k in ("format", "root", "list")} == \
                {k: b["data"][k] for k in ("format", "root", "list")}
            assert b["data"]["dims"] == 3 and b["data"]["scale"] is None and b["data"]["size"] is None
    base = la3d.base
    assert base["train"]["patch"] == [112, 112, 80] and base["train"]["batch_size"] == 2
    assert base["eval"]["checkpoint"] == "last" and base["train"]["val_cases"] < base["split"]["val"]
    assert base["train"]["val_overlap"] < base["eval"]["overlap"]


def test_la2d_gives_bcp_its_constant_rate():
    """la2d's per-method settings reach each run's config: BCP keeps its code's constant learning rate, every other
    method poly decay; SuperDiffusion's 8 unlabelled slices."""
    p = load_protocol("la2d")
    cfg = {m: runner.make_config(p, m, 8, 0, sets={}, data={}, steps=None)
           for m in ("supervised", "mean-teacher", "cps", "bcp", "superdiffusion")}
    assert {m: c["train"]["lr_schedule"] for m, c in cfg.items()} == {
        "supervised": "poly", "mean-teacher": "poly", "cps": "poly", "bcp": "constant", "superdiffusion": "poly"}
    assert cfg["superdiffusion"]["train"]["unlabelled_batch_size"] == 8 and cfg["bcp"]["bcp"]["largest_component"]


def test_help_mentions_every_option(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for option in ("--protocol", "--methods", "--fractions", "--seeds", "--out", "--ablation", "--train-data",
                   "--train-list", "--test-data", "--test-list", "--steps", "--set", "--no-progress"):
        assert option in text


def test_output_folder_layout(main_bench):
    """The output folder holds the tables, the figures and the run folders, nothing else."""
    names = {p.name for p in main_bench.iterdir()}
    assert names == {"results.csv", "summary.md", "dice_vs_fraction.png", "val_curves.png", "qualitative.png",
                     "overlays.png", "runs"}


def test_pseudo_label_monitor_figure(tmp_path):
    """With eval.monitor_pseudo_labels the bench draws each labeller's pseudo-label Dice (pseudo_labels.png) from the
    runs' `pl_<labeller>_dice` log entries, and summary.md lists the figure."""
    from superdiffusion.bench.figures import read_pseudo_labels

    out = tmp_path / "out"
    assert bench(out, "--methods", "fixmatch", "--fractions", "0.25", "--seeds", "0",
                 "--set", "eval.monitor_pseudo_labels=8", "--set", "superdiffusion.ema=0.9") == 0
    run = next((out / "runs").glob("fixmatch/frac0.25/seed0"))
    curves = read_pseudo_labels(run)
    assert set(curves) == {"ema"} and [s for s, _ in curves["ema"]] == [10, 20]
    assert all(0 <= d <= 1 for _, d in curves["ema"])
    assert_png(out / "pseudo_labels.png")
    assert "`pseudo_labels.png`" in (out / "summary.md").read_text()
