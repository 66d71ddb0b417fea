"""Config loading: defaults, YAML merge, --set overrides, and one-line errors naming the key or file."""

from __future__ import annotations

import copy

import pytest

from superdiffusion.config import DEFAULTS, PACKAGE_CONFIGS, dump_config, load_config, parse_sets, shipped_configs
from superdiffusion.errors import InputError


def test_defaults_load_as_an_independent_copy():
    cfg = load_config(None)
    assert cfg == DEFAULTS
    snapshot = copy.deepcopy(DEFAULTS)
    cfg["train"]["steps"] = 1
    cfg["model"]["channels"].append(256)
    assert DEFAULTS == snapshot, "load_config must not hand out (and let callers mutate) the defaults"


def test_yaml_file_merges_over_defaults(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("method: superdiffusion\ntrain:\n  steps: 42\n  patch: [96, 96]\ndata:\n  synthetic: {cases: 5}\n")
    cfg = load_config(path)
    assert cfg["method"] == "superdiffusion"
    assert cfg["train"]["steps"] == 42 and cfg["train"]["patch"] == [96, 96]
    # untouched siblings keep their defaults, at every depth
    assert cfg["train"]["batch_size"] == DEFAULTS["train"]["batch_size"]
    assert cfg["data"]["synthetic"] == {"cases": 5, "shape": [64, 64], "seed": 0}
    assert cfg["eval"] == DEFAULTS["eval"]


def test_empty_yaml_file_is_the_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing set\n")
    assert load_config(path) == DEFAULTS


def test_set_overrides_parse_as_yaml_and_win_over_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train: {steps: 42, lr: 0.5}\n")
    cfg = load_config(path, [
        "train.steps=7",
        "train.lr=0.25",
        "seed=3",
        "train.augment=false",
        "model.channels=[8, 16, 32]",
        "data.synthetic={cases: 9, shape: [16, 16, 16]}",
        "data.root=/some/where",
        "data.scale=[0.5, 0.5]",
        "data.list=",
        "method=cotrain",
    ])
    assert cfg["train"]["steps"] == 7 and isinstance(cfg["train"]["steps"], int)
    assert cfg["train"]["lr"] == 0.25 and isinstance(cfg["train"]["lr"], float)
    assert cfg["seed"] == 3
    assert cfg["train"]["augment"] is False
    assert cfg["model"]["channels"] == [8, 16, 32]
    assert cfg["data"]["synthetic"] == {"cases": 9, "shape": [16, 16, 16], "seed": 0}
    assert cfg["data"]["root"] == "/some/where"
    assert cfg["data"]["scale"] == [0.5, 0.5]
    assert cfg["data"]["list"] is None
    assert cfg["method"] == "cotrain"


def test_later_set_wins_and_value_may_contain_equals():
    cfg = load_config(None, ["train.steps=5", "train.steps=6", "data.root=/a=b"])
    assert cfg["train"]["steps"] == 6
    assert cfg["data"]["root"] == "/a=b"


def test_two_mappings_set_for_one_key_both_apply():
    sets = ["data.synthetic={cases: 3}", "data.synthetic={shape: [8, 8]}"]
    assert load_config(None, sets)["data"]["synthetic"] == {**DEFAULTS["data"]["synthetic"], "cases": 3,
                                                            "shape": [8, 8]}
    assert parse_sets(sets) == {"data": {"synthetic": {"cases": 3, "shape": [8, 8]}}}


def test_scientific_notation_numbers_are_floats(tmp_path):
    cfg = load_config(None, ["train.lr=1e-3", "train.weight_decay=1e-4", "superdiffusion.pretrain_lr=2e-4"])
    assert cfg["train"]["lr"] == pytest.approx(1e-3)
    assert cfg["train"]["weight_decay"] == pytest.approx(1e-4)
    assert cfg["superdiffusion"]["pretrain_lr"] == pytest.approx(2e-4)
    path = tmp_path / "sci.yaml"
    path.write_text("train:\n  lr: 3e-4\n")
    assert isinstance(load_config(path)["train"]["lr"], float)
    # bench --set reads the same way (it once parsed 1e-3 as the string "1e-3")
    assert parse_sets(["train.lr=1e-3"]) == {"train": {"lr": pytest.approx(1e-3)}}


@pytest.mark.parametrize(("override", "key"), [
    ("train.stpes=5", "train.stpes"),
    ("nonsense=1", "nonsense"),
    ("data.synthetic.cases_=3", "data.synthetic.cases_"),
])
def test_unknown_key_names_the_key(override, key):
    with pytest.raises(InputError) as exc:
        load_config(None, [override])
    msg = str(exc.value)
    assert key in msg and "\n" not in msg


def test_unknown_key_in_yaml_file_names_file_and_key(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("train:\n  batchsize: 4\n")
    with pytest.raises(InputError, match="unknown config key 'train.batchsize'") as exc:
        load_config(path)
    assert str(path) in str(exc.value)


@pytest.mark.parametrize("override", ["model.channels.x=3", "train.lr.typo=0.1", "data.root.x=/a"])
def test_subkey_of_a_leaf_is_refused(override):
    with pytest.raises(InputError) as exc:
        load_config(None, [override])
    assert override.partition("=")[0] in str(exc.value)


def test_mapping_replaced_by_scalar_is_refused():
    with pytest.raises(InputError, match="'train' must be a mapping"):
        load_config(None, ["train=5"])


@pytest.mark.parametrize("bad", ["train.steps", "=5", ""])
def test_set_without_key_value_is_refused(bad):
    with pytest.raises(InputError, match="expected key=value"):
        load_config(None, [bad])


@pytest.mark.parametrize("text", ["train: [unclosed\n", "train:\n  steps: 1\n bad-indent: 2\n", "a: b: c\n"])
def test_bad_yaml_is_one_line_naming_the_file(tmp_path, text):
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    with pytest.raises(InputError) as exc:
        load_config(path)
    msg = str(exc.value)
    assert str(path) in msg and "not valid YAML" in msg
    assert len(msg.splitlines()) == 1


def test_yaml_that_is_not_a_mapping_is_refused(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(InputError, match="must be a mapping") as exc:
        load_config(path)
    assert str(path) in str(exc.value)


def test_yaml_cannot_construct_python_objects(tmp_path):
    path = tmp_path / "evil.yaml"
    marker = tmp_path / "pwned"
    path.write_text(f"seed: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(InputError) as exc:
        load_config(path)
    assert str(path) in str(exc.value)
    assert not marker.exists()


def test_missing_config_file_names_it_and_lists_shipped(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(InputError) as exc:
        load_config(missing)
    msg = str(exc.value)
    assert str(missing) in msg and "not found" in msg and "demo" in msg


def test_shipped_config_by_name():
    assert "demo" in shipped_configs()
    cfg = load_config("demo")
    assert cfg == load_config("demo.yaml") == load_config(PACKAGE_CONFIGS / "demo.yaml")
    assert cfg["data"]["format"] == "synthetic"
    assert cfg["split"]["labelled"] == 2 and cfg["split"]["val"] == 16
    assert cfg["train"]["steps"] == 300
    # keys the demo does not set keep the defaults
    assert cfg["diffusion"] == DEFAULTS["diffusion"]
    # overrides apply on top of a shipped config too
    assert load_config("demo", ["train.steps=3"])["train"]["steps"] == 3


@pytest.mark.parametrize("name", shipped_configs())
def test_every_shipped_config_loads(name):
    cfg = load_config(name)
    assert set(cfg) == set(DEFAULTS)


def test_dump_then_load_round_trips(tmp_path):
    cfg = load_config("demo", ["data.scale=[0.5, 0.5]", "train.lr=0.0001"])
    path = tmp_path / "config.yaml"
    dump_config(cfg, path)
    assert load_config(path) == cfg


@pytest.mark.parametrize(("override", "suggestion"), [
    ("train.stpes=5", "'train.steps'"),
    ("trian.steps=5", "'train'"),
    ("data.num_clases=3", "'data.num_classes'"),
])
def test_unknown_key_suggests_the_closest_known_one(override, suggestion):
    with pytest.raises(InputError, match=f"did you mean {suggestion}") as exc:
        load_config(None, [override])
    assert "\n" not in str(exc.value)


def test_unknown_key_without_a_close_one_gets_no_suggestion():
    with pytest.raises(InputError) as exc:
        load_config(None, ["zzzqqq=1"])
    assert "did you mean" not in str(exc.value)
