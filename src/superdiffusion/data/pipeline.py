"""From a config to training streams: load and check every case up front, split by case, preprocess,
and draw training crops.

Crops are drawn from a generator seeded by (seed, stream, step, rank), so any step's batch can be
re-drawn exactly: a resumed run sees the same data as an uninterrupted one, and distributed ranks see
different data, without saving any loader state.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from ..errors import InputError
from .case import Case, CaseRef
from .perturb import PhotometricView
from .readers import NNUNET_CHANNEL, discover, layout_hint, load_case, read_dataset_json
from .splits import make_split
from .synthetic import make_synthetic_dataset


def normalize(image: np.ndarray, mode: str) -> np.ndarray:
    """Per case and channel: `percentile` maps [p0.5, p99.5] to [-1, 1] (the diffusion range); `zscore`."""
    out = np.empty_like(image, dtype=np.float32)
    for c, channel in enumerate(image):
        if mode == "percentile":
            lo, hi = np.percentile(channel, [0.5, 99.5])
            out[c] = np.clip((channel - lo) / max(hi - lo, 1e-6), 0, 1) * 2 - 1
        elif mode == "zscore":
            out[c] = (channel - channel.mean()) / max(float(channel.std()), 1e-6)
        else:
            raise InputError(f"data.intensity: unknown mode {mode!r} (percentile, zscore)")
    return out


def resize(array: np.ndarray | torch.Tensor, shape: tuple[int, ...], *, nearest: bool = False) -> torch.Tensor:
    """Resample a channels-first array (C, *spatial) to `shape` (linear, or nearest for labels)."""
    x = torch.as_tensor(array)[None].float()
    if tuple(x.shape[2:]) == tuple(shape):
        return x[0]
    mode = "nearest-exact" if nearest else ("bilinear" if len(shape) == 2 else "trilinear")
    return F.interpolate(x, size=tuple(shape), mode=mode, **({} if nearest else {"align_corners": False}))[0]


def scaled_shape(shape: tuple[int, ...], scale: list[float] | None) -> tuple[int, ...]:
    if scale is None:
        return tuple(shape)
    if len(scale) != len(shape):
        raise InputError(f"data.scale: {scale} has {len(scale)} factors for {len(shape)}-D images")
    return tuple(max(1, round(s * f)) for s, f in zip(shape, scale))


def target_shape(shape: tuple[int, ...], data_cfg: dict, spacing: tuple[float, ...] | None = None) -> tuple[int, ...]:
    """The spatial shape a case is resampled to: `data.size` (null entries keep an axis), `data.spacing` (a target
    voxel size: needs the case's `spacing`) or `data.scale`."""
    size, target = data_cfg["size"], data_cfg.get("spacing")
    if sum(v is not None for v in (size, target, data_cfg["scale"])) > 1:
        raise InputError("data.scale, data.size and data.spacing: set one of them (a factor, a fixed size or a "
                         "target voxel size)")
    if target is not None:
        if not isinstance(target, list) or len(target) != len(shape) or any(
                t is not None and (isinstance(t, bool) or not isinstance(t, int | float) or t <= 0) for t in target):
            raise InputError(f"data.spacing: {target!r} must list {len(shape)} positive voxel sizes (null keeps an "
                             "axis)")
        have = spacing or (1.0,) * len(shape)
        return tuple(n if t is None else max(1, round(n * h / t)) for n, h, t in zip(shape, have, target))
    if size is None:
        return scaled_shape(shape, data_cfg["scale"])
    if not isinstance(size, list) or len(size) != len(shape) or \
            any(s is not None and (not isinstance(s, int) or isinstance(s, bool) or s < 1) for s in size):
        raise InputError(f"data.size: {size!r} must list {len(shape)} positive sizes (null keeps an axis) for "
                         f"{len(shape)}-D images")
    return tuple(n if s is None else s for s, n in zip(size, shape))


def prepare_image(image: np.ndarray, data_cfg: dict, spacing: tuple[float, ...] | None = None) -> np.ndarray:
    """Intensity normalisation and resampling: what the networks see, in training and inference (`image` already
    on the working grid: see `working_grid`)."""
    image = normalize(image, data_cfg["intensity"])
    return resize(image, target_shape(image.shape[1:], data_cfg, spacing)).numpy()


class WorkingGrid:
    """A case's voxels turned to `data.orientation` (e.g. RAS, as MONAI's Orientation transform and nnU-Net do),
    and back: what training sees and what predictions are mapped back from. The identity without
    `data.orientation`, or for cases without a geometry (2D images, HDF5 without an affine)."""

    def __init__(self, case: Case, data_cfg: dict):
        from nibabel.orientations import axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform

        from .readers import geometry_of

        self.shape, self.spacing, self.forward, self.backward = case.spatial_shape, case.spacing, None, None
        codes = data_cfg.get("orientation")
        affine = geometry_of(case.meta, case.spacing) if codes and case.spatial_dims == 3 else None
        if affine is not None and any(k in case.meta for k in ("affine", "itk", "header")):
            current = io_orientation(affine)
            self.forward = ornt_transform(current, axcodes2ornt(tuple(codes.upper())))
            self.backward = ornt_transform(axcodes2ornt(tuple(codes.upper())), current)
            turned = affine @ inv_ornt_aff(self.forward, self.shape)
            self.spacing = tuple(float(v) for v in np.linalg.norm(turned[:3, :3], axis=0))

    def to_working(self, array: np.ndarray) -> np.ndarray:
        """(C, *spatial) on the case's grid -> the working grid."""
        from nibabel.orientations import apply_orientation

        return array if self.forward is None else np.stack([apply_orientation(a, self.forward) for a in array])

    def to_case(self, array: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(C, *spatial) on the working grid -> the case's own grid."""
        from nibabel.orientations import apply_orientation

        if self.backward is None:
            return torch.as_tensor(array)
        array = np.asarray(torch.as_tensor(array).cpu())
        return torch.from_numpy(np.ascontiguousarray(np.stack([apply_orientation(a, self.backward) for a in array])))


def pad_value(image: np.ndarray | torch.Tensor) -> float:
    """The one padding rule of training crops, validation and prediction: the minimum of the whole prepared case
    (what lies outside a scan is background), never a constant that is mid-grey after normalisation."""
    return float(image.min())


def prepare_case(case: Case, data_cfg: dict) -> Case:
    grid = WorkingGrid(case, data_cfg)
    image = prepare_image(grid.to_working(case.image), data_cfg, grid.spacing)
    label = None
    if case.label is not None:
        label = resize(grid.to_working(case.label[None]), image.shape[1:], nearest=True)[0].long().numpy()
    return Case(case.id, image, label, grid.spacing, case.source, case.meta)


@dataclass
class DataBundle:
    """The cases of one run, split by case; unlabelled cases carry no label."""

    split: dict
    labelled: list[Case]
    unlabelled: list[Case]
    val: list[Case]  # raw (not preprocessed), with labels: evaluated at the original resolution
    in_channels: int
    source_dims: int


def list_refs(data_cfg: dict) -> list[CaseRef]:
    if data_cfg["format"] == "synthetic":
        return []
    if not data_cfg["root"]:
        raise InputError(f"data.root: required for format {data_cfg['format']!r}")
    if data_cfg["format"] == "nnunet":  # the dataset's own label count decides; say so before any work
        spec = read_dataset_json(Path(data_cfg["root"]))
        if spec["num_classes"] != data_cfg["num_classes"]:
            raise InputError(f"{Path(data_cfg['root']) / 'dataset.json'}: lists {spec['num_classes']} labels "
                             f"(background included), data.num_classes is {data_cfg['num_classes']}; set "
                             f"data.num_classes={spec['num_classes']}")
    return discover(data_cfg["format"], data_cfg["root"], data_cfg["list"], data_cfg["subset"])


def load_cases(data_cfg: dict, ids: list[str] | None = None, *, with_label: bool = True) -> list[Case]:
    """Load (and check) cases by id: synthetic ones are generated, others read from disk."""
    if data_cfg["format"] == "synthetic":
        syn = data_cfg["synthetic"]
        cases = make_synthetic_dataset(syn["cases"], dims=len(syn["shape"]), shape=tuple(syn["shape"]),
                                       seed=syn["seed"])
        cases = [c for c in cases if ids is None or c.id in ids]
        return cases if with_label else [c.without_label() for c in cases]
    refs = [r for r in list_refs(data_cfg) if ids is None or r.id in ids]
    return [load_case(r, with_label=with_label, num_classes=data_cfg["num_classes"]) for r in refs]


def case_listing(data_cfg: dict) -> tuple[list[str], set[str]]:
    """(every case id, the ids without a label file: the split can only make them unlabelled), from one listing."""
    if data_cfg["format"] == "synthetic":
        if data_cfg["root"]:  # a shipped synthetic config (demo) pointed at a folder would silently ignore it
            hint = layout_hint(data_cfg["root"], "synthetic") or "; set data.format (la, volumes, nnunet, folders, ...)"
            raise InputError(f"data.root {data_cfg['root']} is set, but data.format is synthetic (the built-in data: "
                             f"no folder is read){hint}")
        return [f"synth{i:03d}" for i in range(data_cfg["synthetic"]["cases"])], set()
    refs = list_refs(data_cfg)
    return [r.id for r in refs], {r.id for r in refs if r.label is None}


def case_ids(data_cfg: dict) -> list[str]:
    return case_listing(data_cfg)[0]


def split_cases(cfg: dict, listing: tuple[list[str], set[str]] | None = None) -> dict:
    """The run's split (cases without a label file always unlabelled); `listing`: case_listing's, if made already."""
    ids, no_label = listing or case_listing(cfg["data"])
    return make_split(ids, labelled=cfg["split"]["labelled"], val=cfg["split"]["val"], seed=cfg["split"]["seed"],
                      label_less=no_label)


def build_data(cfg: dict, *, all_labelled: bool = False) -> DataBundle:
    """Split, then load every case (labelled and validation with labels, unlabelled without)."""
    data_cfg = cfg["data"]
    listing = case_listing(data_cfg)
    split = split_cases(cfg, listing)
    if all_labelled:  # the fully supervised upper bound: every training case with a label is labelled, same val
        no_label = listing[1]
        pool = split["labelled"] + split["unlabelled"]
        split["labelled"] = sorted(i for i in pool if i not in no_label)
        split["unlabelled"] = sorted(i for i in pool if i in no_label)
    labelled = require_labels(load_cases(data_cfg, split["labelled"]))
    unlabelled = load_cases(data_cfg, split["unlabelled"], with_label=False) if split["unlabelled"] else []
    val = require_labels(load_cases(data_cfg, split["val"])) if split["val"] else []
    first = labelled[0]
    check_dims(first, cfg["data"]["dims"])
    return DataBundle(split, [prepare_case(c, data_cfg) for c in labelled],
                      [prepare_case(c, data_cfg) for c in unlabelled], val,
                      first.image.shape[0], first.spatial_dims)


def require_labels(cases: list[Case]) -> list[Case]:
    """Labelled and validation cases must have a label file: say which one lacks it, up front."""
    for case in cases:
        if case.label is None:
            raise InputError(f"{case.source}: no label file for case {case.id!r}, which needs one (labelled or "
                             "validation case)")
    return cases


def check_dims(case: Case, dims: int) -> None:
    if dims not in (2, 3):
        raise InputError(f"data.dims: {dims!r} must be 2 or 3")
    if dims == 3 and case.spatial_dims == 2:
        raise InputError(f"{case.source}: a 2D image cannot train a 3D network (set data.dims=2)")


class PatchSampler:
    """Random training crops (2D slices of 3D cases when dims = 2), re-drawable from (seed, step)."""

    def __init__(self, cases: list[Case], *, dims: int, patch: list[int], slice_axis: int = 2,
                 augment: bool = True, fg_oversample: float = 0.0, seed: int = 0, stream: int = 0,
                 photometric: PhotometricView | None = None):
        if not cases:
            raise InputError("no cases to sample training crops from")
        if len(patch) != dims:
            raise InputError(f"train.patch: {patch} does not have {dims} sizes for a {dims}-D network")
        self.cases, self.dims, self.patch = cases, dims, tuple(int(p) for p in patch)
        self.slice_axis, self.augment, self.fg_oversample = slice_axis, augment, fg_oversample
        self.seed, self.stream, self.photometric = seed, stream, photometric
        self.slicing = dims == 2 and cases[0].spatial_dims == 3
        self.foreground = [np.argwhere(c.label > 0) if c.label is not None else None for c in cases]
        self.pad_values = [pad_value(c.image) for c in cases]
        if self.slicing:  # slices stacked along the first axis, each contiguous: np.take along the last axis of a
            # volume cost ~5 ms of a 70 ms step (16 slices)
            self.image_slices = [np.ascontiguousarray(np.moveaxis(c.image, 1 + slice_axis, 0)) for c in cases]
            self.label_slices = [np.ascontiguousarray(np.moveaxis(c.label, slice_axis, 0)) if c.label is not None
                                 else None for c in cases]

    def batch(self, step: int, size: int, *, rank: int = 0) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.stream, step, rank])
        samples = [self.sample(rng) for _ in range(size)]
        out = {"image": torch.from_numpy(np.stack([s[0] for s in samples]))}
        if self.photometric is not None:  # drawn after the crops: the same crops with or without it
            out["image"] = self.photometric(out["image"], torch.Generator().manual_seed(int(rng.integers(2**31 - 1))))
        if samples[0][1] is not None:
            out["label"] = torch.from_numpy(np.stack([s[1] for s in samples]))
        return out

    def sample(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
        k = int(rng.integers(len(self.cases)))
        case, fg = self.cases[k], self.foreground[k]
        image, label = case.image, case.label
        centre = fg[rng.integers(len(fg))] if fg is not None and len(fg) and rng.random() < self.fg_oversample \
            else None
        if self.slicing:
            axis = self.slice_axis
            index = int(centre[axis]) if centre is not None else int(rng.integers(image.shape[1 + axis]))
            image = self.image_slices[k][index]  # == np.take(image, index, axis=1 + axis)
            label = self.label_slices[k][index] if label is not None else None
            centre = np.delete(centre, axis) if centre is not None else None
        image, label = crop(image, label, self.patch, rng, centre, fill=self.pad_values[k])
        if self.augment == "ssl4mis":
            image, label = ssl4mis_augment(image, label, rng, fill=self.pad_values[k])
        elif self.augment:
            image, label = augment(image, label, rng)
        return np.ascontiguousarray(image, dtype=np.float32), \
            (np.ascontiguousarray(label, dtype=np.int64) if label is not None else None)


def crop(image: np.ndarray, label: np.ndarray | None, patch: tuple[int, ...], rng: np.random.Generator,
         centre: np.ndarray | None = None, *, fill: float | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Pad to at least `patch` (centred, as MONAI's sliding window pads; image with `fill`, by default its
    `pad_value`, label with 0), then crop at random or around `centre`."""
    pads = [(0, 0)] + [(max(0, p - s) // 2, max(0, p - s) - max(0, p - s) // 2)
                       for s, p in zip(image.shape[1:], patch)]
    if any(a or b for a, b in pads):
        image = np.pad(image, pads, constant_values=pad_value(image) if fill is None else fill)
        label = np.pad(label, pads[1:]) if label is not None else None
    starts = []
    for d, (size, p) in enumerate(zip(image.shape[1:], patch)):
        if centre is not None:
            start = int(centre[d]) + pads[1 + d][0] - p // 2 + int(rng.integers(-p // 4, p // 4 + 1))
        else:
            start = int(rng.integers(size - p + 1))
        starts.append(min(max(start, 0), size - p))
    window = tuple(slice(s, s + p) for s, p in zip(starts, patch))
    return image[(slice(None), *window)], (label[window] if label is not None else None)


def augment(image: np.ndarray, label: np.ndarray | None, rng: np.random.Generator):
    """Random flips on every spatial axis and a random 90-degree rotation in the first plane (if square)."""
    for axis in range(image.ndim - 1):
        if rng.random() < 0.5:
            image = np.flip(image, axis + 1)
            label = np.flip(label, axis) if label is not None else None
    k = int(rng.integers(4))
    if k and image.shape[1] == image.shape[2]:
        image = np.rot90(image, k, axes=(1, 2))
        label = np.rot90(label, k, axes=(0, 1)) if label is not None else None
    return image, label


def ssl4mis_augment(image: np.ndarray, label: np.ndarray | None, rng: np.random.Generator, *, fill: float):
    """SSL4MIS's RandomGenerator (BCP's ACDC code; SSL4MIS before its commit 24db034), in the first plane: half
    the time a random 90-degree rotation and a flip on one random axis, else half the time a rotation by a whole
    number of degrees in [-20, 20) (nearest neighbour, image and label alike, outside filled with `fill`), else
    nothing."""
    if rng.random() > 0.5:
        k = int(rng.integers(4)) if image.shape[1] == image.shape[2] else 0  # a crop keeps its shape
        image = np.rot90(image, k, axes=(1, 2))
        label = np.rot90(label, k, axes=(0, 1)) if label is not None else None
        axis = int(rng.integers(2))
        image = np.flip(image, axis + 1)
        label = np.flip(label, axis) if label is not None else None
    elif rng.random() > 0.5:
        angle = int(rng.integers(-20, 20))
        image = ndimage.rotate(image, angle, axes=(1, 2), order=0, reshape=False, cval=fill)
        label = ndimage.rotate(label, angle, axes=(0, 1), order=0, reshape=False, cval=0) if label is not None \
            else None
    return image, label


AUGMENTATIONS = (True, False, "ssl4mis")


SUFFIX_FORMATS = {".h5": "la-h5", ".hdf5": "la-h5", ".nii": "nifti", ".nii.gz": "nifti", ".nrrd": "nrrd",
                  ".nhdr": "nrrd", ".mha": "mha", ".mhd": "mha", ".png": "image2d", ".tif": "image2d",
                  ".tiff": "image2d", ".bmp": "image2d", ".jpg": "image2d", ".jpeg": "image2d"}


def file_suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def ref_for_file(path: str | Path) -> CaseRef:
    """A case reference for a single image file (its format from the suffix), e.g. for `predict`."""
    path = Path(path)
    fmt = SUFFIX_FORMATS.get(file_suffix(path))
    if fmt is None:
        raise InputError(f"{path}: unsupported file type (supported: {', '.join(sorted(SUFFIX_FORMATS))})")
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    case_id = path.parent.name if path.name == "mri_norm2.h5" else path.name[: -len(file_suffix(path))]
    return CaseRef(case_id, path, None, fmt)


def input_refs(inputs: list[str | Path]) -> list[CaseRef]:
    """Files as given; a folder contributes its image files (and LA-style `<id>/mri_norm2.h5`). nnU-Net's channel
    files `<case>_0000`, `<case>_0001`, ... become one case `<case>` with its channels in order, so predictions are
    named `<case><ending>`, as labelsTr's are."""
    refs: list[CaseRef] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.iterdir() if p.is_file() and not p.name.startswith(".")
                           and file_suffix(p) in SUFFIX_FORMATS)
            found += sorted(item.glob("*/mri_norm2.h5"))
            if not found:
                raise InputError(f"{item}: no image files found in this folder")
            refs += [ref_for_file(p) for p in found]
        else:
            refs.append(ref_for_file(item))
    return group_channels(refs)


def group_channels(refs: list[CaseRef]) -> list[CaseRef]:
    """Refs whose ids end in _XXXX (nnU-Net's channel number) grouped into one multi-channel ref per case."""
    groups: dict[str, dict[int, CaseRef]] = {}
    out: list[CaseRef] = []
    for ref in refs:
        m = NNUNET_CHANNEL.match(ref.id)
        if m is None:
            out.append(ref)
        else:
            groups.setdefault(m.group(1), {})[int(m.group(2))] = ref
    for case, channels in groups.items():
        order = sorted(channels)
        if order != list(range(len(order))):
            raise InputError(f"{channels[order[0]].image}: case {case!r} has channel files {order}; nnU-Net channels "
                             "are numbered _0000, _0001, ... without gaps")
        first = channels[0]
        out.append(CaseRef(case, first.image, None, first.format, tuple(channels[c].image for c in order[1:])))
    return out
