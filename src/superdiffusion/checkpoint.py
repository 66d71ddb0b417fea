"""The checkpoint format, shared by training, prediction and export (and nothing else imported here).

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so that it loads with
`torch.load(weights_only=True)`: nothing in it is unpickled as an arbitrary object. Writes go to a
temporary file in the same folder, are flushed to disk, then renamed over the target, so a crash or a
full disk never leaves a half-written checkpoint under the real name; the previous good file is kept
as `<name>.prev.pt` and used, with a one-line warning, when the newest one is unreadable.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import complete
from .errors import InputError

FORMAT = "superdiffusion-checkpoint-v1"


class CheckpointWriteError(RuntimeError):
    """Saving failed (e.g. the disk is full); the checkpoints saved before are untouched."""


def save_checkpoint(payload: dict[str, Any], path: str | Path, *, keep_previous: bool = True) -> Path:
    """Atomically write `payload` (plus the format tag) to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        try:
            with open(tmp, "wb") as f:
                torch.save({"format": FORMAT, **payload}, f)
                f.flush()
                os.fsync(f.fileno())
        except (OSError, RuntimeError) as err:  # disk full, quota, I/O error: nothing saved before is touched
            raise CheckpointWriteError(f"{path}: could not write the checkpoint ({first_sentence(err)}); "
                                       "the previous checkpoints are intact") from err
        if keep_previous and path.exists():  # a second name for the old file: `path` never goes missing
            prev = previous_path(path)
            prev.unlink(missing_ok=True)
            try:
                os.link(path, prev)
            except OSError:  # file systems without hard links
                shutil.copy2(path, prev)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def previous_path(path: Path) -> Path:
    return path.with_name(path.stem + ".prev" + path.suffix)


def load_checkpoint(path: str | Path, *, fallback: bool = True, action: str = "using",
                    warn: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Load a checkpoint with weights-only unpickling; fall back to the previous good file if corrupt, saying so in
    one line (`warn`, default stderr): "warning: <action> the backup checkpoint <prev>: <why path failed>"."""
    path = Path(path)
    try:
        return _load(path)
    except InputError as err:
        prev = previous_path(path)
        if not (fallback and prev.exists()):
            raise
        (warn or _stderr)(f"warning: {action} the backup checkpoint {prev}: {err}")
        return _load(prev)


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def first_sentence(err: BaseException) -> str:
    """The reason torch gives for an unreadable file, as one complete phrase (its messages run on for lines)."""
    text = str(err).strip()
    detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
    if detail:  # weights-only unpickling met bytes that are not a pickle, or objects other than plain data
        text = f"weights-only unpickling failed: {detail.group(1)}"
    if not text:
        return type(err).__name__
    sentence = re.split(r"(?<=\.)\s", text.splitlines()[0])[0].strip().rstrip(".")
    return sentence if len(sentence) <= 160 else sentence[:157].rsplit(" ", 1)[0] + "..."


def _load(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise InputError(f"{path}: checkpoint not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        raise InputError(f"{path}: not a readable superdiffusion checkpoint ({first_sentence(err)})") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise InputError(f"{path}: not a superdiffusion checkpoint (format tag missing)")
    return payload


def config_of(payload: dict[str, Any]) -> dict[str, Any]:
    """The resolved run configuration stored (as JSON text) in a checkpoint, completed to this version's keys."""
    return complete(json.loads(payload["config"]), where="checkpoint config")


def rng_state() -> dict[str, Any]:
    """Every global RNG state, as weights-only-loadable data."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "python": json.dumps(random.getstate()),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    version, internal, gauss = json.loads(state["python"])
    random.setstate((version, tuple(internal), gauss))
