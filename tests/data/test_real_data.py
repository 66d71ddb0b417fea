"""The real benchmark sets, read as the shipped protocols read them: LA (3D MRI, its preprocessed .h5 layout) and PH2
(RGB dermoscopy in PH2's own layout). They are not part of the repository; each test skips cleanly where its set is
absent (SUPERDIFFUSION_DATA names the folder holding LA/ and PH2/; default ../shared/data beside the checkout)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from superdiffusion.bench.protocols import load_protocol
from superdiffusion.config import load_config
from superdiffusion.data.pipeline import case_listing, load_cases, prepare_case

DATA = Path(os.environ.get("SUPERDIFFUSION_DATA", Path(__file__).resolve().parents[2].parent / "shared" / "data"))


def _root(name: str) -> Path:
    root = DATA / name
    if not (root / "train.list").is_file():
        pytest.skip(f"{root} is absent (the real {name} set is not part of the repository)")
    return root


def _data_cfg(protocol: str, name: str) -> dict:
    return {**load_protocol(protocol).base["data"], "root": str(_root(name))}


def test_la_cases_as_la2d_and_la3d_read_them():
    cfg = _data_cfg("la2d", "LA")
    ids, unlabelled = case_listing(cfg)
    assert len(ids) == 80 and not unlabelled  # every training case has its label
    case = load_cases(cfg, ids[:1])[0]
    assert case.image.ndim == 4 and case.image.shape[0] == 1 and case.image.shape[-1] == 88
    assert set(np.unique(case.label)) == {0, 1} and 0.01 < case.label.mean() < 0.2
    sliced = prepare_case(case, cfg)  # la2d: every axial slice resized to 96x96
    assert sliced.image.shape[1:3] == (96, 96)
    full = prepare_case(case, _data_cfg("la3d", "LA"))  # la3d: the volume as it is
    assert full.image.shape == case.image.shape


def test_ph2_cases_are_rgb_with_lesion_masks():
    cfg = {**load_config(None)["data"], "format": "ph2", "root": str(_root("PH2")), "list": "train.list",
           "size": [128, 128]}
    ids, unlabelled = case_listing(cfg)
    assert len(ids) == 150 and not unlabelled
    for case in load_cases(cfg, ids[:2]):
        assert case.image.shape[0] == 3 and case.spatial_dims == 2  # colour, channels first
        assert 250 < case.image.shape[1] + case.image.shape[2] < 800  # half resolution, about 382 x 287
        assert set(np.unique(case.label)) == {0, 1}
        assert prepare_case(case, cfg).image.shape == (3, 128, 128)
