"""Shared fixtures: tiny configs (seconds on 2 CPU cores) and small synthetic datasets written to disk."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from superdiffusion.config import load_config
from superdiffusion.data.synthetic import write_synthetic_dataset

# A supervised run on 10 synthetic 32x32 cases with a 2-level U-Net: about a second end to end.
TINY_2D = [
    "data.format=synthetic",
    "data.synthetic={cases: 10, shape: [32, 32], seed: 0}",
    "split.labelled=3",
    "split.val=3",
    "model.channels=[4, 8]",
    "train.steps=6",
    "train.patch=[32, 32]",
    "train.batch_size=2",
    "train.unlabelled_batch_size=2",
    "train.val_every=3",
    "train.ckpt_every=2",
    "train.threads=1",
]


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """train.threads changes torch's process-wide thread count: put it back after each test."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture
def interrupted_at(monkeypatch) -> Callable:
    """`with interrupted_at(MethodClass, step):` the method's training_step raises KeyboardInterrupt (a stop) when
    it reaches `step`; the patch is undone on leaving the block."""

    @contextlib.contextmanager
    def patched(cls: type, at_step: int) -> Iterator[None]:
        real = cls.training_step

        def interrupting(self, batch, *, step, **kw):
            if step == at_step:
                raise KeyboardInterrupt
            return real(self, batch, step=step, **kw)

        with monkeypatch.context() as m:
            m.setattr(cls, "training_step", interrupting)
            yield

    return patched


@pytest.fixture
def tiny_cfg():
    """tiny_cfg(*overrides) -> a resolved config: TINY_2D plus `key=value` overrides (later ones win)."""

    def make(*overrides: str) -> dict:
        return load_config(None, [*TINY_2D, *overrides])

    return make


@pytest.fixture(scope="session")
def la_root(tmp_path_factory) -> Path:
    """An LA-layout dataset (<id>/mri_norm2.h5 + train.list) of 8 synthetic 16^3 volumes. Read-only!"""
    root = tmp_path_factory.mktemp("la") / "LA"
    return write_synthetic_dataset(root, 8, dims=3, shape=(16, 16, 16), seed=0, fmt="la")


def la_overrides(root: Path, *extra: str) -> list[str]:
    """Overrides that train a 2D net on slices of the LA-layout dataset `root` (16x16 patches)."""
    return [
        "data.format=la",
        f"data.root={root}",
        "data.dims=2",
        "split.labelled=3",
        "split.val=2",
        "model.channels=[4, 8]",
        "train.steps=4",
        "train.patch=[16, 16]",
        "train.batch_size=2",
        "train.unlabelled_batch_size=2",
        "train.val_every=2",
        "train.ckpt_every=2",
        "train.threads=1",
        *extra,
    ]


@pytest.fixture
def la_cfg(la_root):
    """la_cfg(*overrides) -> a config training on slices of the LA-layout dataset the tests share."""

    def make(*overrides: str, root: Path | None = None) -> dict:
        return load_config(None, la_overrides(root or la_root, *overrides))

    return make


@pytest.fixture(scope="session")
def la_sets():
    """la_sets(root, *extra) -> the `key=value` list of la_overrides, for `--set` on the command line."""
    return la_overrides


# ---- CoTrain unit tests (tests/methods/test_rectify.py, test_agree.py, test_generative_view.py) -------------------
def cotrain_method(path: list[str], *overrides: str):
    """A seeded CoTrain on 32x32 one-channel images, two classes, from `key=value` settings."""
    from superdiffusion.methods.superdiffusion import CoTrain

    torch.manual_seed(0)
    return CoTrain(load_config(None, [*path, "method=cotrain", *overrides]), dims=2, in_channels=1, num_classes=2)


def cotrain_batch() -> dict[str, torch.Tensor]:
    """Two labelled and four unlabelled random 32x32 images, the same every call."""
    g = torch.Generator().manual_seed(3)
    x = torch.rand(6, 1, 32, 32, generator=g) * 2 - 1
    return {"image": x[:2], "label": (x[:2, 0] > 0.3).long(), "unlabelled": x[2:]}


def reached_by(m, term: torch.Tensor) -> set[str]:
    """Which of the teacher's pathways and the student a loss term's gradient reaches."""
    groups = {"mask_net": m.teacher.mask_net, "image_net": m.teacher.image_net, "student": m.student}
    reached = set()
    for name, net in groups.items():
        grads = torch.autograd.grad(term, list(net.parameters()), retain_graph=True, allow_unused=True)
        if any(g is not None and g.abs().sum() > 0 for g in grads):
            reached.add(name)
    return reached
