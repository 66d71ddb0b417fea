"""Splits by case: seeded, independent of listing order, disjoint, with exact counts and clear errors."""

from __future__ import annotations

import json
import random

import pytest

from superdiffusion.data.splits import make_split, resolve_count, write_split
from superdiffusion.errors import InputError

IDS = [f"case{i:02d}" for i in range(20)]


def test_deterministic_for_a_seed_and_varies_with_it():
    a = make_split(IDS, labelled=4, val=5, seed=7)
    assert a == make_split(IDS, labelled=4, val=5, seed=7)
    assert a["seed"] == 7
    others = [make_split(IDS, labelled=4, val=5, seed=s) for s in range(5)]
    assert len({json.dumps(o["val"]) for o in others}) > 1


def test_independent_of_input_order():
    expected = make_split(IDS, labelled=0.25, val=0.2, seed=3)
    for shuffle_seed in range(5):
        ids = list(IDS)
        random.Random(shuffle_seed).shuffle(ids)
        assert make_split(ids, labelled=0.25, val=0.2, seed=3) == expected
    assert make_split(list(reversed(IDS)), labelled=0.25, val=0.2, seed=3) == expected


def test_disjoint_cover_and_sorted():
    s = make_split(IDS, labelled=5, val=4, seed=1)
    groups = [s["val"], s["labelled"], s["unlabelled"]]
    assert sum(len(g) for g in groups) == len(IDS)
    assert set().union(*map(set, groups)) == set(IDS)
    assert not set(s["val"]) & set(s["labelled"])
    assert not set(s["val"]) & set(s["unlabelled"])
    assert not set(s["labelled"]) & set(s["unlabelled"])
    for g in groups:
        assert g == sorted(g)


@pytest.mark.parametrize(("labelled", "val", "n_val", "n_lab"), [
    (4, 5, 5, 4),  # counts
    (0.25, 0.2, 4, 4),  # fractions: val of 20, labelled of the 16 training cases
    (0.1, 0, 0, 2),  # no validation
    (0.01, 0.01, 1, 1),  # tiny fractions still give one case
    (15, 5, 5, 15),  # every training case labelled
    (1, 19, 19, 1),  # one training case
    (3.0, 2.0, 2, 3),  # float counts
])
def test_counts(labelled, val, n_val, n_lab):
    s = make_split(IDS, labelled=labelled, val=val, seed=0)
    assert len(s["val"]) == n_val
    assert len(s["labelled"]) == n_lab
    assert len(s["unlabelled"]) == len(IDS) - n_val - n_lab


def test_val_is_carved_first_and_stable_when_labelled_changes():
    """The validation cases depend on (ids, val, seed) only: methods with more labels share them."""
    base = make_split(IDS, labelled=2, val=5, seed=4)
    for labelled in (1, 4, 0.5, 15):
        s = make_split(IDS, labelled=labelled, val=5, seed=4)
        assert s["val"] == base["val"]
    # and a larger labelled count is a superset of a smaller one (same shuffled order)
    assert set(base["labelled"]) <= set(make_split(IDS, labelled=6, val=5, seed=4)["labelled"])


def test_write_split(tmp_path):
    s = make_split(IDS, labelled=3, val=2, seed=0)
    write_split(s, tmp_path / "split.json")
    assert json.loads((tmp_path / "split.json").read_text()) == s


@pytest.mark.parametrize(("labelled", "val", "pattern"), [
    (0, 2, r"split\.labelled: 0 gives zero cases"),
    (0.0, 2, r"split\.labelled: 0\.0 gives zero cases"),
    (19, 2, r"split\.labelled: 19 asks for 19 cases but only 18"),
    (25, 0, r"split\.labelled: 25 asks for 25 cases but only 20"),
    (-1, 2, r"split\.labelled: -1 is not a fraction"),
    ("3", 2, r"split\.labelled: '3' is not a fraction"),
    (True, 2, r"split\.labelled: True is not a fraction"),
    (2, 20, r"split\.val: 20 leaves no training case out of 20"),
    (2, 0.99, r"split\.val: 0\.99 leaves no training case"),
    (2, 21, r"split\.val: 21 asks for 21 cases but only 20"),
    (2, -0.5, r"split\.val: -0\.5 is not a fraction"),
    (2, None, r"split\.val: None is not a fraction"),
])
def test_errors_name_the_value(labelled, val, pattern):
    with pytest.raises(InputError, match=pattern):
        make_split(IDS, labelled=labelled, val=val, seed=0)


def test_empty_dataset_and_duplicates():
    with pytest.raises(InputError, match="empty"):
        make_split([], labelled=1, val=0)
    with pytest.raises(InputError, match="duplicate"):
        make_split(["a", "b", "a"], labelled=1, val=0)


def test_resolve_count_rounding():
    assert resolve_count(0.5, 5, what="x") == 2  # round half to even: 2.5 -> 2
    assert resolve_count(0.3, 10, what="x") == 3
    assert resolve_count(0, 10, what="x", allow_zero=True) == 0
    assert resolve_count(10, 10, what="x") == 10


def test_label_less_cases_only_ever_unlabelled():
    plain = make_split(IDS, labelled=4, val=5, seed=3)
    assert make_split(IDS, labelled=4, val=5, seed=3, label_less=set()) == plain  # unchanged without them
    no_label = {f"case{i:02d}" for i in range(12)}
    for seed in range(5):
        split = make_split(IDS, labelled=0.5, val=2, seed=seed, label_less=no_label)
        assert no_label <= set(split["unlabelled"]) and len(split["val"]) == 2 and len(split["labelled"]) == 3
        assert not no_label & set(split["val"] + split["labelled"])
    with pytest.raises(InputError, match="leaves no training case out of 8 with a label file"):
        make_split(IDS, labelled=1, val=8, label_less=no_label)
    with pytest.raises(InputError, match="none of the 20 cases has a label file"):
        make_split(IDS, labelled=1, label_less=set(IDS))
