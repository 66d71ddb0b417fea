"""Deterministic synthetic segmentation data: the demo's default, and data that tests write to disk.

Cases are made to be non-trivial in the ways that matter for semi-supervised segmentation: a
textured background, foreground blobs of varying (sometimes faint) contrast and irregular shape,
and dark distractor blobs that are not labelled, all under Gaussian noise. Every case depends only
on (seed, index), so a dataset of any size is reproducible without storing it.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

from ..errors import InputError
from .case import Case
from .readers import write_array, write_mask

DISK_FORMATS = {"la": 3, "volumes": 3, "volumes-nrrd": 3, "folders": 2}  # format -> spatial dims


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Low-frequency random field with unit standard deviation."""
    field = gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma, mode="wrap")
    return field / max(float(field.std()), 1e-6)


def _blob_params(rng: np.random.Generator, shape: tuple[int, ...], volume: float) -> tuple:
    """Centre, per-axis radii (for the given volume), rotation and boundary wobble of one blob."""
    dims = len(shape)
    unit = np.pi if dims == 2 else 4.0 / 3.0 * np.pi
    aspect = rng.uniform(0.7, 1.4, dims)
    radii = (volume / unit) ** (1.0 / dims) * aspect / np.prod(aspect) ** (1.0 / dims)
    rotation, _ = np.linalg.qr(rng.standard_normal((dims, dims)))
    centre = rng.uniform(0.2, 0.8, dims) * np.asarray(shape)
    return centre, radii, rotation, rng.uniform(0.1, 0.3)


def _blob_mask(coords: np.ndarray, params: tuple, scale: float, wobble: np.ndarray) -> np.ndarray:
    centre, radii, rotation, amp = params
    diff = coords - centre.reshape(-1, *[1] * (coords.ndim - 1)).astype(np.float32)
    rotated = np.tensordot(rotation.astype(np.float32), diff, axes=1)
    dist2 = sum((rotated[i] / (radii[i] * scale)) ** 2 for i in range(len(radii)))
    return dist2 < (1.0 + amp * wobble) ** 2


def make_synthetic_case(
    index: int, *, dims: int, shape: tuple[int, ...], seed: int = 0, channels: int = 1
) -> Case:
    """One synthetic case; label 1 = foreground blobs (about 5-20 % of the pixels), 0 elsewhere."""
    shape = tuple(int(s) for s in shape)
    if dims not in (2, 3) or len(shape) != dims or min(shape) < 8:
        raise InputError(f"synthetic shape {shape} does not fit dims={dims} (need {dims} sizes >= 8)")
    if channels < 1:
        raise InputError(f"synthetic channels must be >= 1, got {channels}")
    rng = np.random.default_rng([seed, index])
    n_pix = float(np.prod(shape))
    coords = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"))
    wobble = _smooth_noise(rng, shape, min(shape) / 10)

    n_fg, n_dark = int(rng.integers(2, 6)), int(rng.integers(1, 3))
    target = rng.uniform(0.07, 0.15)
    fg_params = [_blob_params(rng, shape, target * n_pix / n_fg * rng.uniform(0.6, 1.4)) for _ in range(n_fg)]
    contrasts = rng.uniform(0.6, 2.0, n_fg)
    scale = 1.0
    for _ in range(4):  # overlaps, borders and wobble shift the area: rescale towards the target
        masks = [_blob_mask(coords, p, scale, wobble) for p in fg_params]
        frac = np.logical_or.reduce(masks).mean()
        if 0.06 <= frac <= 0.18:
            break
        scale *= (target / max(frac, 1e-3)) ** (1.0 / dims)
    label = np.logical_or.reduce(masks)

    signal = np.zeros(shape, np.float32)
    for m, c in zip(masks, contrasts):
        signal[m] = np.maximum(signal[m], c)
    for _ in range(n_dark):  # darker distractors: visible structure that is not foreground
        m = (
            _blob_mask(coords, _blob_params(rng, shape, rng.uniform(0.02, 0.05) * n_pix), 1.0, wobble)
            & ~label
        )
        signal[m] = -rng.uniform(0.8, 1.6)
    signal = gaussian_filter(signal, 0.7)  # soft (partial-volume) edges

    image = np.empty((channels, *shape), np.float32)
    for ch in range(channels):
        gain = 1.0 if ch == 0 else rng.uniform(0.4, 1.2)
        img = (
            0.4 * _smooth_noise(rng, shape, min(shape) / 12)
            + gain * signal
            + rng.standard_normal(shape, dtype=np.float32)
        )
        image[ch] = (img - img.mean()) / max(float(img.std()), 1e-6)
    return Case(
        f"synth{index:03d}",
        image,
        label.astype(np.int64),
        (1.0,) * dims,
        "synthetic",
        {"format": "synthetic"},
    )


