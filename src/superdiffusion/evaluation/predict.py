"""Loading a finished run for prediction and evaluation, without importing the training engine."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..checkpoint import config_of, load_checkpoint
from ..data.case import Case
from ..errors import InputError
from ..methods import build_method
from ..methods.base import Method
from .inference import predict_probabilities


@dataclass
class LoadedRun:
    cfg: dict
    method: Method
    predictor: str  # which of method.predictors() to use
    checkpoint: Path

    def probabilities(self, case: Case, predictor: str | None = None) -> np.ndarray:
        fn = self.method.predictors()[predictor or self.predictor]
        ec = self.cfg["eval"]
        return predict_probabilities(fn, case, data_cfg=self.cfg["data"], dims=self.cfg["data"]["dims"],
                                     patch=self.cfg["train"]["patch"], overlap=ec["overlap"],
                                     sw_batch_size=ec["sw_batch_size"])


def load_run(run_dir: str | Path, *, checkpoint: str | None = None, predictor: str | None = None) -> LoadedRun:
    """The run's chosen checkpoint (results.json, else eval.checkpoint) and predictor."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InputError(f"{run_dir}: run folder not found")
    results = json.loads((run_dir / "results.json").read_text()) if (run_dir / "results.json").is_file() else {}
    name = checkpoint or results.get("checkpoint") or "last"
    path = run_dir / "checkpoints" / f"{name}.pt"
    payload = load_checkpoint(path)
    cfg = config_of(payload)
    method = build_method(cfg, in_channels=int(payload["in_channels"]))
    method.load_state_dict(payload["model"])
    method.eval()
    chosen = predictor or results.get("predictor") or next(iter(method.predictors()))
    if chosen not in method.predictors():
        raise InputError(f"--predictor {chosen!r}: {cfg['method']} offers {', '.join(method.predictors())}")
    return LoadedRun(cfg, method, chosen, path)
