"""config_changes: what makes a stored run's config differ from a new one (resume and bench folders)."""

from __future__ import annotations

from superdiffusion.config import load_config
from superdiffusion.engine.run import config_changes


def test_diffusion_sections_matter_only_to_methods_that_read_them():
    for method, changed in (("supervised", []), ("mean-teacher", []), ("superdiffusion", ["superdiffusion.ema"])):
        old = load_config(None, [f"method={method}"])
        new = load_config(None, [f"method={method}", "superdiffusion.ema=0.99"])
        assert config_changes(old, new) == changed, method
    sup = load_config(None, ["method=supervised"])
    assert config_changes(sup, load_config(None, ["method=supervised", "train.lr=0.1"])) == ["train.lr"]
    assert config_changes(sup, load_config(None, ["method=cotrain", "superdiffusion.ema=0.99"])) == [
        "method", "superdiffusion.ema"]
    assert config_changes(sup, load_config(None, ["method=supervised", "train.hold_memory=false"])) == []
