"""Every method on RGB images end to end (PH2's case: dermoscopy photographs): each trains on a 3-channel folder
dataset, its networks read 3 channels, SuperDiffusion's image pathway re-synthesises 3, and the run evaluates."""

from __future__ import annotations

import pytest

from superdiffusion.checkpoint import load_checkpoint
from superdiffusion.config import load_config
from superdiffusion.data.synthetic import write_synthetic_dataset
from superdiffusion.engine.run import train_run
from superdiffusion.methods import METHODS

# the user-facing methods (pretrain and cotrain are SuperDiffusion's stages, run by it)
RGB_METHODS = sorted(set(METHODS) - {"pretrain", "cotrain"})


@pytest.fixture(scope="module")
def rgb_root(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("rgb") / "photos", 10, dims=2, shape=(32, 32), seed=0,
                                   fmt="folders", channels=3)


@pytest.mark.parametrize("method", RGB_METHODS)
def test_every_method_trains_and_evaluates_on_rgb(tmp_path, rgb_root, method):
    cfg = load_config(None, ["data.format=folders", f"data.root={rgb_root}", "split.labelled=4", "split.val=2",
                             "model.channels=[4, 8]", "train.steps=3", "train.patch=[32, 32]", "train.batch_size=2",
                             "train.unlabelled_batch_size=2", "train.val_every=0", "train.threads=1",
                             "superdiffusion.pretrain_steps=2", "superdiffusion.rounds=1",
                             "bcp.largest_component=false",
                             f"method={method}"])
    r = train_run(cfg, tmp_path / "run", progress=False)
    scores = [v["mean"]["dice"]["mean"] for v in r["val"].values()]
    assert scores and all(0.0 <= s <= 1.0 for s in scores)
    weights = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["model"]
    # every network's input convolution reads the image's 3 channels (the diffusion pathways: 3 + a mask's 2)
    inputs = {k: v.shape[1] for k, v in weights.items() if v.ndim == 4 and k.endswith("first.conv.weight")}
    assert inputs == {k: 3 + 2 if k.endswith("_net.first.conv.weight") else 3 for k in inputs}, inputs
    # the output (transposed) convolutions, (in, out, k, k): masks of 2 classes; the image pathway's picture of 3
    outputs = {k: v.shape[1] for k, v in weights.items() if v.ndim == 4 and k.endswith("last.conv.weight")}
    expected = {k: 3 if "image_net" in k else 2 for k in outputs}
    assert outputs == expected
    if method == "superdiffusion":
        assert "teacher.image_net.last.conv.weight" in outputs