def make_synthetic_dataset(
    n: int, *, dims: int, shape: tuple[int, ...], seed: int = 0, channels: int = 1
) -> list[Case]:
    """Cases 0..n-1 (each independent of n, so datasets of different sizes share their first cases)."""
    return [make_synthetic_case(i, dims=dims, shape=shape, seed=seed, channels=channels) for i in range(n)]


def _to_uint8(image: np.ndarray) -> np.ndarray:
    """z-scored image -> 0..255 (clipped at 3 standard deviations) for PNG files."""
    return np.round((np.clip(image, -3.0, 3.0) + 3.0) / 6.0 * 255.0).astype(np.uint8)


def write_synthetic_dataset(
    out_dir: str | Path,
    n: int,
    *,
    dims: int,
    shape: tuple[int, ...],
    seed: int = 0,
    fmt: str,
    channels: int = 1,
    overwrite: bool = False,
) -> Path:
    """Write a synthetic dataset in an on-disk layout that `discover(...)` reads; returns its root.

    fmt: "la" (<id>/mri_norm2.h5 + train.list), "volumes" (images/, labels/ .nii.gz),
    "volumes-nrrd" (the same as .nrrd) or "folders" (2D: images/, labels/ .png; channels 1 or 3).
    """
    if fmt not in DISK_FORMATS:
        raise InputError(f"unknown synthetic disk format {fmt!r}; known: {', '.join(DISK_FORMATS)}")
    if dims != DISK_FORMATS[fmt]:
        raise InputError(f"format {fmt} stores {DISK_FORMATS[fmt]}D cases, got dims={dims}")
    if channels != 1 and not (fmt == "folders" and channels == 3):
        raise InputError(
            f"format {fmt} stores {'1 or 3 channels' if fmt == 'folders' else '1 channel'}, "
            f"got channels={channels}"
        )
    root = Path(out_dir)
    cases = make_synthetic_dataset(n, dims=dims, shape=shape, seed=seed, channels=channels)
    for case in cases:
        if fmt == "la":
            path = root / case.id / "mri_norm2.h5"
            if path.exists() and not overwrite:
                raise InputError(f"{path}: already exists; pass overwrite=True to replace it")
            path.parent.mkdir(parents=True, exist_ok=True)
            with h5py.File(path, "w") as f:
                f.create_dataset("image", data=case.image[0], compression="gzip")
                f.create_dataset("label", data=case.label.astype(np.uint8), compression="gzip")
        elif fmt in ("volumes", "volumes-nrrd"):
            kind = "nifti" if fmt == "volumes" else "nrrd"
            disk = replace(case, meta={"format": kind, "affine": np.eye(4).tolist()})
            write_array(case.image[0], disk, root / "images", "", overwrite=overwrite)
            write_mask(case.label, disk, root / "labels", overwrite=overwrite)
        else:
            path = root / "images" / f"{case.id}.png"
            if path.exists() and not overwrite:
                raise InputError(f"{path}: already exists; pass overwrite=True to replace it")
            path.parent.mkdir(parents=True, exist_ok=True)
            pixels = _to_uint8(case.image[0] if channels == 1 else np.moveaxis(case.image, 0, -1))
            Image.fromarray(pixels).save(path)
            disk = replace(case, meta={"format": "image2d", "suffix": ".png"})
            write_mask(case.label, disk, root / "labels", overwrite=overwrite)
    if fmt == "la":
        (root / "train.list").write_text("".join(f"{c.id}\n" for c in cases))
    return root
