"""`superdiffusion` command line: train, evaluate, predict, demo.

Every user error is one `error: ...` line on stderr and exit status 2, raised before long work starts.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import InputError

EPILOG = "Configs shipped with the package can be named without a path, e.g. `superdiffusion train demo`."


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="superdiffusion", description=__doc__.splitlines()[0], epilog=EPILOG)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train a method from a YAML config into a run folder",
                       description="Train cfg.method (supervised, superdiffusion, ...) and evaluate it on the "
                                   "validation split carved from the training cases.")
    t.add_argument("config", help="YAML config file, or the name of a shipped config (demo, la2d-supervised, ...)")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.steps=200 --set data.root=/data/LA "
                        "(repeatable; values are parsed as YAML)")
    t.add_argument("--out", help="run folder (default: runs/<config name>); must be new unless --resume")
    t.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint (the config must be the same)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar (logs still go to log.jsonl)")

    e = sub.add_parser("evaluate", help="metrics of a run on labelled cases, or of mask files against mask files",
                       description="Either RUN --data DIR [--list FILE] (predict then score), or --pred DIR --gt "
                                   "DIR (score mask files). Writes per-case and mean dice, jaccard, hd95, asd "
                                   "as JSON; distances in the images' voxel spacing units.")
    e.add_argument("run", nargs="?", help="run folder made by `superdiffusion train`")
    e.add_argument("--data", help="dataset folder to evaluate RUN on (format as in the run's config)")
    e.add_argument("--list", help="list file of case ids in --data (default: every case)")
    e.add_argument("--format", help="dataset format of --data if different from the run's (la, volumes, folders, "
                                    "glas, ph2)")
    e.add_argument("--pred", help="folder of predicted mask files (matched to --gt by file name)")
    e.add_argument("--gt", help="folder of ground-truth mask files")
    e.add_argument("--num-classes", type=int, default=None, help="K for --pred/--gt (default 2)")
    e.add_argument("--checkpoint", choices=["best", "last"], help="checkpoint of RUN (default: the run's choice)")
    e.add_argument("--predictor", help="student or teacher (default: the run's choice on validation)")
    e.add_argument("--out", help="write the JSON here (default: print it)")

    pr = sub.add_parser("predict", help="segment images with a trained run",
                        description="Writes one mask per input, in the input's own format (h5, nii.gz, nrrd, "
                                    "png/bmp), at the input's resolution.")
    pr.add_argument("run", help="run folder made by `superdiffusion train`")
    pr.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders of image files")
    pr.add_argument("--out", required=True, help="output folder (existing mask files are never overwritten)")
    pr.add_argument("--checkpoint", choices=["best", "last"], help="default: the run's choice")
    pr.add_argument("--predictor", help="student or teacher (default: the run's choice on validation)")

    d = sub.add_parser("demo", help="the main job on built-in synthetic data, with a result table",
                       description="Trains on the built-in synthetic data and prints validation metrics.")
    d.add_argument("--out", default="demo-run", help="folder for the demo's runs (default: demo-run)")
    d.add_argument("--steps", type=int, help="override the training steps (quick look)")
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; resume with --resume", file=sys.stderr)
        return 130


def cmd_train(args) -> int:
    from ..config import load_config
    from ..engine.run import mean_table, train_run
    from ..engine.trainer import NonFiniteLossError

    cfg = load_config(args.config, args.overrides)
    out = Path(args.out or Path("runs") / Path(args.config).name.removesuffix(".yaml"))
    try:
        results = train_run(cfg, out, resume=args.resume, progress=not args.no_progress)
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if "val" in results:
        print(json.dumps({"run": str(out), "predictor": results["predictor"], **mean_table(results)}))
    return 0


def cmd_evaluate(args) -> int:
    from ..evaluation.evaluate import evaluate_folders, evaluate_run

    if args.pred or args.gt:
        if not (args.pred and args.gt) or args.run:
            raise InputError("evaluate: give either RUN --data DIR, or both --pred DIR and --gt DIR")
        report = evaluate_folders(args.pred, args.gt, num_classes=args.num_classes or 2)
    else:
        if not (args.run and args.data):
            raise InputError("evaluate: give either RUN --data DIR, or both --pred DIR and --gt DIR")
        report = evaluate_run(args.run, args.data, args.list, fmt=args.format, checkpoint=args.checkpoint,
                              predictor=args.predictor)
    text = json.dumps(report, indent=1)
    if args.out:
        Path(args.out).write_text(text)
    print(json.dumps(report["mean"]) if args.out else text)
    return 0


def cmd_predict(args) -> int:
    from ..evaluation.evaluate import predict_files

    for path in predict_files(args.run, args.inputs, args.out, checkpoint=args.checkpoint,
                              predictor=args.predictor):
        print(path)
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(Path(args.out), steps=args.steps, progress=not args.no_progress)
    return 0


COMMANDS = {"train": cmd_train, "evaluate": cmd_evaluate, "predict": cmd_predict, "demo": cmd_demo}
