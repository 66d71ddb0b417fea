"""`superdiffusion plan`, and `train --data` / `bench --data`: a config planned from a dataset folder
(data/plan.py), so that a user's own data trains without a YAML file, as nnU-Net users expect."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from ..errors import InputError
from ..outputs import check_output_file

DATA_OPTIONS = ("method", "dims", "labelled")


def add_data_options(p: argparse.ArgumentParser, *, data_help: str, options: tuple[str, ...] = DATA_OPTIONS) -> None:
    """--data DIR and the few choices the plan leaves to the user (`options` of them)."""
    p.add_argument("--data", metavar="DIR", help=data_help)
    if "method" in options:
        p.add_argument("--method", help="with --data: the method to plan for (default superdiffusion; "
                                        "supervised, fixmatch, mean-teacher, cps, bcp, ...)")
    p.add_argument("--dims", type=int, choices=[2, 3],
                   help="with --data: network dimensionality (default 2: 2D slices of 3D volumes, CPU-friendly; "
                        "3: a 3D network on patches, for a GPU)")
    if "labelled" in options:
        p.add_argument("--labelled", type=int, metavar="N",
                       help="with --data: labelled training cases (default: every labelled case not validating, or "
                            "a tenth of them for a semi-supervised method when no case lacks a label)")


def add_plan_parser(sub) -> None:
    p = sub.add_parser("plan", help="plan a config for a dataset folder (nnU-Net, images/ + labels/, ...)",
                       description="Detects the folder's layout, reads the images' geometry and the class count, "
                                   "and prints the planned config in a few lines: the network, its image size, the "
                                   "split and the method's settings (from the shipped protocols). `train --data DIR` "
                                   "trains the same plan.")
    add_data_options(p, data_help="dataset folder (required)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a planned value, e.g. --set train.steps=200 (repeatable)")
    p.add_argument("--out", metavar="FILE", help="also write the planned config as YAML here (never overwritten); "
                                                 "`superdiffusion train FILE` then trains it")


def _plan(args, out: str | Path | None, **extra):
    from ..data.plan import plan_config

    return plan_config(args.data, method=getattr(args, "method", None) or "superdiffusion", dims=args.dims,
                       labelled=getattr(args, "labelled", None), overrides=args.overrides, out=out, **extra)


def check_data_options(args, *, other: str | None, what: str) -> None:
    """--data excludes `other` (a config or a protocol); --method/--dims/--labelled need --data."""
    if args.data and other:
        raise InputError(f"give {what} or --data DIR, not both (--data plans its own config; to run {what} on a "
                         "folder: --set data.root=DIR)")
    given = [f"--{o}" for o in DATA_OPTIONS if getattr(args, o, None) is not None]
    if given and not args.data:
        raise InputError(f"{', '.join(given)}: only with --data DIR (a config sets them: --set method=..., ...)")


def cmd_plan(args) -> int:
    if not args.data:
        raise InputError("plan: --data DIR is required")
    out = check_output_file(args.out) if args.out else None  # never overwritten; checked before the data are read
    cfg, lines = _plan(args, out)
    if out is not None:
        write_config(cfg, out, lines)
    print("\n".join(lines))
    return 0


def write_config(cfg: dict, path: Path, lines: list[str]) -> None:
    """The plan as a YAML config, its summary as the header comment."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        head = ["planned by superdiffusion from the data folder (data/plan.py)", *lines]
        path.write_text("".join(f"# {ln}\n" for ln in head) + yaml.safe_dump(cfg, sort_keys=False))
    except OSError as err:
        raise InputError(f"{path}: cannot write ({err.strerror})") from err


def train_config(args) -> tuple[dict, Path]:
    """The run config of `train` and its run folder: the config file's, or the plan of --data (printed)."""
    from ..config import load_config

    check_data_options(args, other=args.config, what="a CONFIG")
    if not args.config and not args.data:
        raise InputError("train: give a CONFIG (e.g. demo, la2d-supervised, a YAML file) or --data DIR")
    if args.config:
        cfg = load_config(args.config, args.overrides)
        return cfg, Path(args.out or Path("runs") / Path(args.config).name.removesuffix(".yaml"))
    out = Path(args.out or Path("runs") / Path(args.data).resolve().name)
    cfg, lines = _plan(args, out / "config.yaml")
    print("\n".join(lines), file=sys.stderr, flush=True)
    return cfg, out


def bench_protocol(args) -> str:
    """`bench --protocol`'s argument: the protocol named, or one planned for --data, written into --out as
    <DIR name>.yaml (the plan as its base, the shipped protocol's per-method settings, its labelled count as the
    default fraction)."""
    from ..bench.protocols import load_protocol
    from ..data.plan import PROTOCOL_FOR

    check_data_options(args, other=args.protocol, what="--protocol")
    if args.data and args.train_data:
        raise InputError("bench: --data plans the training folder; --train-data names one for a protocol: give one")
    if not args.data:
        if not args.protocol:
            raise InputError("bench: give --protocol NAME or --data DIR")
        return args.protocol
    cfg, lines = _plan(argparse.Namespace(**{**vars(args), "overrides": []}), None, method_settings=False)
    shipped = load_protocol(PROTOCOL_FOR[cfg["data"]["dims"]])
    cfg.pop("method")
    protocol = {"description": f"planned for {cfg['data']['root']} from the {shipped.name} protocol", **cfg,
                "bench": {"fractions": [cfg["split"]["labelled"]]}, "methods": shipped.methods}
    path = Path(args.out) / f"{Path(cfg['data']['root']).name}.yaml"
    print("\n".join(lines[:-1]), file=sys.stderr, flush=True)  # the method line: each method has its own
    if path.exists() and yaml.safe_load(path.read_text()) != protocol:
        raise InputError(f"{path}: a different plan is there already (the data changed?); use another --out")
    if not path.exists():
        write_config(protocol, path, lines[:-1])
    return str(path)
