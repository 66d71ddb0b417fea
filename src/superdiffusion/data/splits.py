"""Seeded, filesystem-independent splits by case: sort the ids, then shuffle them with the seed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import InputError


def resolve_count(value: float | int, total: int, *, what: str, allow_zero: bool = False) -> int:
    """A fraction (< 1) of `total` rounded to the nearest case, or a count (>= 1)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise InputError(f"split.{what}: {value!r} is not a fraction in [0, 1) or a case count")
    count = round(value * total) if value < 1 else int(value)
    if value < 1 and value > 0 and count == 0:
        count = 1
    if count == 0 and not allow_zero:
        raise InputError(f"split.{what}: {value!r} gives zero cases out of {total}")
    if count > total:
        raise InputError(f"split.{what}: {value!r} asks for {count} cases but only {total} are available")
    return count


def make_split(ids: list[str], *, labelled: float | int, val: float | int = 0.0, seed: int = 0,
               label_less: set[str] | frozenset[str] = frozenset()) -> dict:
    """{"val", "labelled", "unlabelled"}: validation carved first, labelled taken from the rest.

    A labelled fraction is a fraction of the training cases (the ids left after validation). Cases in
    `label_less` (no label file: nnU-Net imagesTr entries without labelsTr, images without a mask) can only be
    unlabelled: validation and labelled cases are drawn from the others (fractions of them), in the order the seed
    gives every case, so a dataset without label-less cases splits exactly as before.
    """
    if not ids:
        raise InputError("the dataset is empty: no case to split")
    if len(set(ids)) != len(ids):
        raise InputError("duplicate case ids in the dataset")
    order = sorted(ids)
    np.random.default_rng(seed).shuffle(order)
    pool = [i for i in order if i not in label_less]
    if not pool:
        raise InputError(f"none of the {len(order)} cases has a label file: training needs at least one")
    n_val = resolve_count(val, len(pool), what="val", allow_zero=True)
    if n_val >= len(pool):
        raise InputError(f"split.val: {val!r} leaves no training case out of {len(pool)}"
                         + (" with a label file" if label_less else ""))
    val_ids, train_ids = pool[:n_val], pool[n_val:]
    n_lab = resolve_count(labelled, len(train_ids), what="labelled")
    unlabelled = train_ids[n_lab:] + [i for i in order if i in label_less]
    return {"val": sorted(val_ids), "labelled": sorted(train_ids[:n_lab]),
            "unlabelled": sorted(unlabelled), "seed": seed}


def write_split(split: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(split, indent=1))
