"""Benchmark protocols: a base run config plus per-method overrides and named ablation variants.

A protocol YAML holds the run-config keys of `config.DEFAULTS` (validated by `config.merge`, never here)
and four protocol-only keys:

    description: one line for summary.md
    bench:       defaults of the command (methods, fractions, seeds, qualitative_cases)
    methods:     {method: overrides}   applied to that method's runs only
    ablations:   {name: {variants: {variant: overrides}, predictors: [..]}}

Overrides are nested mappings or dotted keys (`superdiffusion.rounds: 0`). A variant may set `method`
(default superdiffusion); it runs as the extra method `<method>[<variant>]`. `predictors` lists the
predictors of each variant that the ablation tabulates separately (teacher vs student: no extra training).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import DEFAULTS, dotted_tree, merge, read_yaml
from ..errors import InputError
from ..methods import method_class

PROTOCOLS = Path(__file__).resolve().parent.parent / "configs" / "protocols"
META_KEYS = ("description", "bench", "methods", "ablations")
BENCH_DEFAULTS: dict[str, Any] = {"methods": ["supervised", "superdiffusion"], "fractions": [0.1, 0.2],
                                  "seeds": [0], "qualitative_cases": 3}
REFERENCE = "superdiffusion"  # the method every other one is compared with (paired statistics)


@dataclass
class Ablation:
    name: str
    variants: dict[str, dict]  # variant name -> nested overrides (may hold "method")
    predictors: list[str] = field(default_factory=list)  # predictors tabulated separately, [] = the chosen one

    def label(self, variant: str) -> str:
        return f"{self.variant_method(variant)}[{variant}]"

    def variant_method(self, variant: str) -> str:
        return self.variants[variant].get("method", REFERENCE)


@dataclass
class Protocol:
    name: str
    path: Path
    description: str
    base: dict  # a complete run config: DEFAULTS <- the protocol's run keys
    methods: dict[str, dict]  # method -> nested overrides
    ablations: dict[str, Ablation]
    bench: dict  # BENCH_DEFAULTS <- the protocol's `bench`


def folder_name(label: str) -> str:
    """`superdiffusion[R3-chained]` -> `superdiffusion--R3-chained` (no glob characters in folder names)."""
    return label.replace("[", "--").replace("]", "")


def shipped_protocols() -> list[str]:
    return sorted(p.stem for p in PROTOCOLS.glob("*.yaml"))


def resolve_protocol(name: str | Path) -> Path:
    """A shipped protocol's name (la2d, ...) or a protocol YAML file."""
    if str(name) in shipped_protocols():
        return PROTOCOLS / f"{name}.yaml"
    if Path(name).is_file():
        return Path(name)
    raise InputError(f"--protocol {name}: unknown protocol (shipped: {', '.join(shipped_protocols())}; "
                     "or give a protocol YAML file)")


def apply(cfg: dict, overrides: dict, *, where: str) -> dict:
    """cfg <- overrides (dotted or nested), checked against the config's keys by config.merge."""
    tree = dotted_tree(overrides, where=where)
    tree.pop("method", None)  # the method is set by the planner, not by overrides
    merge(cfg, tree, where=where)
    return cfg


def load_protocol(name: str | Path) -> Protocol:
    """Read and check a protocol: every override of every method and variant is merged once here."""
    path = resolve_protocol(name)
    raw = read_yaml(path)
    base = copy.deepcopy(DEFAULTS)
    merge(base, {k: v for k, v in raw.items() if k not in META_KEYS}, where=str(path))
    bench = copy.deepcopy(BENCH_DEFAULTS)
    extra = set(raw.get("bench") or {}) - set(BENCH_DEFAULTS)
    if extra:
        raise InputError(f"{path}: unknown bench key(s) {', '.join(sorted(extra))} "
                         f"(known: {', '.join(BENCH_DEFAULTS)})")
    bench.update(raw.get("bench") or {})
    methods = raw.get("methods") or {}
    if not isinstance(methods, dict):
        raise InputError(f"{path}: `methods` must map method names to overrides")
    for m, over in methods.items():
        method_class(m)
        apply(copy.deepcopy(base), over or {}, where=f"{path}: methods.{m}")
    ablations = {}
    for a, spec in (raw.get("ablations") or {}).items():
        if not isinstance(spec, dict) or not isinstance(spec.get("variants"), dict) or not spec["variants"]:
            raise InputError(f"{path}: ablations.{a} needs a non-empty `variants` mapping")
        unknown = set(spec) - {"variants", "predictors"}
        if unknown:
            raise InputError(f"{path}: ablations.{a}: unknown key(s) {', '.join(sorted(unknown))}")
        variants = {v: dotted_tree(over or {}, where=f"{path}: ablations.{a}.{v}")
                    for v, over in spec["variants"].items()}
        ablation = Ablation(a, variants, list(spec.get("predictors") or []))
        for v, over in variants.items():
            method_class(ablation.variant_method(v))
            apply(copy.deepcopy(base), over, where=f"{path}: ablations.{a}.{v}")
        ablations[a] = ablation
    stem = path.stem
    return Protocol(stem, path, str(raw.get("description") or ""), base,
                    {m: dotted_tree(o or {}, where=str(path)) for m, o in methods.items()}, ablations, bench)


def same_config(a: dict, b: dict) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
