"""`superdiffusion report`: one self-contained HTML file for a run and for a bench folder; it renders in headless
Chromium (Debian's package, which .ci/run installs) to a picture that is not blank, without console errors."""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest
from conftest import TINY_2D

import superdiffusion as sd
from superdiffusion.bench.html import markdown_html, write_report
from superdiffusion.cli.main import main
from superdiffusion.errors import InputError

TINY = ["method=supervised", *TINY_2D, "train.ckpt_every=6"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "run"
    sd.train("demo", out, overrides=TINY, progress=False)
    return out


def test_run_report_is_one_self_contained_file(run_dir, tmp_path, capsys):
    out = tmp_path / "report.html"
    assert main(["report", str(run_dir), "--out", str(out)]) == 0
    text = out.read_text()
    for needle in ("Protocol", "Split", "Validation metrics", "Learning curves", "Validation cases", "student",
                   "last step" if "last" in text else "best validation Dice"):
        assert needle in text, needle
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(images) == 2  # learning curves and overlays, inline
    assert not re.search(r'(src|href)="(?!data:)', text)  # nothing fetched from elsewhere
    with pytest.raises(InputError, match="exists already"):
        write_report(run_dir, out)  # never overwritten


def test_protocol_table_shows_the_input_grid_and_intensity_as_configured():
    from superdiffusion.bench.html import protocol_rows
    from superdiffusion.config import load_config

    cfg = load_config(None, [*TINY, "data.spacing=[1.25, 1.25, 2.5]", "data.orientation=RAS",
                             "data.intensity=zscore"])
    rows = dict(protocol_rows(cfg))
    assert rows["input grid"] == "spacing [1.25, 1.25, 2.5], size None, scale None, orientation RAS"
    assert rows["intensity"] == "zscore" and rows["network dims"] == "2D"


def test_run_report_says_why_the_validation_pictures_are_missing(run_dir, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    for path in (copy / "checkpoints").glob("*.pt"):
        path.write_bytes(b"damaged")
    text = write_report(copy, tmp_path / "r.html").read_text()
    assert "No validation pictures" in text and "could not be loaded" in text
    assert str(copy / "checkpoints") in text and "not a readable superdiffusion checkpoint" in text
    assert "Validation metrics" in text and "Learning curves" in text  # the rest of the report is there


def test_report_out_under_a_file_is_refused_before_any_work(run_dir, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(InputError, match="afile"):
        write_report(run_dir, afile / "sub" / "r.html")
    assert afile.read_text() == "x"


def test_bench_report_renders_the_summary_tables_and_figures(tmp_path):
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "summary.md").write_text("# Benchmark: protocol `x`\n\nSome text with **bold**.\n\n- a\n  - b\n\n"
                                      "## Main results\n\n| method | Dice |\n|---|---|\n| supervised | 0.7 < 0.8 |\n")
    from matplotlib.figure import Figure

    from superdiffusion.bench.html import png

    fig = Figure()
    fig.add_subplot().plot([0, 1])
    (bench / "dice_vs_fraction.png").write_bytes(png(fig))
    text = write_report(bench, tmp_path / "b.html").read_text()
    assert "<th>method</th>" in text and "<td>0.7 &lt; 0.8</td>" in text and "<b>bold</b>" in text
    assert text.count("data:image/png;base64,") == 1 and "<h2>Main results</h2>" not in text.split("<h1>")[0]
    assert markdown_html("# T\n## H", skip_title=True) == "<h3>H</h3>"
    with pytest.raises(InputError, match="neither a run folder"):
        write_report(tmp_path, tmp_path / "c.html")


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (.ci/run installs Debian's chromium package; "
                                             "it could not be installed on this machine)")
def test_report_renders_in_headless_chromium(run_dir, tmp_path):
    from PIL import Image

    report = write_report(run_dir, tmp_path / "report.html")
    shot = tmp_path / "shot.png"
    result = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--enable-logging=stderr",
         "--v=0", f"--screenshot={shot}", "--window-size=1200,1600", f"file://{report}"],
        capture_output=True, text=True, timeout=120)
    assert shot.is_file(), result.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.std() > 10 and (pixels < 128).mean() > 0.005  # text, tables and figures: not a blank page
    console = [line for line in result.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not console, console
