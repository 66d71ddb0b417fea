"""Find cases on disk, read them into `Case`s with every input check, and write masks back.

Readers check everything that can be wrong with user data (missing or corrupt files, NaN/Inf,
shape mismatches, label values out of range) and report it as one-line `InputError`s naming the
file, so that bad data stops a run before any long work starts. Masks are written in the input's
own format (same geometry), so that they open next to the image in the user's usual viewer.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import h5py
import nibabel as nib
import nrrd
import numpy as np
import tifffile
from PIL import Image

from ..errors import InputError
from .case import Case, CaseRef

FORMATS = ("la", "volumes", "nnunet", "folders", "glas", "ph2")
VOLUME_EXTS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
ITK_EXTS = (".mha", ".mhd")
IMAGE2D_EXTS = (".png", ".tif", ".tiff", ".bmp", ".jpg", ".jpeg")
H5_EXTS = (".h5", ".hdf5")
LA_FILE = "mri_norm2.h5"
GLAS_SUBSETS = {
    None: ("train", "testA", "testB"),
    "all": ("train", "testA", "testB"),
    "train": ("train",),
    "testA": ("testA",),
    "testB": ("testB",),
    "test": ("testA", "testB"),
}
_GLAS_IMAGE = re.compile(r"^(train|testA|testB)_\d+$")
_GLAS_ANNO = re.compile(r"^(train|testA|testB)_\d+_anno$")
NNUNET_CHANNEL = re.compile(r"^(.+)_(\d{4})$")
_LABEL_SUFFIXES = ("", "_mask", "_label", "_anno", "_segmentation")  # 2D mask names seen in the wild
_NRRD_GEOMETRY = ("space", "space directions", "space origin", "spacings", "space units")
_SPATIAL_DIMS = {"la-h5": 3, "nifti": 3, "nrrd": 3, "mha": 3, "image2d": 2}
NNUNET_SUBSETS = {None: "Tr", "all": "Tr", "train": "Tr", "test": "Ts"}


# ----------------------------------------------------------------------------------------------- helpers
def _suffix(path: Path) -> str:
    """The file's format suffix, lower case, with `.nii.gz` as one suffix."""
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def _stem(path: Path) -> str:
    return path.name[: len(path.name) - len(_suffix(path))]


