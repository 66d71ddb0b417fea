"""Export: the TorchScript artefact, loaded in a process that never imports superdiffusion, gives the masks of
`predict` voxel for voxel (2D, 3D, a 2D net on 3D volumes with resampling and padding, the diffusion teacher)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from superdiffusion.cli.main import main
from superdiffusion.config import load_config
from superdiffusion.data.pipeline import input_refs, load_cases
from superdiffusion.data.readers import load_case, read_mask
from superdiffusion.data.synthetic import make_synthetic_dataset, write_synthetic_dataset
from superdiffusion.engine.run import train_run
from superdiffusion.errors import InputError
from superdiffusion.evaluation.export import export_run, logits_module, script_segmenter
from superdiffusion.evaluation.inference import predict_probabilities, segment
from superdiffusion.evaluation.predict import load_run
from superdiffusion.methods import build_method

TINY = ["data.format=synthetic", "split.labelled=3", "split.val=3", "model.channels=[4, 8]", "train.steps=4",
        "train.batch_size=2", "train.unlabelled_batch_size=2", "train.val_every=4", "train.ckpt_every=4",
        "train.threads=1", "superdiffusion.pretrain_steps=2"]
RUNS = {  # name: overrides; patches smaller than the images, so windows overlap (or pad, after resampling)
    "sup2d": ["data.synthetic={cases: 10, shape: [40, 40], seed: 0}", "train.patch=[32, 32]"],
    "sd2d": ["method=superdiffusion", "data.synthetic={cases: 10, shape: [40, 40], seed: 0}",
             "train.patch=[32, 32]", "eval.sw_batch_size=3"],
    "sup3d": ["data.dims=3", "data.synthetic={cases: 10, shape: [24, 24, 20], seed: 0}",
              "train.patch=[16, 16, 16]", "model.norm=instance"],
    "slices": ["data.dims=2", "data.synthetic={cases: 10, shape: [24, 26, 20], seed: 0}", "train.patch=[16, 16]",
               "data.scale=[0.5, 0.5, 1.0]"],
}
PREDICT = r"""
import json, sys
import numpy as np, torch
jobs = json.loads(sys.argv[1])
metas = {}
for model, pairs in jobs.items():
    extra = {"meta.json": "", "config.json": ""}
    net = torch.jit.load(model, _extra_files=extra)
    metas[model] = json.loads(extra["meta.json"])
    for src, dst in pairs:
        np.save(dst, net(torch.from_numpy(np.load(src))).numpy())
assert "superdiffusion" not in sys.modules, "the artefact must not need superdiffusion"
print(json.dumps(metas))
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for name, sets in RUNS.items():
        train_run(load_config(None, [*TINY, *sets]), root / name, progress=False)
        out[name] = root / name
    return out


