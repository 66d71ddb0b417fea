"""The demo's closing sentence: SuperDiffusion's paired per-case gain over supervised, on the validation cases."""

from __future__ import annotations

from superdiffusion.cli.demo import gain_line


def test_gain_line_reports_the_paired_difference():
    sup = {f"case{i}": 0.70 + 0.01 * i for i in range(8)}
    sd = {c: v + (0.06 if i != 3 else -0.02) for i, (c, v) in enumerate(sup.items())}
    line = gain_line(sd, sup)
    assert line.startswith("SuperDiffusion gains +0.050 Dice over supervised: better on 7 of 8 validation cases")
    assert "p = 0.0" in line  # 7 of 8 the same sign: Wilcoxon p = 0.016
    assert gain_line(sup, sd).startswith("SuperDiffusion loses 0.050 Dice to supervised: better on 1 of 8")
    line = gain_line(sd, sup, "the teacher-less control", "SuperDiffusion")
    assert line.startswith("The teacher-less control gains +0.050 Dice over SuperDiffusion")


def test_demo_steps_caps_pretraining(tmp_path, monkeypatch):
    """`demo --steps N` is a quick look: SuperDiffusion's pre-training is capped at N too (as `bench --steps`)."""
    from superdiffusion.cli import demo

    seen = {}

    def fake_train(cfg, run_dir, resume, progress):
        seen[cfg["method"]] = (cfg["train"]["steps"], cfg["superdiffusion"]["pretrain_steps"])
        case = {"dice": 0.5, "jaccard": 0.3, "hd95": 1.0, "asd": 1.0}
        return {"predictor": "student", "steps": cfg["train"]["steps"], "wall_time_s": 1.0,
                "checkpoint_rule": "last step", "split": {"labelled": [1], "unlabelled": [2], "val": [3]},
                "val": {"student": {"per_case": {"a": case, "b": case}, "mean": case}}}

    monkeypatch.setattr(demo, "train_run", fake_train)
    monkeypatch.setattr(demo, "mean_table", lambda results: results["val"]["student"]["mean"])
    demo.run_demo(tmp_path, steps=20, progress=False)
    assert seen == {m: (20, 20) for m in demo.METHODS}
    assert "teacher-less control" in (tmp_path / "summary.md").read_text()