def _reason(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return text if len(text) <= 120 else text[:117] + "..."


@contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Turn whatever a library raises on a bad file into one line naming the file."""
    try:
        yield
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"{path}: cannot read ({_reason(exc)})") from exc


def _require_file(path: Path, what: str) -> None:
    if not Path(path).is_file():
        raise InputError(f"{path}: {what} file not found")


def _plain(value):
    """numpy-free copy of a header, so that `meta` stays plain (JSON-able) data."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


# --------------------------------------------------------------------------------------------- discovery
def _files(folder: Path, exts: tuple[str, ...]) -> dict[str, Path]:
    """stem -> file for the supported files of a folder (hidden files and other types ignored)."""
    out: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and not p.name.startswith(".") and _suffix(p) in exts:
            stem = _stem(p)
            if stem in out:
                raise InputError(f"{p}: two files for case '{stem}' ({out[stem].name} and {p.name})")
            out[stem] = p
    return out


def _first_dir(root: Path, names: tuple[str, ...]) -> Path | None:
    return next((root / n for n in names if (root / n).is_dir()), None)


def _discover_la(root: Path) -> dict[str, CaseRef]:
    refs = {}
    for d in sorted(root.iterdir()):
        if d.is_dir() and (d / LA_FILE).is_file():
            refs[d.name] = CaseRef(d.name, d / LA_FILE, d / LA_FILE, "la-h5")
    return refs


def _discover_volumes(root: Path) -> dict[str, CaseRef]:
    img_dir = _first_dir(root, ("images", "imagesTr", "imagesTs"))
    if img_dir is None:
        return {}
    lab_dir = _first_dir(root, ("labels",) if img_dir.name == "images" else ("labels" + img_dir.name[6:],))
    images = _files(img_dir, VOLUME_EXTS)
    if img_dir.name != "images":  # nnU-Net: <id>_0000.nii.gz, one file per channel
        renamed = {}
        for stem, p in images.items():
            m = NNUNET_CHANNEL.match(stem)
            if m is None:
                raise InputError(f"{p}: nnU-Net image names must end in _0000 (channel number)")
            if m.group(2) != "0000":
                raise InputError(f"{p}: multi-channel nnU-Net images are not supported (only _0000)")
            renamed[m.group(1)] = p
        images = renamed
    labels = _files(lab_dir, VOLUME_EXTS) if lab_dir else {}
    return {i: CaseRef(i, p, labels.get(i), volume_format(p)) for i, p in images.items()}


def volume_format(path: Path) -> str:
    suffix = _suffix(path)
    return "nifti" if suffix.startswith(".nii") else "mha" if suffix in ITK_EXTS else "nrrd"


def read_dataset_json(root: Path) -> dict:
    """nnU-Net v2's dataset.json (the Medical Segmentation Decathlon's raw layout): channel_names, labels,
    file_ending; checked, one line naming the file for anything this package cannot follow."""
    import json

    path = root / "dataset.json"
    if not path.is_file():
        raise InputError(f"{root}: no dataset.json (format nnunet is nnU-Net v2's raw layout)"
                         f"{layout_hint(root, 'nnunet')}")
    with _reading(path):
        spec = json.loads(path.read_text())
    for key in ("channel_names", "labels", "file_ending"):
        if key not in spec:
            raise InputError(f"{path}: no {key!r} entry")
    labels = spec["labels"]
    if not isinstance(labels, dict) or not all(isinstance(v, int) and not isinstance(v, bool) for v in labels.values()):
        raise InputError(f"{path}: 'labels' must map names to integer values (region-based labels are not supported)")
    values = sorted(labels.values())
    if values != list(range(len(values))) or values[0] != 0:
        raise InputError(f"{path}: 'labels' must be 0 (background), 1, 2, ... without gaps, got {values}")
    if spec["file_ending"] not in VOLUME_EXTS:
        raise InputError(f"{path}: file_ending {spec['file_ending']!r} is not supported ({', '.join(VOLUME_EXTS)})")
    return {"channels": len(spec["channel_names"]), "num_classes": len(values), "file_ending": spec["file_ending"],
            "labels": labels, "channel_names": spec["channel_names"]}


def _discover_nnunet(root: Path, subset: str | None) -> dict[str, CaseRef]:
    spec = read_dataset_json(root)
    part = NNUNET_SUBSETS[subset]
    img_dir, lab_dir, ending = root / f"images{part}", root / f"labels{part}", spec["file_ending"]
    if not img_dir.is_dir():
        raise InputError(f"{img_dir}: folder not found (nnU-Net layout: images{part}/<case>_0000{ending})")
    files: dict[str, dict[int, Path]] = {}
    for p in sorted(img_dir.iterdir()):
        if p.name.startswith(".") or not p.name.endswith(ending):
            continue
        m = NNUNET_CHANNEL.match(p.name[: -len(ending)])
        if m is None:
            raise InputError(f"{p}: nnU-Net image names end in _XXXX (the channel number) before {ending}")
        files.setdefault(m.group(1), {})[int(m.group(2))] = p
    refs = {}
    for case, channels in files.items():
        missing = [c for c in range(spec["channels"]) if c not in channels]
        if missing or len(channels) != spec["channels"]:
            raise InputError(f"{img_dir}: case {case!r} has channel files {sorted(channels)}, dataset.json names "
                             f"{spec['channels']} channel(s) (missing _{missing[0]:04d})" if missing else
                             f"{img_dir}: case {case!r} has more channel files than dataset.json's {spec['channels']}")
        label = lab_dir / f"{case}{ending}"
        ordered = [channels[c] for c in range(spec["channels"])]
        refs[case] = CaseRef(case, ordered[0], label if label.is_file() else None, volume_format(ordered[0]),
                             tuple(ordered[1:]))
    return refs


def _discover_folders(root: Path) -> dict[str, CaseRef]:
    img_dir = _first_dir(root, ("images",))
    if img_dir is None:
        return {}
    lab_dir = _first_dir(root, ("labels", "masks"))
    labels = _files(lab_dir, IMAGE2D_EXTS) if lab_dir else {}
    refs = {}
    for stem, p in _files(img_dir, IMAGE2D_EXTS).items():
        label = next((labels[stem + s] for s in _LABEL_SUFFIXES if stem + s in labels), None)
        refs[stem] = CaseRef(stem, p, label, "image2d")
    return refs


def _single_subdir(root: Path) -> Path:
    """Unpacked archives often add one folder level: look inside it when root holds only that."""
    entries = [p for p in root.iterdir() if not p.name.startswith(".")]
    return entries[0] if len(entries) == 1 and entries[0].is_dir() else root


def _discover_glas(root: Path, subset: str | None) -> dict[str, CaseRef]:
    wanted = GLAS_SUBSETS[subset]
    base = root if any(_GLAS_IMAGE.match(_stem(p)) for p in root.iterdir()) else _single_subdir(root)
    refs = {}
    for stem, p in _files(base, IMAGE2D_EXTS).items():
        if _GLAS_IMAGE.match(stem) and stem.split("_")[0] in wanted:
            anno = next((q for q in base.glob(f"{stem}_anno.*") if _suffix(q) in IMAGE2D_EXTS), None)
            refs[stem] = CaseRef(stem, p, anno, "image2d")
    return refs


def _discover_ph2(root: Path) -> dict[str, CaseRef]:
    base = next(
        (b for b in (root / "PH2 Dataset images", root / "PH2Dataset" / "PH2 Dataset images") if b.is_dir()),
        root,
    )
    refs = {}
    for d in sorted(base.iterdir()):
        image = d / f"{d.name}_Dermoscopic_Image" / f"{d.name}.bmp"
        if d.is_dir() and image.is_file():
            lesion = d / f"{d.name}_lesion" / f"{d.name}_lesion.bmp"
            refs[d.name] = CaseRef(d.name, image, lesion if lesion.is_file() else None, "image2d")
    return refs


def _read_list(list_file: str | Path, root: Path) -> tuple[Path, list[str]]:
    """Ids of a list file: one per line; blank lines, surrounding spaces and `#` comments ignored."""
    path = Path(list_file)
    if not path.exists() and not path.is_absolute() and (root / path).exists():
        path = root / path
        if not path.resolve().is_relative_to(root.resolve()):  # relative paths stay inside the data root
            raise InputError(f"{list_file}: a relative list path must stay inside the data root {root}")
    if not path.is_file():
        raise InputError(f"{list_file}: case list file not found (also looked in {root})")
    with _reading(path):
        text = path.read_text()
    ids = sorted({ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")})
    if not ids:
        raise InputError(f"{path}: case list is empty")
    for case_id in ids:  # an id names a case inside the root, never a path out of it
        if "/" in case_id or "\\" in case_id or case_id in (".", "..") or case_id.startswith("~"):
            raise InputError(f"{path}: case id {case_id!r} is a path, not a case name")
    return path, ids


def find_cases(fmt: str, root: Path, subset: str | None = None) -> dict[str, CaseRef]:
    """id -> CaseRef of the cases format `fmt` finds in `root` (maybe none): discovery without the checks."""
    with _reading(root):
        if fmt == "glas":
            return _discover_glas(root, subset)
        if fmt == "nnunet":
            return _discover_nnunet(root, subset)
        return {"la": _discover_la, "volumes": _discover_volumes, "folders": _discover_folders,
                "ph2": _discover_ph2}[fmt](root)


LAYOUTS = {"nnunet": "nnU-Net raw dataset (dataset.json, imagesTr/, labelsTr/)",
           "la": "LA (<case>/mri_norm2.h5)", "ph2": "PH2 dermoscopy", "glas": "GlaS histology",
           "volumes": "volumes (images/ + labels/)", "folders": "2D images (images/ + labels/)"}


def detect_format(root: str | Path) -> str | None:
    """The data.format whose reader finds cases in `root` (nnunet wherever a dataset.json is), or None."""
    root = Path(root)
    if not root.is_dir():
        return None
    if (root / "dataset.json").is_file():
        return "nnunet"
    for fmt in ("la", "ph2", "glas", "volumes", "folders"):
        try:
            if find_cases(fmt, root):
                return fmt
        except (InputError, OSError):
            continue
    return None


def layout_hint(root: str | Path, fmt: str, *, listed: bool = False) -> str:
    """'; DIR has ...: --set data.format=X (or ...)' where `root` fits another format than `fmt`, else ''
    (`listed`: the config names a list file, which the other layout lacks)."""
    found = detect_format(root)
    if found is None or found == fmt:
        return ""
    what = "has a dataset.json" if found == "nnunet" else f"holds {LAYOUTS[found]}"
    unlist = " --set data.list=null" if listed else ""
    return f"; {root} {what}: --set data.format={found}{unlist} (or `superdiffusion train --data {root}`)"


def discover(
    fmt: str, root: str | Path, list_file: str | Path | None = None, subset: str | None = None
) -> list[CaseRef]:
    """All cases of a dataset folder (optionally only those of a list file), sorted by id.

    Nothing is read: listing is cheap, and a bad root or list fails here, before any work starts.
    """
    if fmt not in FORMATS:
        raise InputError(f"unknown data format {fmt!r}; known formats: {', '.join(FORMATS)}")
    if subset not in GLAS_SUBSETS:
        raise InputError(f"unknown subset {subset!r}; known: {', '.join(str(s) for s in GLAS_SUBSETS)}")
    if subset not in (None, "all") and fmt not in ("glas", "nnunet"):
        raise InputError(f"subset {subset!r} applies to formats glas and nnunet only, not {fmt}")
    if fmt == "nnunet" and subset not in NNUNET_SUBSETS:
        raise InputError(f"subset {subset!r}: format nnunet has train (imagesTr) and test (imagesTs)")
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: data root {'is not a folder' if root.exists() else 'does not exist'}")
    found = find_cases(fmt, root, subset)
    if not found:  # before the list file: a folder of another layout is the likelier fault (a shipped config's)
        raise InputError(f"no cases found in {root} (format {fmt}){layout_hint(root, fmt, listed=bool(list_file))}")
    if list_file is not None:
        list_path, ids = _read_list(list_file, root)
        missing = [i for i in ids if i not in found]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise InputError(f"{list_path}: listed case {missing[0]!r} has no files in {root}{more}")
        found = {i: found[i] for i in ids}
    if not found:
        raise InputError(f"no cases found in {root} (format {fmt})")
    return [found[i] for i in sorted(found)]


# --------------------------------------------------------------------------------------------- reading
def _h5_spacing(f: h5py.File, name: str, ndim: int) -> tuple[float, ...] | None:
    for attrs in (f[name].attrs, f.attrs):
        if "spacing" in attrs and len(np.ravel(attrs["spacing"])) == ndim:
            return tuple(float(s) for s in np.ravel(attrs["spacing"]))
    return None


def _nrrd_spacing(header: dict, ndim: int) -> tuple[float, ...] | None:
    directions = header.get("space directions")
    if directions is not None:
        rows = [np.asarray(r, dtype=float) for r in directions if r is not None]
        sp = [float(np.linalg.norm(r)) for r in rows if np.all(np.isfinite(r))]
        if len(sp) == ndim:
            return tuple(sp)
    spacings = [float(s) for s in header.get("spacings", []) if np.isfinite(float(s))]
    return tuple(spacings) if len(spacings) == ndim else None


def _read_any(
    path: Path, dataset: str, *, as_label: bool
) -> tuple[np.ndarray, tuple[float, ...] | None, dict]:
    """Raw array, spacing (None where the file has none) and writer metadata of one file."""
    suffix = _suffix(path)
    extra: dict = {}
    spacing = None
    with _reading(path):
        if suffix in H5_EXTS:
            with h5py.File(path, "r") as f:
                if dataset not in f or not isinstance(f[dataset], h5py.Dataset):
                    raise InputError(
                        f"{path}: no {dataset!r} dataset (found: {', '.join(f.keys()) or 'none'})"
                    )
                arr = f[dataset][()]
                spacing = _h5_spacing(f, dataset, np.ndim(arr))
        elif suffix in (".nii", ".nii.gz"):
            img = nib.load(str(path))
            arr = np.asarray(img.dataobj)
            while arr.ndim > 3 and arr.shape[-1] == 1:  # NIfTI stores a 3D volume as (X, Y, Z, 1) at times
                arr = arr[..., 0]
            spacing = tuple(float(z) for z in img.header.get_zooms()[: arr.ndim])
            extra = {"affine": img.affine.tolist(), "qform_code": int(img.header["qform_code"]),
                     "sform_code": int(img.header["sform_code"]), "xyzt_units": list(img.header.get_xyzt_units())}
        elif suffix in ITK_EXTS:
            import SimpleITK as sitk  # noqa: N813 - the library's own spelling

            img = sitk.ReadImage(str(path))
            arr = sitk.GetArrayFromImage(img).transpose()  # ITK's (z, y, x) -> (x, y, z), as NIfTI's arrays
            spacing = tuple(float(v) for v in img.GetSpacing())
            extra = {"itk": {"origin": list(img.GetOrigin()), "spacing": list(img.GetSpacing()),
                             "direction": list(img.GetDirection())}}
        elif suffix in (".nrrd", ".nhdr"):
            arr, header = nrrd.read(str(path))
            spacing = _nrrd_spacing(header, arr.ndim)
            extra = {"header": _plain(dict(header))}
        elif suffix in (".tif", ".tiff"):
            arr = tifffile.imread(path)
        elif suffix in IMAGE2D_EXTS:
            with Image.open(path) as im:
                if not as_label and im.mode not in ("1", "L", "LA", "I", "I;16", "F", "RGB", "RGBA"):
                    im = im.convert("RGBA" if "A" in im.mode or "transparency" in im.info else "RGB")
                arr = np.asarray(im)  # a palette label keeps its indices
        else:
            raise InputError(f"{path}: unsupported file type {suffix!r}")
    return arr, spacing, extra


def _channels_first_2d(arr: np.ndarray, path: Path) -> np.ndarray:
    """(H, W) -> (1, H, W); (H, W, 3|4) -> (3, H, W) without alpha; grey+alpha -> (1, H, W)."""
    if arr.ndim == 2:
        return arr[None]
    if arr.ndim == 3 and arr.shape[-1] <= 4:
        return np.moveaxis(arr[..., : 1 if arr.shape[-1] <= 2 else 3], -1, 0)
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4):  # planar TIFF
        return arr[: 1 if arr.shape[0] == 1 else 3]
    raise InputError(f"{path}: expected a 2D image (H, W) or (H, W, 3|4), got shape {arr.shape}")


def _label_2d(arr: np.ndarray, path: Path) -> np.ndarray:
    if arr.ndim == 3 and arr.shape[-1] <= 4:  # RGB(A) masks: the first channel carries the classes
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise InputError(f"{path}: expected a 2D mask (H, W), got shape {arr.shape}")
    return arr


def _as_int(arr: np.ndarray, path: Path) -> np.ndarray:
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all() or np.any(arr != np.round(arr)):
            raise InputError(f"{path}: label has non-integer values")
    elif not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
        raise InputError(f"{path}: label has non-numeric type {arr.dtype}")
    return arr.astype(np.int64)


def _map_255(lab: np.ndarray, num_classes: int) -> np.ndarray:
    """Binary masks saved as 0/255 (most 2D tools do) become 0/1."""
    if num_classes == 2 and lab.size and lab.max() == 255 and np.all((lab == 0) | (lab == 255)):
        return (lab == 255).astype(np.int64)
    return lab


def _label_rule(label: Path) -> str:
    """GlaS annotations are instance ids and PH2 lesions 0/255: both become foreground 1."""
    if _GLAS_ANNO.match(_stem(label)) or (
        label.name.endswith("_lesion.bmp") and label.parent.name.endswith("_lesion")
    ):
        return "binary"
    return "generic"


def load_case(
    ref: CaseRef, *, with_label: bool = True, num_classes: int = 2, binarize: bool | None = None
) -> Case:
    """Read and check one case. With `with_label=False` the label is never opened (unlabelled data).

    binarize: None = the format's rule (GlaS/PH2 foreground -> 1; 0/255 -> 0/1 for binary tasks),
    True = every label > 0 becomes 1, False = label values kept as stored.
    """
    ndim = _SPATIAL_DIMS.get(ref.format)
    if ndim is None:
        raise InputError(
            f"{ref.image}: unknown case format {ref.format!r} (known: {', '.join(_SPATIAL_DIMS)})"
        )
    _require_file(ref.image, "image")
    raw, spacing, extra = _read_any(Path(ref.image), "image", as_label=False)
    if ndim == 2:
        image = _channels_first_2d(raw, ref.image)
    elif raw.ndim == 3:
        image = raw[None]
    else:
        raise InputError(f"{ref.image}: expected a 3D volume (X, Y, Z), got shape {raw.shape}")
    if not np.issubdtype(image.dtype, np.number) and image.dtype != bool:
        raise InputError(f"{ref.image}: image has non-numeric type {image.dtype}")
    for path in ref.channels:  # further channels: same grid as the first
        _require_file(path, "image channel")
        more, more_spacing, more_extra = _read_any(Path(path), "image", as_label=False)
        if more.shape != image.shape[1:]:
            raise InputError(f"{path}: channel shape {tuple(more.shape)} differs from {ref.image}'s "
                             f"{tuple(image.shape[1:])} in case {ref.id!r}")
        mismatch = geometry_mismatch(geometry_of(extra, spacing), geometry_of(more_extra, more_spacing))
        if mismatch:
            raise InputError(f"{path}: channel geometry differs from {ref.image} ({mismatch}) in case {ref.id!r}")
        image = np.concatenate([image, np.asarray(more, dtype=np.float32)[None]])
    image = np.ascontiguousarray(image, dtype=np.float32)
    if not np.isfinite(image).all():
        raise InputError(f"{ref.image}: image contains NaN or Inf values")
    spatial = image.shape[1:]
    label = None
    if with_label and ref.label is not None:
        _require_file(ref.label, "label")
        lab, lab_spacing, lab_extra = _read_any(Path(ref.label), "label", as_label=True)
        lab = _label_2d(lab, ref.label) if ndim == 2 else lab
        if lab.shape != spatial:
            raise InputError(
                f"{ref.label}: label shape {tuple(lab.shape)} does not match image shape "
                f"{tuple(spatial)} of {ref.image}"
            )
        mismatch = geometry_mismatch(geometry_of(extra, spacing), geometry_of(lab_extra, lab_spacing))
        if mismatch:
            raise InputError(f"{ref.label}: label geometry differs from its image {ref.image} ({mismatch}) in case "
                             f"{ref.id!r}")
        lab = _as_int(lab, ref.label)
        if binarize or (binarize is None and _label_rule(Path(ref.label)) == "binary"):
            lab = (lab > 0).astype(np.int64)
        elif binarize is None:
            lab = _map_255(lab, num_classes)
        bad = (lab < 0) | (lab >= num_classes)
        if bad.any():
            values = np.unique(lab[bad])
            shown = ", ".join(str(v) for v in values[:5]) + (", ..." if len(values) > 5 else "")
            raise InputError(
                f"{ref.label}: label values {shown} outside 0..{num_classes - 1} "
                f"(data.num_classes={num_classes}: set data.num_classes to the number of classes, background "
                "included, or store every foreground voxel as 1)"
            )
        label = lab
    meta = {"format": ref.format, "suffix": _suffix(Path(ref.image)), **extra}
    return Case(ref.id, image, label, spacing or (1.0,) * ndim, str(ref.image), meta)


def geometry_of(extra: dict, spacing: tuple[float, ...] | None) -> np.ndarray | None:
    """A file's voxel-to-world matrix (4x4 for NIfTI and NRRD; spacing alone, as a diagonal, for HDF5), or None
    where the format stores no geometry (2D images)."""
    if "affine" in extra:
        return np.asarray(extra["affine"], dtype=float)
    if "itk" in extra:
        itk = extra["itk"]
        n = len(itk["spacing"])
        affine = np.eye(4)
        affine[:n, :n] = np.asarray(itk["direction"], dtype=float).reshape(n, n) @ np.diag(itk["spacing"])
        affine[:n, 3] = itk["origin"]
        return affine
    header = extra.get("header") or {}
    if header.get("space directions") is not None:
        rows = [np.asarray(r, dtype=float) for r in header["space directions"] if r is not None]
        if len(rows) == 3 and all(np.isfinite(r).all() for r in rows):
            affine = np.eye(4)
            affine[:3, :3] = np.stack(rows, axis=1)
            affine[:3, 3] = np.asarray(header.get("space origin", [0, 0, 0]), dtype=float)
            return affine
    return np.diag([*spacing, 1.0]) if spacing and len(spacing) == 3 else None


def geometry_mismatch(a: np.ndarray | None, b: np.ndarray | None, *, tolerance: float = 1e-3) -> str | None:
    """Where two geometries differ beyond `tolerance` (relative to the voxel size): spacing, direction or origin;
    None if they agree or either is unknown."""
    if a is None or b is None:
        return None
    size = max(float(np.abs(a[:3, :3]).max()), 1e-6)
    spacing_a, spacing_b = np.linalg.norm(a[:3, :3], axis=0), np.linalg.norm(b[:3, :3], axis=0)
    if not np.allclose(spacing_a, spacing_b, atol=tolerance * size):
        return f"spacing {np.round(spacing_a, 4).tolist()} vs {np.round(spacing_b, 4).tolist()}"
    if not np.allclose(a[:3, :3], b[:3, :3], atol=tolerance * size):
        return "direction (orientation) differs"
    if not np.allclose(a[:3, 3], b[:3, 3], atol=tolerance * size * 10):
        return f"origin {np.round(a[:3, 3], 3).tolist()} vs {np.round(b[:3, 3], 3).tolist()}"
    return None


def read_geometry(path: str | Path) -> np.ndarray | None:
    """geometry_of a file, reading its header only where the format allows."""
    path = Path(path)
    suffix = _suffix(path)
    with _reading(path):
        if suffix in (".nii", ".nii.gz"):
            img = nib.load(str(path))
            return geometry_of({"affine": img.affine.tolist()}, None)
        if suffix in ITK_EXTS:
            import SimpleITK as sitk  # noqa: N813 - the library's own spelling

            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            reader.ReadImageInformation()
            return geometry_of({"itk": {"origin": reader.GetOrigin(), "spacing": reader.GetSpacing(),
                                        "direction": reader.GetDirection()}}, None)
        if suffix in (".nrrd", ".nhdr"):
            header = nrrd.read_header(str(path))
            return geometry_of({"header": _plain(dict(header))}, _nrrd_spacing(header, int(header["dimension"])))
        if suffix in H5_EXTS:
            with h5py.File(path, "r") as f:
                name = "label" if "label" in f else next(iter(f.keys()), None)
                spacing = _h5_spacing(f, name, f[name].ndim) if name else None
            return geometry_of({}, spacing)
    return None


def read_mask(path: str | Path, *, num_classes: int = 2) -> tuple[np.ndarray, tuple[float, ...]]:
    """A mask file of any supported format as int64 + spacing: what evaluating a mask folder needs."""
    path = Path(path)
    _require_file(path, "mask")
    arr, spacing, _ = _read_any(path, "label", as_label=True)
    if _suffix(path) in IMAGE2D_EXTS:
        arr = _label_2d(arr, path)
    lab = _map_255(_as_int(arr, path), num_classes)
    return lab, spacing or (1.0,) * lab.ndim


# --------------------------------------------------------------------------------------------- writing
def _target(case: Case, *, float_map: bool) -> tuple[str, str]:
    """(writer, extension) for a case: the input's own format; synthetic cases get NIfTI / PNG."""
    fmt = case.meta.get("format")
    if fmt == "nifti" and case.meta.get("suffix") == ".nii":  # uncompressed in, uncompressed out
        return fmt, ".nii"
    if fmt in ("la-h5", "nifti", "nrrd", "mha"):
        return fmt, {"la-h5": ".h5", "nifti": ".nii.gz", "nrrd": ".nrrd", "mha": ".mha"}[fmt]
    if case.spatial_dims == 3:
        return "nifti", ".nii.gz"
    if float_map:
        return "tif", ".tif"
    return "image2d", ".bmp" if case.meta.get("suffix") == ".bmp" else ".png"


def _target_path(out_dir: str | Path, name: str, overwrite: bool) -> Path:
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{out_dir}: cannot create output folder ({_reason(exc)})") from exc
    path = out_dir / name
    if path.exists() and not overwrite:
        raise InputError(f"{path}: already exists; pass overwrite=True to replace it")
    return path


def _write(kind: str, path: Path, arr: np.ndarray, case: Case, dataset: str, *, num_classes: int = 2) -> None:
    """Write to a temporary name beside `path`, then rename: a killed process never leaves a half file behind
    (so a file that exists is a finished one, which `predict` relies on to continue into a folder)."""
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")  # same extension: writers choose by it
    try:
        _write_now(kind, tmp, arr, case, dataset, num_classes)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_now(kind: str, path: Path, arr: np.ndarray, case: Case, dataset: str, num_classes: int) -> None:
    if kind == "la-h5":
        with h5py.File(path, "w") as f:
            f.create_dataset(dataset, data=arr, compression="gzip")
            f[dataset].attrs["spacing"] = np.asarray(case.spacing, dtype=float)
    elif kind == "nifti":
        affine = np.asarray(case.meta.get("affine", np.diag([*case.spacing, 1.0])), dtype=float)
        img = nib.Nifti1Image(arr, affine)
        img.header.set_data_dtype(arr.dtype)
        # the input's header codes: a viewer then places the mask exactly where it placed the image
        img.set_qform(affine, code=int(case.meta.get("qform_code", 1)))
        img.set_sform(affine, code=int(case.meta.get("sform_code", 1)))
        img.header.set_xyzt_units(*case.meta.get("xyzt_units", ("mm", "sec")))
        nib.save(img, str(path))
    elif kind == "nrrd":
        src = case.meta.get("header") or {"spacings": list(case.spacing)}
        header = {
            k: (
                np.asarray(src[k], dtype=float)
                if k in ("space directions", "space origin", "spacings")
                else src[k]
            )
            for k in _NRRD_GEOMETRY
            if k in src
        }
        nrrd.write(str(path), arr, {**header, "encoding": "gzip"})
    elif kind == "mha":
        import SimpleITK as sitk  # noqa: N813 - the library's own spelling

        img = sitk.GetImageFromArray(np.ascontiguousarray(arr.transpose()))  # back to ITK's (z, y, x)
        itk = case.meta.get("itk") or {"origin": [0.0] * arr.ndim, "spacing": list(case.spacing),
                                       "direction": list(np.eye(arr.ndim).ravel())}
        img.SetOrigin(itk["origin"])
        img.SetSpacing(itk["spacing"])
        img.SetDirection(itk["direction"])
        sitk.WriteImage(img, str(path), True)
    elif kind == "tif":
        tifffile.imwrite(path, arr)
    elif dataset == "label" and num_classes > 2:  # class indices in a palette image: distinct colours in a viewer
        image = Image.fromarray(arr, mode="P")
        image.putpalette([c for k in range(256) for c in PALETTE[k % len(PALETTE)]])
        image.save(path)
    elif dataset == "label":  # binary: 0/255, visible in any viewer (read back as 0/1)
        Image.fromarray((arr > 0).astype(np.uint8) * 255, mode="L").save(path)
    else:
        Image.fromarray(arr, mode="L").save(path)


# background black, then distinct colours (matplotlib's tab10) for classes 1, 2, ...
PALETTE = [(0, 0, 0), (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def write_mask(mask: np.ndarray, case: Case, out_dir: str | Path, *, overwrite: bool = False,
               num_classes: int = 2) -> Path:
    """Store a class-index mask (uint8) in the case's own format and geometry, as `<id>` + extension; 2D images
    hold 0/255 for two classes and a palette of class indices for more (visible in any viewer).

    Refuses to replace an existing file unless `overwrite=True`: results must never vanish silently.
    """
    mask = np.asarray(mask)
    if mask.shape != case.spatial_shape:
        raise InputError(f"mask for case {case.id!r} has shape {mask.shape}, image has {case.spatial_shape}")
    mask = _as_int(mask, Path(f"mask of case {case.id}"))
    if mask.size and (mask.min() < 0 or mask.max() > 255):
        raise InputError(f"mask for case {case.id!r} has values outside 0..255 ({mask.min()}..{mask.max()})")
    kind, ext = _target(case, float_map=False)
    path = _target_path(out_dir, case.id + ext, overwrite)
    _write(kind, path, mask.astype(np.uint8), case, "label", num_classes=num_classes)
    return path


def mask_path(case: Case, out_dir: str | Path) -> Path:
    """Where write_mask puts the case's mask."""
    return Path(out_dir) / (case.id + _target(case, float_map=False)[1])


def write_array(
    array: np.ndarray, case: Case, out_dir: str | Path, suffix: str, *, overwrite: bool = False
) -> Path:
    """Store a float map (e.g. uncertainty) as `<id><suffix>` + the format's extension, float32.

    3D: same format and geometry as the input (h5 dataset `data`); 2D: a float32 TIFF.
    """
    array = np.asarray(array, dtype=np.float32)
    if array.shape != case.spatial_shape:
        raise InputError(
            f"array for case {case.id!r} has shape {array.shape}, image has {case.spatial_shape}"
        )
    kind, _ = _target(case, float_map=True)
    path = _target_path(out_dir, array_path(case, out_dir, suffix).name, overwrite)
    _write(kind, path, array, case, "data")
    return path


def array_path(case: Case, out_dir: str | Path, suffix: str) -> Path:
    """Where write_array puts the case's float map `<id><suffix>`."""
    return Path(out_dir) / f"{case.id}{suffix}{_target(case, float_map=True)[1]}"
