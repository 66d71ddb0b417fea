"""`superdiffusion` command line: every command is listed by `superdiffusion --help`.

Every user error is one `error: ...` line on stderr and exit status 2, raised before long work starts.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import InputError
from .plan import add_data_options, add_plan_parser, bench_protocol, cmd_plan, train_config

THREADS_HELP = "torch CPU threads (default: the run's train.threads, else torch's one per core)"
EPILOG = "Configs shipped with the package can be named without a path, e.g. `superdiffusion train demo`."


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="superdiffusion", epilog=EPILOG)
    p.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train a method from a YAML config into a run folder",
                       description="Train cfg.method (supervised, superdiffusion, ...) and evaluate it on the "
                                   "validation split carved from the training cases.")
    t.add_argument("config", nargs="?",
                   help="YAML config file, or the name of a shipped config (demo, la2d-supervised, ...); or --data")
    add_data_options(t, data_help="dataset folder to plan the config for instead of CONFIG (nnU-Net's dataset.json + "
                                  "imagesTr/, images/ + labels/, ...; `superdiffusion plan` shows the plan)")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.steps=200 --set data.root=/data/LA "
                        "(repeatable; values are parsed as YAML)")
    t.add_argument("--out", help="run folder (default: runs/<config name>, or runs/<DIR name> with --data); must be "
                                 "new unless --resume")
    t.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint (the config must be the same)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar (logs still go to log.jsonl)")
    add_plan_parser(sub)

    e = sub.add_parser("evaluate", help="metrics of a run on labelled cases, or of mask files against mask files",
                       description="Either RUN --data DIR [--list FILE] (predict then score), or --pred DIR --gt "
                                   "DIR (score mask files). Writes per-case and mean dice, jaccard, hd95, asd "
                                   "as JSON; distances in the images' voxel spacing units.")
    e.add_argument("run", nargs="?", help="run folder made by `superdiffusion train`")
    e.add_argument("--data", help="dataset folder to evaluate RUN on (format as in the run's config)")
    e.add_argument("--list", help="list file of case ids in --data (default: every case)")
    e.add_argument("--format", help="dataset format of --data if different from the run's (la, volumes, folders, "
                                    "nnunet, glas, ph2)")
    e.add_argument("--pred", help="folder of predicted mask files (matched to --gt by file name)")
    e.add_argument("--gt", help="folder of ground-truth mask files")
    e.add_argument("--num-classes", type=int, default=None, help="K for --pred/--gt (default 2)")
    e.add_argument("--ignore-geometry", action="store_true",
                   help="score --pred/--gt masks whose spacing, direction or origin differ (refused by default)")
    e.add_argument("--checkpoint", choices=["best", "last"], help="checkpoint of RUN (default: the run's choice)")
    e.add_argument("--predictor", help="student or teacher (default: the run's choice on validation)")
    e.add_argument("--out", help="write the JSON here (default: print it)")
    e.add_argument("--threads", type=int, metavar="N", help=THREADS_HELP)

    pr = sub.add_parser("predict", help="segment images with a trained run",
                        description="Writes one mask per input, in the input's own format (h5, nii.gz, nrrd, "
                                    "png/bmp), at the input's resolution.")
    pr.add_argument("run", help="run folder made by `superdiffusion train`")
    pr.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders of image files")
    pr.add_argument("--out", required=True, help="output folder; cases whose requested outputs are there already are "
                    "skipped (missing extras are added), so an interrupted predict continues into the same folder; "
                    "a folder of another run's or setting's masks is refused (its .superdiffusion-predict.json)")
    pr.add_argument("--overwrite", action="store_true", help="redo (and replace) cases whose mask exists already")
    pr.add_argument("--save-probabilities", action="store_true",
                    help="also write <id>_probability: the foreground probability as a float map in the input's "
                         "format (.tif for 2D); with more classes <id>_probability_<k> per foreground class")
    pr.add_argument("--preview", action="store_true",
                    help="also write <id>_preview.png: the image with the mask's outline (for a volume, the slice "
                         "through the mask's largest cross-section along each axis, in the voxel spacing)")
    pr.add_argument("--no-progress", action="store_true", help="no progress bar")
    pr.add_argument("--threads", type=int, metavar="N", help=THREADS_HELP)
    pr.add_argument("--checkpoint", choices=["best", "last"], help="default: the run's choice")
    pr.add_argument("--predictor", help="student or teacher (default: the run's choice on validation)")
    pr.add_argument("--mode", choices=["fixed", "ddim", "ensemble"],
                    help="teacher inference: one pass at a fixed t with fixed noise (default, repeatable), k-step "
                         "DDIM, or the mean of an ensemble of n passes (needs --predictor teacher)")
    pr.add_argument("--ddim-steps", type=int, help="k for --mode ddim (default: the run's diffusion.ddim_steps)")
    pr.add_argument("--samples", type=int, help="n for --mode ensemble and --uncertainty (default diffusion.ensemble)")
    pr.add_argument("--noise-seed", type=int, help="seed of the teacher's noise (default diffusion.noise_seed)")
    pr.add_argument("--uncertainty", action="store_true",
                    help="also write <id>_uncertainty: the per-voxel std of the foreground probability over the "
                         "teacher's n samples (float map in the input's format; .tif for 2D)")

    d = sub.add_parser("demo", help="the main job on built-in synthetic data, with a result table",
                       description="Trains on the built-in synthetic data and prints validation metrics.")
    d.add_argument("--out", default="demo-run", help="folder for the demo's runs (default: demo-run)")
    d.add_argument("--steps", type=int, help="override the training steps (quick look)")
    d.add_argument("--no-progress", action="store_true", help="no progress bars")

    b = sub.add_parser("bench", help="benchmark methods x labelled fractions x seeds under a named protocol",
                       description="Runs every method at every labelled fraction and seed under a protocol, then "
                                   "writes results.csv (per case), summary.md (mean ± std over seeds, Wilcoxon "
                                   "tests vs superdiffusion), PNG plots and the run folders into --out. Re-running "
                                   "the same command skips finished runs and resumes interrupted ones.")
    b.add_argument("--protocol", metavar="NAME",
                   help="shipped protocol (la2d, la3d, la3d-full, synthetic) or a protocol YAML file; or --data")
    add_data_options(b, options=("dims",), data_help="dataset folder to plan a protocol for instead of --protocol "
                                                     "(written into --out as <DIR name>.yaml)")
    b.add_argument("--methods", metavar="A,B,...",
                   help="comma-separated methods (supervised, fully-supervised, mean-teacher, ua-mt, cps, bcp, "
                        "superdiffusion, ...); default: the protocol's list")
    b.add_argument("--fractions", metavar="F,...",
                   help="labelled fractions of the training pool, e.g. 0.1,0.2 (values >= 1 are case counts); "
                        "default: the protocol's")
    b.add_argument("--seeds", metavar="S,...",
                   help="seeds, e.g. 0,1,2; each sets both the training seed and the split seed "
                        "(default: the protocol's)")
    b.add_argument("--out", required=True, help="output folder (re-use it to resume a benchmark)")
    b.add_argument("--ablation", metavar="NAME[,NAME]",
                   help="also run the protocol's ablation variants as extra methods with their own table and "
                        "plot; la2d: recipe (the paper's own SuperDiffusion recipe), generative (the image pathway's "
                        "re-synthesis as the student's strong view), target, labeller, dropout (supervised without "
                        "the encoder dropout); synthetic: teacher, rounds")
    b.add_argument("--train-data", metavar="DIR", help="training dataset folder (default: the protocol's data.root)")
    b.add_argument("--train-list", metavar="FILE",
                   help="list of training case ids (default: the protocol's list with its data, every case "
                        "of --train-data otherwise)")
    b.add_argument("--test-data", metavar="DIR",
                   help="separate test set folder: every case is checked before training and every method is "
                        "evaluated on it (default: evaluate on the validation split carved from the training "
                        "cases, as summary.md then says)")
    b.add_argument("--test-list", metavar="FILE", help="list of test case ids in --test-data (default: all cases)")
    b.add_argument("--steps", type=int, metavar="N",
                   help="override every run's train.steps (and cap superdiffusion pre-training at N), "
                        "for quick looks")
    b.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a protocol config value for every run, e.g. --set train.threads=1 (repeatable)")
    b.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="train up to N runs at once in separate processes (e.g. several runs sharing one GPU, or "
                        "a many-core machine); each gets cores/N torch threads unless train.threads is set")
    b.add_argument("--report-only", action="store_true",
                   help="train nothing: write the tables and figures from the runs finished so far (for a "
                        "benchmark cut short; the missing cells read 'not run yet')")
    b.add_argument("--no-progress", action="store_true", help="no progress bars")

    r = sub.add_parser("report", help="one self-contained HTML report of a run or a bench folder",
                       description="Writes one HTML file (figures inline) that can be sent as it is: for a run, its "
                                   "protocol, split, validation metrics, learning curves and validation overlays; for "
                                   "a bench folder, its tables, statistics and figures.")
    r.add_argument("folder", metavar="DIR", help="a run folder (train) or a bench folder (bench)")
    r.add_argument("--out", required=True, help="the HTML file to write (never overwritten)")

    x = sub.add_parser("export", help="save a run's predictor as a TorchScript file that needs only PyTorch",
                       description="Writes the run's chosen predictor (or --predictor) as TorchScript: "
                                   "torch.jit.load(FILE)(image) maps a raw image tensor (C, *spatial) to an int64 "
                                   "label map, with normalisation, resampling, sliding window, softmax and argmax "
                                   "inside, giving the masks of `predict`. Metadata: meta.json and config.json "
                                   "extra files. The teacher exports as its fixed-t single pass.")
    x.add_argument("run", help="run folder made by `superdiffusion train`")
    x.add_argument("--out", required=True, help="artefact file to write (never overwritten), e.g. model.pt")
    x.add_argument("--checkpoint", choices=["best", "last"], help="default: the run's choice")
    x.add_argument("--predictor", help="student, teacher, ... (default: the run's choice on validation)")
    x.add_argument("--threads", type=int, metavar="N", help=THREADS_HELP)

    bs = sub.add_parser("bench-speed", help="training-step and inference speed and memory of every method",
                        description="Median seconds and peak memory of each method's training step (supervised, "
                                    "pretrain, CPS, SuperDiffusion R=0/3/5) and of teacher and student inference, "
                                    "2D at 128x128 batch 8+8 (the reference comparison) and 3D; ratios against the "
                                    "supervised step of the same run. Switches are measured against the plain run.")
    bs.add_argument("--config", help="config to benchmark for its dimensionality (default: la2d-superdiffusion and "
                                     "la3d-superdiffusion)")
    bs.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value (repeatable), e.g. --set model.channels=[8,16,32]")
    bs.add_argument("--dims", choices=["2", "3", "both"], default="both", help="which models (default both)")
    bs.add_argument("--profile", choices=["quick", "full"], default="quick",
                    help="quick (~3 min on 2 cores: 2D 128x128 8+8, 3D 32^3 2+2) or full (the config's 3D patch, "
                         "whole LA volumes, more repeats)")
    bs.add_argument("--repeats", type=int, help="timed runs per row (the median is reported)")
    bs.add_argument("--warmup", type=int, help="untimed runs before them")
    bs.add_argument("--reference-step", action="store_true",
                    help="only the 2D supervised, pre-training and R=3 co-training steps at 128x128 8+8 (the "
                         "comparison with the reference implementation)")
    bs.add_argument("--rows", metavar="A,B,...",
                    help="only these training rows, as printed (e.g. supervised,fixmatch), and no inference rows "
                         "unless `inference` is named; the plain MONAI UNet comparison always runs")
    bs.add_argument("--json", help="also write every measurement (single runs included) to this new JSON file")
    bs.add_argument("--compile", action="store_true", help="also measure with torch.compile'd U-Nets")
    bs.add_argument("--channels-last", action="store_true", help="also measure with channels-last memory format")
    bs.add_argument("--bf16", action="store_true", help="also measure with CPU bfloat16 autocast")
    bs.add_argument("--amp", action="store_true", help="also measure with CUDA bfloat16 autocast (GPU only)")
    bs.add_argument("--hold-memory", action="store_true",
                    help="also measure with glibc keeping freed memory for the next step (CPU; train.hold_memory)")
    bs.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available")
    bs.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    bs.add_argument("--in-process", action="store_true",
                    help="no fresh process per training row (faster start; memory figures less clean)")
    p.description = f"superdiffusion command line: {', '.join(sub.choices)}."  # every command, as added above
    return p


def package_version() -> str:
    """The installed distribution's version (the source tree's own when run uninstalled)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("superdiffusion")
    except PackageNotFoundError:
        from .. import __version__

        return __version__


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
    from ..checkpoint import CheckpointWriteError
    from ..engine import distributed
    from ..engine.run import mean_table, train_run
    from ..engine.trainer import NonFiniteLossError

    cfg, out = train_config(args)
    try:
        results = train_run(cfg, out, resume=args.resume, progress=not args.no_progress)
    except (NonFiniteLossError, CheckpointWriteError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        distributed.shutdown()
    if "val" in results:
        print(json.dumps({"run": str(out), "predictor": results["predictor"], **mean_table(results)}))
    return 0


def cmd_evaluate(args) -> int:
    from ..evaluation.evaluate import evaluate_folders, evaluate_run
    from ..outputs import check_output_file

    if args.out:  # a new file in a folder that can take it, checked before the metrics are computed (and lost)
        check_output_file(args.out)
    if args.pred or args.gt:
        if not (args.pred and args.gt) or args.run:
            raise InputError("evaluate: give either RUN --data DIR, or both --pred DIR and --gt DIR")
        report = evaluate_folders(args.pred, args.gt, num_classes=args.num_classes or 2,
                                  ignore_geometry=args.ignore_geometry)
    else:
        if not (args.run and args.data):
            raise InputError("evaluate: give either RUN --data DIR, or both --pred DIR and --gt DIR")
        report = evaluate_run(args.run, args.data, args.list, fmt=args.format, checkpoint=args.checkpoint,
                              predictor=args.predictor, threads=args.threads)
    text = json.dumps(report, indent=1)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    print(json.dumps(report["mean"]) if args.out else text)
    return 0


def cmd_predict(args) -> int:
    from ..evaluation.evaluate import predict_files

    for path in predict_files(args.run, args.inputs, args.out, checkpoint=args.checkpoint, predictor=args.predictor,
                              mode=args.mode, ddim_steps=args.ddim_steps, samples=args.samples,
                              noise_seed=args.noise_seed, uncertainty=args.uncertainty,
                              save_probabilities=args.save_probabilities, preview=args.preview,
                              overwrite=args.overwrite, progress=not args.no_progress, threads=args.threads,
                              log=lambda line: print(line, file=sys.stderr)):
        print(path)
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(Path(args.out), steps=args.steps, progress=not args.no_progress)
    return 0


def cmd_bench(args) -> int:
    from ..bench import run_bench

    try:
        bench = run_bench(bench_protocol(args), out=args.out, methods=args.methods, fractions=args.fractions,
                          seeds=args.seeds, ablation=args.ablation, train_data=args.train_data,
                          train_list=args.train_list, test_data=args.test_data, test_list=args.test_list,
                          steps=args.steps, overrides=args.overrides, progress=not args.no_progress,
                          jobs=args.jobs, train=not args.report_only)
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    for failure in bench.failures:
        print(f"error: {failure}", file=sys.stderr)
    return 1 if bench.failures else 0


def cmd_report(args) -> int:
    from ..bench.html import write_report

    print(write_report(args.folder, args.out))
    return 0


def cmd_export(args) -> int:
    from ..evaluation.export import export_run

    info = export_run(args.run, args.out, checkpoint=args.checkpoint, predictor=args.predictor,
                      threads=args.threads)
    print(json.dumps({k: info[k] for k in ("out", "method", "predictor", "net_dims", "num_classes")}))
    return 0


def cmd_bench_speed(args) -> int:
    from ..bench.speed import run_from_args

    return run_from_args(args)


COMMANDS = {"train": cmd_train, "plan": cmd_plan, "evaluate": cmd_evaluate, "predict": cmd_predict, "demo": cmd_demo,
            "bench": cmd_bench, "export": cmd_export, "bench-speed": cmd_bench_speed, "report": cmd_report}
