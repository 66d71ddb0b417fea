"""Carry the LA training set to a GPU machine whose transfer limit (64 MiB) is below its size (179 MB).

    python benchmarks/device/la_transfer.py pack ../shared/data/LA .dev/la     # here
    python benchmarks/device/la_transfer.py unpack .dev/la /tmp/LA             # there

The images are z-scored 8-bit scans, so they are stored as uint8 levels (exact) but at HALF in-plane
resolution (lossy: bilinear, antialiased); unpacking upsamples them back to the original grid. Labels
stay exact at full resolution, so every metric is still computed against the true masks at the
original resolution. A protocol that resamples the slices itself (la2d: 96x96) therefore sees
nearly, not exactly, the images it sees on the original files: numbers made on an unpacked copy are
comparable with each other, and only approximately with runs on the original data.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F


def resize_inplane(volume: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(X, Y, Z) -> (size[0], size[1], Z), bilinear, antialiased when shrinking."""
    x = torch.from_numpy(np.ascontiguousarray(volume.transpose(2, 0, 1), dtype=np.float32))[:, None]
    y = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    return y[:, 0].numpy().transpose(1, 2, 0)


def pack(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    ids = (src / "train.list").read_text().split()
    (dst / "train.list").write_text("\n".join(ids) + "\n")
    for case_id in ids:
        with h5py.File(src / case_id / "mri_norm2.h5", "r") as f:
            image, label = f["image"][:], f["label"][:]
        levels = np.unique(image)
        step = float(np.median(np.diff(levels)))
        q = np.round((image - levels[0]) / step)
        if q.max() > 255 or np.abs(q * step + levels[0] - image).max() > 1e-3 * step + 1e-5:
            sys.exit(f"{case_id}: image is not 8-bit levels; this packer does not fit it")
        half = resize_inplane(q, ((image.shape[0] + 1) // 2, (image.shape[1] + 1) // 2))
        np.savez_compressed(dst / f"{case_id}.npz", half=np.round(half).clip(0, 255).astype(np.uint8),
                            label=label, shape=np.array(image.shape), step=step, offset=float(levels[0]))
    total = sum(p.stat().st_size for p in dst.iterdir()) / 2**20
    print(f"packed {len(ids)} cases into {dst} ({total:.1f} MiB)")


def unpack(src: Path, dst: Path) -> None:
    ids = (src / "train.list").read_text().split()
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "train.list").write_text("\n".join(ids) + "\n")
    for case_id in ids:
        z = np.load(src / f"{case_id}.npz")
        shape = tuple(int(s) for s in z["shape"])
        image = resize_inplane(z["half"].astype(np.float32), shape[:2]) * float(z["step"]) + float(z["offset"])
        (dst / case_id).mkdir(exist_ok=True)
        with h5py.File(dst / case_id / "mri_norm2.h5", "w") as f:
            f["image"] = image.astype(np.float32)
            f["label"] = z["label"]
    print(f"unpacked {len(ids)} cases into {dst}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["pack", "unpack"])
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path)
    a = p.parse_args()
    (pack if a.action == "pack" else unpack)(a.src, a.dst)
