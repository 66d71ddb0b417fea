"""superdiffusion: semi-supervised biomedical image segmentation with a diffusion teacher and a student.

The package reads one way, stage by stage: config -> data -> nets/diffusion -> methods -> engine ->
evaluation, with the command line in `cli`. The Python API, for scripts and notebooks:

    import superdiffusion as sd
    results = sd.train("demo", "runs/sup", overrides=["method=supervised"])  # a shipped config or a YAML file
    run = sd.load_run("runs/sup")                      # the run's reported checkpoint and predictor
    mask = run.predict(image)                          # numpy (C, *spatial) or (*spatial): labels, same shape
    mask = run.predict("scan.nii.gz")                  # or any image file `superdiffusion predict` reads
    probs = run.predict(image, probabilities=True)     # (K, *spatial)

Names are imported on first use, so `import superdiffusion` stays light.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__version__ = "0.1.0"
__all__ = ["load_config", "load_run", "train"]


def train(config: str | Path, out: str | Path, *, overrides: list[str] | tuple[str, ...] = (), resume: bool = False,
          progress: bool = True) -> dict:
    """Train a config (a shipped name such as `demo`, or a YAML file) with `key=value` overrides into the run
    folder `out` (never overwritten; `resume` continues it); returns results.json's content."""
    from .config import load_config
    from .engine.run import train_run

    return train_run(load_config(config, list(overrides)), out, resume=resume, progress=progress)


def __getattr__(name: str) -> Any:
    if name == "load_run":
        from .evaluation.predict import load_run

        return load_run
    if name == "load_config":
        from .config import load_config

        return load_config
    raise AttributeError(f"module 'superdiffusion' has no attribute {name!r}")
