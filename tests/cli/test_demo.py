"""The demo's closing sentence: SuperDiffusion's paired per-case gain over supervised, on the validation cases."""

from __future__ import annotations

from superdiffusion.cli.demo import gain_line


def test_gain_line_reports_the_paired_difference():
    sup = {f"case{i}": 0.70 + 0.01 * i for i in range(8)}
    sd = {c: v + (0.06 if i != 3 else -0.02) for i, (c, v) in enumerate(sup.items())}
    line = gain_line(sd, sup)
    assert line.startswith("SuperDiffusion gains +0.050 Dice over supervised: better on 7 of 8 validation cases")
    assert "p = 0.0" in line  # 7 of 8 the same sign: Wilcoxon p = 0.016
    assert gain_line(sup, sd).startswith("SuperDiffusion loses -0.050")
