"""Training methods: small classes on the shared trainer, chosen by name in the config."""

from __future__ import annotations

from ..errors import InputError
from .base import Method
from .baselines import BCP, CPS, UAMT, CPSPaper, MeanTeacher
from .superdiffusion import CoTrain, FixMatch, Pretrain, SuperDiffusion
from .supervised import FullySupervised, Supervised
from .unimatch import UniMatch

METHODS: dict[str, type[Method]] = {m.name: m for m in (Supervised, FullySupervised, Pretrain, CoTrain,
                                                        SuperDiffusion, FixMatch, MeanTeacher, UAMT, CPS, CPSPaper,
                                                        BCP, UniMatch)}


def method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise InputError(f"method: unknown {name!r} (known: {', '.join(sorted(METHODS))})")
    return METHODS[name]


def build_method(cfg: dict, *, in_channels: int) -> Method:
    return method_class(cfg["method"])(cfg, dims=cfg["data"]["dims"], in_channels=in_channels,
                                       num_classes=cfg["data"]["num_classes"])
