"""Training streams: re-drawable crops, 2D slices of 3D cases, padding, and unlabelled data that never
carries (or even opens) a label."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from superdiffusion.data import pipeline
from superdiffusion.data.case import Case
from superdiffusion.data.perturb import PhotometricView
from superdiffusion.data.pipeline import (
    PatchSampler,
    build_data,
    crop,
    input_refs,
    normalize,
    prepare_case,
    ref_for_file,
)
from superdiffusion.data.readers import discover, load_case
from superdiffusion.data.splits import make_split
from superdiffusion.data.synthetic import make_synthetic_dataset, write_synthetic_dataset
from superdiffusion.engine.run import train_run
from superdiffusion.errors import InputError


def _cases(n=4, shape=(20, 24), seed=0) -> list[Case]:
    return make_synthetic_dataset(n, dims=len(shape), shape=shape, seed=seed)


# ------------------------------------------------------------------------------------------ PatchSampler
def test_batch_is_redrawable_and_varies_with_step_rank_stream_seed():
    cases = _cases()
    s = PatchSampler(cases, dims=2, patch=[16, 16], fg_oversample=0.5, seed=3)
    a, b = s.batch(5, 4), s.batch(5, 4)
    assert set(a) == {"image", "label"}
    assert a["image"].shape == (4, 1, 16, 16) and a["image"].dtype == torch.float32
    assert a["label"].shape == (4, 16, 16) and a["label"].dtype == torch.int64
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    # drawing other steps in between does not change what step 5 gives (no hidden iterator state)
    s.batch(6, 4)
    s.batch(0, 4)
    assert torch.equal(s.batch(5, 4)["image"], a["image"])
    # a fresh sampler with the same seed (e.g. after resume) gives the same batch
    assert torch.equal(PatchSampler(cases, dims=2, patch=[16, 16], fg_oversample=0.5, seed=3).batch(5, 4)["image"],
                       a["image"])
    assert not torch.equal(s.batch(6, 4)["image"], a["image"])
    assert not torch.equal(s.batch(5, 4, rank=1)["image"], a["image"])
    other_stream = PatchSampler(cases, dims=2, patch=[16, 16], fg_oversample=0.5, seed=3, stream=1)
    assert not torch.equal(other_stream.batch(5, 4)["image"], a["image"])
    other_seed = PatchSampler(cases, dims=2, patch=[16, 16], fg_oversample=0.5, seed=4)
    assert not torch.equal(other_seed.batch(5, 4)["image"], a["image"])


def test_augmentation_moves_image_and_label_together():
    """Label = (image > 0) before cropping; flips and rotations must keep that relation exactly."""
    cases = []
    for c in _cases(3, shape=(24, 24)):
        img = c.image.copy()
        img[np.abs(img) < 1e-6] = 1e-3  # no ties at 0
        cases.append(Case(c.id, img, (img[0] > 0).astype(np.int64), c.spacing, c.source, c.meta))
    s = PatchSampler(cases, dims=2, patch=[16, 16], augment=True, seed=0)
    for step in range(10):
        b = s.batch(step, 4)
        assert torch.equal(b["label"], (b["image"][:, 0] > 0).long())


def test_ssl4mis_augmentation_moves_image_and_label_together_in_its_proportions():
    """SSL4MIS's RandomGenerator: rot90 + flip half the time, else a rotation by up to 20 degrees half the time,
    else nothing; the label follows the image exactly (nearest neighbour), the outside is filled with `fill`."""
    rng = np.random.default_rng(0)
    label = np.zeros((24, 24), np.int64)
    label[4:14, 6:20] = 1
    label[15:20, 3:8] = 2
    image = label[None].astype(np.float32) + 1  # classes 1, 2, 3 in the image; 0 only where filled
    kinds = {"same": 0, "right-angle": 0, "rotated": 0}
    for _ in range(400):
        img, lab = pipeline.ssl4mis_augment(image, label, rng, fill=0.0)
        assert img.shape == image.shape and lab.shape == label.shape
        inside = img[0] > 0
        assert np.array_equal(img[0][inside] - 1, lab[inside]) and not lab[~inside].any()
        if np.array_equal(img, image):
            kinds["same"] += 1
        elif inside.all():  # rot90 and flips move pixels but fill none
            kinds["right-angle"] += 1
        else:
            kinds["rotated"] += 1
    # identity draws also come from rot90 k = 0 + a flip (never identical) or a 0-degree rotation (1 in 40)
    assert 0.19 < kinds["same"] / 400 < 0.32 and 0.42 < kinds["right-angle"] / 400 < 0.58
    assert 0.18 < kinds["rotated"] / 400 < 0.32


def test_photometric_augmentation_changes_intensities_of_the_same_crops():
    """train.photometric: the same crops and labels as without it (drawn after them), intensities perturbed,
    redrawable from (seed, step)."""
    cases = _cases()
    plain = PatchSampler(cases, dims=2, patch=[16, 16], fg_oversample=0.5, seed=3)
    view = PatchSampler(cases, dims=2, patch=[16, 16], fg_oversample=0.5, seed=3, photometric=PhotometricView())
    a, b = plain.batch(5, 4), view.batch(5, 4)
    assert torch.equal(a["label"], b["label"])
    assert not torch.allclose(a["image"], b["image"])
    assert torch.equal(view.batch(5, 4)["image"], b["image"])


@pytest.mark.parametrize(("slice_axis", "plane"), [(0, (14, 10)), (1, (12, 10)), (2, (12, 14))])
def test_2d_slices_of_3d_cases(slice_axis, plane):
    cases = _cases(2, shape=(12, 14, 10))
    s = PatchSampler(cases, dims=2, patch=list(plane), slice_axis=slice_axis, augment=False, seed=1)
    assert s.slicing
    b = s.batch(0, 6)
    assert b["image"].shape == (6, 1, *plane) and b["label"].shape == (6, *plane)
    # with the patch equal to the plane and no augmentation, every sample is an exact slice of a case
    all_slices = [(np.take(c.image, i, axis=1 + slice_axis), np.take(c.label, i, axis=slice_axis))
                  for c in cases for i in range(c.image.shape[1 + slice_axis])]
    for img, lab in zip(b["image"].numpy(), b["label"].numpy()):
        assert any(np.array_equal(img, si) and np.array_equal(lab, sl) for si, sl in all_slices)


def test_3d_patches_of_3d_cases():
    s = PatchSampler(_cases(2, shape=(12, 14, 10)), dims=3, patch=[8, 8, 8], seed=0)
    b = s.batch(0, 2)
    assert b["image"].shape == (2, 1, 8, 8, 8) and b["label"].shape == (2, 8, 8, 8)


def test_crop_pads_small_images():
    rng = np.random.default_rng(0)
    image = rng.standard_normal((2, 5, 7)).astype(np.float32)
    label = np.ones((5, 7), np.int64)
    out, lab = crop(image, label, (8, 8), rng)
    assert out.shape == (2, 8, 8) and lab.shape == (8, 8)
    assert lab.sum() == 35  # every original pixel kept, the padding is background
    assert np.isclose(out[:, lab == 0], image.min()).all()  # image padded with its minimum
    ys, xs = np.nonzero(lab)
    assert np.array_equal(out[:, ys.min(): ys.max() + 1, xs.min(): xs.max() + 1], image)
    # mixed: one axis padded, the other cropped
    out, lab = crop(image, label, (8, 4), rng)
    assert out.shape == (2, 8, 4) and lab.shape == (8, 4)
    # unlabelled
    out, lab = crop(image, None, (8, 8), rng)
    assert out.shape == (2, 8, 8) and lab is None


def test_sampler_pads_through_crop_and_augment():
    s = PatchSampler(_cases(2, shape=(10, 12)), dims=2, patch=[16, 16], seed=0)
    b = s.batch(0, 3)
    assert b["image"].shape == (3, 1, 16, 16) and b["label"].shape == (3, 16, 16)


def test_centred_crops_contain_foreground():
    s = PatchSampler(_cases(4, shape=(48, 48)), dims=2, patch=[16, 16], fg_oversample=1.0, seed=0)
    for step in range(5):
        assert (s.batch(step, 4)["label"].flatten(1).sum(1) > 0).all()


def test_sampler_errors():
    with pytest.raises(InputError, match="no cases"):
        PatchSampler([], dims=2, patch=[8, 8])
    with pytest.raises(InputError, match=r"train\.patch"):
        PatchSampler(_cases(1), dims=2, patch=[8, 8, 8])


# ------------------------------------------------------------------------------------- preprocessing
def test_normalize_modes():
    img = np.random.default_rng(0).normal(5, 3, (2, 30, 30)).astype(np.float32)
    p = normalize(img, "percentile")
    assert p.min() >= -1 and p.max() <= 1 and p.min() == -1 and p.max() == 1
    z = normalize(img, "zscore")
    assert np.allclose(z.mean((1, 2)), 0, atol=1e-5) and np.allclose(z.std((1, 2)), 1, atol=1e-4)
    with pytest.raises(InputError, match="data.intensity"):
        normalize(img, "minmax")
    assert np.isfinite(normalize(np.zeros((1, 4, 4), np.float32), "zscore")).all()


def test_prepare_case_scales_image_and_label(tiny_cfg):
    case = _cases(1, shape=(20, 24))[0]
    data_cfg = tiny_cfg("data.scale=[0.5, 0.5]")["data"]
    out = prepare_case(case, data_cfg)
    assert out.image.shape == (1, 10, 12) and out.label.shape == (10, 12)
    assert set(np.unique(out.label)) <= {0, 1}
    same = prepare_case(case, tiny_cfg()["data"])
    assert same.image.shape == case.image.shape and np.array_equal(same.label, case.label)
    with pytest.raises(InputError, match="data.scale"):
        prepare_case(case, tiny_cfg("data.scale=[0.5, 0.5, 0.5]")["data"])


# ------------------------------------------------------------------------------------- build_data
def test_build_data_unlabelled_cases_carry_no_label(tiny_cfg):
    cfg = tiny_cfg()
    data = build_data(cfg)
    split = data.split
    assert [c.id for c in data.labelled] == split["labelled"] and len(split["labelled"]) == 3
    assert [c.id for c in data.unlabelled] == split["unlabelled"] and len(split["unlabelled"]) == 4
    assert [c.id for c in data.val] == split["val"] and len(split["val"]) == 3
    assert all(c.label is not None for c in data.labelled + data.val)
    assert data.unlabelled and all(c.label is None for c in data.unlabelled)
    assert data.in_channels == 1 and data.source_dims == 2
    s = PatchSampler(data.unlabelled, dims=2, patch=[32, 32], fg_oversample=1.0, seed=0, stream=1)
    b = s.batch(0, 3)
    assert set(b) == {"image"} and b["image"].shape == (3, 1, 32, 32)
    # validation cases stay raw (original intensities) for evaluation at the original resolution
    raw = {c.id: c for c in make_synthetic_dataset(10, dims=2, shape=(32, 32))}
    assert all(np.array_equal(c.image, raw[c.id].image) for c in data.val)


def test_build_data_all_labelled(tiny_cfg):
    cfg = tiny_cfg()
    data = build_data(cfg, all_labelled=True)
    assert data.unlabelled == [] and len(data.labelled) == 7
    assert data.split["val"] == make_split([f"synth{i:03d}" for i in range(10)], labelled=3, val=3)["val"]


def test_build_data_refuses_2d_data_for_3d_net(tiny_cfg):
    with pytest.raises(InputError, match="data.dims=2"):
        build_data(tiny_cfg("data.dims=3", "train.patch=[32, 32, 32]"))


def _strip_labels(root, ids):
    """Rewrite the h5 files of `ids` with their image only: any attempt to read a label then fails."""
    for i in ids:
        path = root / i / "mri_norm2.h5"
        with h5py.File(path, "r") as f:
            image = f["image"][()]
        with h5py.File(path, "w") as f:
            f.create_dataset("image", data=image)


def _record_load_case(monkeypatch) -> list[tuple[str, bool]]:
    calls: list[tuple[str, bool]] = []
    real = pipeline.load_case

    def recording(ref, *, with_label=True, **kw):
        calls.append((ref.id, with_label))
        return real(ref, with_label=with_label, **kw)

    monkeypatch.setattr(pipeline, "load_case", recording)
    return calls


def test_unlabelled_cases_are_loaded_without_labels(tmp_path, monkeypatch, la_cfg):
    root = write_synthetic_dataset(tmp_path / "LA", 8, dims=3, shape=(16, 16, 16), fmt="la")
    calls = _record_load_case(monkeypatch)
    data = build_data(la_cfg(root=root))
    unlabelled = set(data.split["unlabelled"])
    assert len(unlabelled) == 3
    assert {i for i, _ in calls} == {f"synth{k:03d}" for k in range(8)}
    for case_id, with_label in calls:
        assert with_label == (case_id not in unlabelled), case_id
    assert all(c.label is None for c in data.unlabelled)
    assert all(c.label is not None for c in data.labelled + data.val)


def test_semi_supervised_training_never_reaches_unlabelled_labels(tmp_path, monkeypatch, la_cfg):
    """A short SuperDiffusion run (label-free pretraining, then co-training) on LA-h5 data whose
    unlabelled cases have had their label datasets deleted: it must run, and every load of an unlabelled
    case must have asked for no label."""
    root = write_synthetic_dataset(tmp_path / "LA", 8, dims=3, shape=(16, 16, 16), fmt="la")
    cfg = la_cfg("method=superdiffusion", "superdiffusion.pretrain_steps=2", "train.steps=2",
                 "superdiffusion.rounds=1", "diffusion.timesteps=50", "diffusion.t_infer=49", root=root)
    split = make_split([f"synth{k:03d}" for k in range(8)], labelled=3, val=2, seed=0)
    unlabelled = set(split["unlabelled"])
    _strip_labels(root, unlabelled)
    stripped = [r for r in discover("la", root) if r.id in unlabelled]
    with pytest.raises(InputError, match="no 'label' dataset"):  # reading one of their labels now fails
        load_case(stripped[0], with_label=True)
    calls = _record_load_case(monkeypatch)

    from superdiffusion.methods.superdiffusion import CoTrain, Pretrain

    seen: list[tuple[str, set]] = []
    for cls in (Pretrain, CoTrain):
        real_step = cls.training_step

        def spy(self, batch, *, _real=real_step, **kw):
            seen.append((self.name, set(batch)))
            return _real(self, batch, **kw)

        monkeypatch.setattr(cls, "training_step", spy)

    results = train_run(cfg, tmp_path / "run", progress=False)
    assert results["split"]["unlabelled"] == sorted(unlabelled)
    unlabelled_calls = [(i, w) for i, w in calls if i in unlabelled]
    assert unlabelled_calls and all(w is False for _, w in unlabelled_calls)
    # label-free pretraining sees images only; co-training sees labels of the labelled stream only
    assert [n for n, _ in seen] == ["pretrain", "pretrain", "superdiffusion", "superdiffusion"]
    assert all(keys == {"image"} for n, keys in seen if n == "pretrain")
    assert all(keys == {"image", "label", "unlabelled"} for n, keys in seen if n != "pretrain")


# ------------------------------------------------------------------------------------------- inputs
def test_input_refs_files_and_folders(tmp_path, la_root):
    vol = write_synthetic_dataset(tmp_path / "vol", 2, dims=3, shape=(8, 8, 8), fmt="volumes")
    refs = input_refs([la_root, vol / "images" / "synth001.nii.gz"])
    assert [r.id for r in refs] == [f"synth{k:03d}" for k in range(8)] + ["synth001"]
    assert {r.format for r in refs[:8]} == {"la-h5"} and refs[-1].format == "nifti"
    assert all(r.label is None for r in refs)
    assert ref_for_file(la_root / "synth002" / "mri_norm2.h5").id == "synth002"
    with pytest.raises(InputError, match="unsupported file type"):
        ref_for_file(tmp_path / "notes.txt")
    with pytest.raises(InputError, match="file not found"):
        ref_for_file(tmp_path / "missing.nii.gz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no image files"):
        input_refs([tmp_path / "empty"])
