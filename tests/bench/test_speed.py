"""bench-speed on tiny sizes: every row is measured and printed with positive numbers (no timing assertions)."""

from __future__ import annotations

import json

import pytest

from superdiffusion.bench.speed import TRAIN_ROWS, _Runner, format_report, run_benchmark
from superdiffusion.cli.main import main
from superdiffusion.errors import InputError

TINY = {"train2d": [16, 16], "batch2d": [2, 1], "train3d": [8, 8, 8], "batch3d": [1, 1], "window2d": [16, 16],
        "window3d": [8, 8, 8], "volume2d": [24, 20, 4], "volume3d": [12, 10, 8]}
SETS = ["model.channels=[4, 8]", "model.dropout=0.0", "diffusion.ddim_steps=2", "diffusion.ensemble=2"]
INFER_ROWS = ["teacher one pass", "teacher DDIM k=2", "teacher ensemble n=2", "student volume"]


@pytest.fixture(scope="module")
def result():
    return run_benchmark(dims="both", repeats=1, warmup=0, overrides=SETS, sizes=TINY, isolate=False,
                         switches=["channels_last"])


def test_every_row_is_measured_and_printed(result):
    for d in (2, 3):
        rows = {r["row"]: r for r in result["rows"] if r["dims"] == d}
        assert list(rows) == [name for name, _, _ in TRAIN_ROWS] + INFER_ROWS
        for r in rows.values():
            assert "error" not in r, r
            for key in ("seconds", "rate", "peak_mib", "x_supervised"):
                assert r[key] > 0, (d, r["row"], key)
            assert r["growth_mib"] >= 0 and len(r["runs"]) == 1
        assert rows["supervised"]["x_supervised"] == 1
        assert rows["superdiffusion R=3"]["images"] == sum(TINY[f"batch{d}d"])  # labelled + unlabelled
    effects = result["effects"]
    assert {(e["dims"], e["row"]) for e in effects} == {(d, r) for d in (2, 3) for r in
                                                       ("supervised", "superdiffusion R=3", "student volume")}
    assert all(e["speedup"] > 0 for e in effects)
    text = format_report(result)
    for name in [n for n, _, _ in TRAIN_ROWS] + INFER_ROWS:
        assert text.count(name) >= 2, name
    assert "co-training step R=3 16x16, batch 2+1:" in text and "target <= 3.8 s" in text and "1.6 GiB" in text
    assert "no verdict" in text  # tiny sizes are not the reference protocol
    # the package's supervised step beside a plain MONAI UNet of the config's widths, same process: 2D at 96x96
    # batch 16, 3D at the training rows' patch and labelled batch
    plain = {(r["dims"], r["row"]): r for r in result["plain_unet"]}
    assert list(plain) == [(2, "supervised (la2d-superdiffusion)"), (2, "plain MONAI UNet"),
                           (3, "supervised (la3d-superdiffusion)"), (3, "plain MONAI UNet")]
    assert all("error" not in r and r["rate"] > 0 and len(r["runs"]) >= 5 for r in plain.values())
    assert [r["size"] for r in plain.values()] == ["96x96, batch 16"] * 2 + ["8x8x8, batch 1"] * 2
    for d in (2, 3):  # the same network, but for the package's affine instance norms
        ours = plain[d, f"supervised (la{d}d-superdiffusion)"]["params"]
        library = plain[d, "plain MONAI UNet"]["params"]
        assert 0 < ours - library <= 2 * 2 * sum([4, 8])  # a scale and a shift per channel of each norm
    assert "96x96, batch 16" in text and "8x8x8, batch 1" in text and text.count("\n3    plain MONAI UNet") == 1
    json.dumps(result)  # --json writes it as is


def test_isolated_row_reports_its_own_process_memory():
    spec = {"config": "la2d-superdiffusion", "overrides": SETS, "device": "cpu", "threads": 1, "warmup": 0,
            "repeats": 1, "batch": [2, 2], "shape": [16, 16], "method": "supervised", "row_overrides": [],
            "variant": {}}
    row = _Runner(isolate=True)("train", spec)
    assert row["seconds"] > 0 and row["peak_mib"] > row["growth_mib"] > 0
    held = _Runner(isolate=True)("train", {**spec, "variant": {"hold_memory": True}})
    assert "error" not in held and held["seconds"] > 0


def test_cli_refuses_bad_input(tmp_path, capsys):
    existing = tmp_path / "speed.json"
    existing.write_text("{}")
    assert main(["bench-speed", "--json", str(existing)]) == 2
    assert main(["bench-speed", "--amp", "--device", "cpu"]) == 2
    assert main(["bench-speed", "--hold-memory", "--in-process"]) == 2  # it would change the shared process
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("error: ") for line in err)
    assert existing.read_text() == "{}"


def test_only_the_named_rows():
    """--rows: the named training rows alone (the 3D supervised step beside plain MONAI's, as la3d's speed check),
    no inference unless named; an unknown name is refused before anything is measured."""
    result = run_benchmark(dims="3", sizes=TINY, overrides=SETS, repeats=1, warmup=0, isolate=False, threads=1,
                           only=["supervised"])
    assert [r["row"] for r in result["rows"]] == ["supervised"]
    assert [r["row"] for r in result["plain_unet"]] == ["supervised (la3d-superdiffusion)", "plain MONAI UNet"]
    with pytest.raises(InputError, match="--rows"):
        run_benchmark(dims="3", sizes=TINY, overrides=SETS, isolate=False, only=["superdiffusion"])