def test_artefact_predicts_like_predict_without_superdiffusion(runs, tmp_path, capsys):
    exports = {"sup2d": None, "sd2d": "student", "sd2d-teacher": "teacher", "sup3d": None, "slices": None}
    jobs, expected = {}, {}
    for key, predictor in exports.items():
        run = runs[key.split("-")[0]]
        model = tmp_path / f"{key}.pt"
        argv = ["export", str(run), "--out", str(model)] + (["--predictor", predictor] if predictor else [])
        assert main(argv) == 0
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["out"] == str(model)
        loaded = load_run(run, predictor=predictor)
        cases = load_cases(loaded.cfg["data"])[:3]  # validation-sized sample of the run's own kind of data
        jobs[str(model)] = []
        for case in cases:
            src, dst = tmp_path / f"{key}-{case.id}.npy", tmp_path / f"{key}-{case.id}-mask.npy"
            np.save(src, case.image)
            jobs[str(model)].append((str(src), str(dst)))
            expected[str(dst)] = segment(loaded.probabilities(case))

    # `superdiffusion predict` itself, on files, for the 3D run
    images = write_synthetic_dataset(tmp_path / "vol", 2, dims=3, shape=(24, 24, 20), seed=7, fmt="volumes")
    images = images / "images"
    assert main(["predict", str(runs["sup3d"]), str(images), "--out", str(tmp_path / "masks")]) == 0
    capsys.readouterr()
    for ref in input_refs([images]):
        case = load_case(ref, with_label=False)
        src, dst = tmp_path / f"file-{case.id}.npy", tmp_path / f"file-{case.id}-mask.npy"
        np.save(src, case.image)
        jobs[str(tmp_path / "sup3d.pt")].append((str(src), str(dst)))
        expected[str(dst)] = read_mask(next((tmp_path / "masks").glob(f"{case.id}.*")))[0]

    proc = subprocess.run([sys.executable, "-c", PREDICT, json.dumps(jobs)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    metas = json.loads(proc.stdout)
    assert metas[str(tmp_path / "sd2d-teacher.pt")]["predictor"] == "teacher"
    assert metas[str(tmp_path / "sup3d.pt")]["net_dims"] == 3
    for dst, want in expected.items():
        got = np.load(dst)
        assert got.dtype == np.int64 and got.shape == want.shape, dst
        assert np.array_equal(got, want), f"{dst}: {np.mean(got != want):.2%} of voxels differ"
    assert any(want.any() for want in expected.values())  # not trivially all background


@pytest.mark.parametrize("method,dims,shape,patch,extra,predictors", [
    ("cps", 2, (30, 22), [16, 16], ["eval.overlap=0.25"], ["net1", "ensemble"]),
    ("superdiffusion", 2, (40, 40), [32, 32], ["superdiffusion.student=twin"], ["student"]),
    ("superdiffusion", 3, (20, 18, 12), [16, 16, 8], ["model.norm=instance", "eval.sw_batch_size=3",
                                                    "model.time_embedding=blocks", "model.arch=double-conv"],
     ["teacher"]),
    ("supervised", 2, (30, 25, 8), [16, 16], ["data.size=[16, 16, null]"], ["student"]),
    ("mean-teacher", 2, (24, 20, 9), [16, 16], ["data.scale=[0.8, 1.3, 1.0]", "data.slice_axis=1"], ["teacher"]),
])
def test_scripted_probabilities_equal_inference(method, dims, shape, patch, extra, predictors):
    """Every kind of predictor, untrained: the scripted pipeline's probabilities equal inference.py's exactly."""
    cfg = load_config(None, ["model.channels=[4, 8]", f"method={method}", f"data.dims={dims}", f"train.patch={patch}",
                             *extra])
    torch.manual_seed(0)
    m = build_method(cfg, in_channels=1).eval()
    case = make_synthetic_dataset(1, dims=len(shape), shape=shape, seed=3)[0]
    for name in predictors:
        scripted = script_segmenter(m, name, cfg)
        want = predict_probabilities(m.predictors()[name], case, data_cfg=cfg["data"], dims=dims, patch=patch,
                                     overlap=cfg["eval"]["overlap"], sw_batch_size=cfg["eval"]["sw_batch_size"])
        got = scripted.probabilities(torch.from_numpy(case.image)).numpy()
        assert np.array_equal(got, want), f"{name}: max |diff| {np.abs(got - want).max()}"
        assert np.array_equal(scripted(torch.from_numpy(case.image)).numpy(), segment(want))


def test_export_refuses_overwrite_and_inexact_teachers(runs, tmp_path, capsys):
    existing = tmp_path / "model.pt"
    existing.write_text("keep me")
    assert main(["export", str(runs["sup2d"]), "--out", str(existing)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and str(existing) in err[0]
    assert existing.read_text() == "keep me"
    run = load_run(runs["sd2d"])
    cfg = {**run.cfg, "diffusion": {**run.cfg["diffusion"], "inference": "ddim"}}
    with pytest.raises(InputError, match="fixed-t"):
        logits_module(run.method, "teacher", cfg)
    with pytest.raises(InputError, match="net9"):
        export_run(runs["sup2d"], tmp_path / "other.pt", predictor="net9")


def test_export_refuses_an_impossible_out_before_scripting(runs, tmp_path, monkeypatch):
    import superdiffusion.evaluation.export as export

    afile = tmp_path / "afile"
    afile.write_text("x")
    monkeypatch.setattr(export, "script_segmenter", lambda *a, **k: pytest.fail("scripted before the check"))
    with pytest.raises(InputError, match="afile") as exc:
        export_run(runs["sup2d"], afile / "sub" / "model.pt")
    assert "\n" not in str(exc.value) and afile.read_text() == "x"
    existing = tmp_path / "model.pt"
    existing.write_bytes(b"mine")
    with pytest.raises(InputError, match="exists already"):
        export_run(runs["sup2d"], existing)
    assert existing.read_bytes() == b"mine"


def test_export_uses_the_runs_threads_or_threads(runs, tmp_path):
    torch.set_num_threads(2)
    export_run(runs["sup2d"], tmp_path / "a.pt")  # trained with train.threads=1
    assert torch.get_num_threads() == 1
    export_run(runs["sup2d"], tmp_path / "b.pt", threads=2)
    assert torch.get_num_threads() == 2
