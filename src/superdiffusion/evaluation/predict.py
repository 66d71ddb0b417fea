"""Loading a finished run for prediction and evaluation, without importing the training engine."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import config_of, load_checkpoint
from ..data.case import Case
from ..device import resolve_device
from ..errors import InputError, check_positive_int
from ..methods import build_method
from ..methods.base import Method
from .inference import predict_probabilities, segment


@dataclass
class LoadedRun:
    cfg: dict
    method: Method
    predictor: str  # which of method.predictors() to use
    checkpoint: Path

    @property
    def device(self) -> torch.device:
        """Where the weights were put (the config's train.device); inference windows run there."""
        return next(self.method.parameters()).device

    def teacher(self, mode: str | None = None, **options) -> Callable:
        """The diffusion teacher's logits function in a given inference mode (fixed, ddim, ensemble)."""
        teacher = getattr(self.method, "teacher", None)
        if teacher is None:
            raise InputError(f"{self.checkpoint}: method {self.cfg['method']} has no diffusion teacher")
        return teacher.predictor(mode, **options)

    def uncertainty(self, case: Case, *, samples: int, noise_seed: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Mean probabilities of n teacher samples and the per-voxel std of the foreground probability."""
        seed = self.cfg["diffusion"]["noise_seed"] if noise_seed is None else noise_seed
        probs = np.stack([self.probabilities(case, fn=self.teacher("fixed", noise_seed=seed + i))
                          for i in range(samples)])
        return probs.mean(0), probs.std(0)[1:].max(0)

    def predict(self, image: np.ndarray | str | Path, *, spacing: tuple[float, ...] | None = None,
                probabilities: bool = False) -> np.ndarray:
        """Label map (int64, the image's spatial shape) of an image, or its class probabilities (K, *spatial).

        image: an array, channels first (C, *spatial) or, for a one-channel model, (*spatial); or an image
        file in any format `predict` reads (NIfTI, NRRD, LA's .h5, PNG, ...), its first channel axis as stored.
        """
        case = self.case_of(image, spacing)
        probs = self.probabilities(case)
        return probs if probabilities else segment(probs)

    def case_of(self, image: np.ndarray | str | Path, spacing: tuple[float, ...] | None = None) -> Case:
        """A Case for `predict`: a file read as the CLI reads it, or an array given a channel axis if it lacks one."""
        if isinstance(image, str | Path):
            from ..data.pipeline import ref_for_file
            from ..data.readers import load_case

            case = load_case(ref_for_file(image), with_label=False, num_classes=self.cfg["data"]["num_classes"])
        else:
            array = np.asarray(image, dtype=np.float32)
            if array.ndim == 2 or (array.ndim == 3 and array.shape[0] != self.method.in_channels):
                array = array[None]  # (*spatial): one channel
            bad = int(array.size - np.isfinite(array).sum())  # files are checked by their reader
            if bad:  # NaN would pass the network silently: NaN probabilities and an all-background mask
                raise InputError(f"array: image contains NaN or Inf values ({bad} voxel(s))")
            case = Case("array", array, None, tuple(spacing or (1.0,) * (array.ndim - 1)), "array")
        return self.check_fits(case)

    def check_fits(self, case: Case) -> Case:
        """The case itself, or a one-line error naming it when its channels or dimensions do not fit the model."""
        channels, dims = self.method.in_channels, self.cfg["data"]["dims"]
        if case.image.shape[0] != channels or case.spatial_dims not in (2, 3) or (dims == 3 and case.spatial_dims != 3):
            raise InputError(f"{case.source}: image of shape {tuple(case.image.shape)} (channels first) does not fit "
                             f"this model ({channels} channel(s), {dims}D network)")
        return case

    def probabilities(self, case: Case, predictor: str | None = None, fn: Callable | None = None) -> np.ndarray:
        """Class probabilities at the case's resolution, by a named predictor or a given logits function."""
        fn = fn or self.method.predictors()[predictor or self.predictor]
        ec = self.cfg["eval"]
        return predict_probabilities(fn, case, data_cfg=self.cfg["data"], dims=self.cfg["data"]["dims"],
                                     patch=self.cfg["train"]["patch"], overlap=ec["overlap"],
                                     sw_batch_size=ec["sw_batch_size"], device=self.device)


def use_threads(cfg: dict, threads: int | None = None) -> int | None:
    """Set torch's CPU threads to `threads`, else to the run's train.threads when set (torch's default otherwise:
    one thread per core, which on a busy machine is many times slower than one). Returns the number set."""
    check_positive_int("--threads", threads)
    n = threads or cfg["train"].get("threads")
    if n:
        torch.set_num_threads(int(n))
    return n


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
    method.to(resolve_device(cfg["train"].get("device", "auto"))).eval()
    chosen = predictor or results.get("predictor") or next(iter(method.predictors()))
    if chosen not in method.predictors():
        raise InputError(f"--predictor {chosen!r}: {cfg['method']} offers {', '.join(method.predictors())}")
    return LoadedRun(cfg, method, chosen, path)
