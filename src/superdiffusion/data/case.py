"""The one in-memory record every reader produces and every later stage consumes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class CaseRef:
    """Where a case lives on disk; cheap to list, nothing is read yet.

    `label` is None for cases without a label file. For LA's HDF5 files image and label are the same
    file (datasets `image` and `label`); readers then read `label` only when asked to.
    """

    id: str
    image: Path
    label: Path | None
    format: str  # "la-h5" | "nifti" | "nrrd" | "mha" | "image2d"
    channels: tuple[Path, ...] = ()  # further channels of a multi-channel case (nnU-Net's <id>_0001...), in order


@dataclass
class Case:
    """One image (2D or 3D) with its optional label.

    image:   float32, (C, *spatial): channels first, spatial = (H, W) or (X, Y, Z).
    label:   int64, (*spatial), values in 0..K-1, or None (unlabelled or not requested).
    spacing: voxel size per spatial axis (1.0 where the format has none).
    meta:    what a writer needs to store a mask in the input's own format (affine, header, format).
    """

    id: str
    image: np.ndarray
    label: np.ndarray | None
    spacing: tuple[float, ...]
    source: str
    meta: dict = field(default_factory=dict)

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(self.image.shape[1:])

    @property
    def spatial_dims(self) -> int:
        return self.image.ndim - 1

    def without_label(self) -> Case:
        """A copy that cannot reveal its label: what unlabelled training streams receive."""
        return Case(self.id, self.image, None, self.spacing, self.source, dict(self.meta))
