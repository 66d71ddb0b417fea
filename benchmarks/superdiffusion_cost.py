"""Seconds per training step of SuperDiffusion's co-training variants beside the supervised step, at la2d's shapes
(96x96, 16 labelled + 16 unlabelled slices, 2 threads, one process): what each cost lever buys.

    python benchmarks/superdiffusion_cost.py [variant ...]

Mean over 12 steps after 3 warm-up steps (a teacher that learns on every k-th step makes the steps uneven, so the
mean, not the median, is the cost per step). Run it on idle cores: a second process halves every number.
"""

from __future__ import annotations

import statistics
import sys

import torch

from superdiffusion.bench.speed import train_row

LA2D = ["superdiffusion.rounds=3", "superdiffusion.round_images=4", "superdiffusion.teacher_every=2",
        "superdiffusion.teacher_width=0.5"]
FULL = ["superdiffusion.teacher_every=1", "superdiffusion.teacher_width=1.0", "superdiffusion.round_images=null"]
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "supervised": ("supervised", []),
    "pretrain (cycle), full teacher": ("pretrain", ["superdiffusion.teacher_width=1.0"]),
    "pretrain (cycle), half-width teacher": ("pretrain", ["superdiffusion.teacher_width=0.5"]),
    "co-training R=3, every step, full teacher": ("cotrain", [*FULL, "superdiffusion.rounds=3"]),
    "co-training R=0, every step, full teacher": ("cotrain", [*FULL, "superdiffusion.rounds=0"]),
    "co-training as la2d (R=3 on 4 images, half-width teacher every 2nd step)": ("cotrain", LA2D),
    "la2d, teacher at quarter width learning every step": ("cotrain", [*LA2D, "superdiffusion.teacher_every=1",
                                                                        "superdiffusion.teacher_width=0.25"]),
    "la2d, teacher learning every 8th step (session 7's la2d)": ("cotrain", [*LA2D, "superdiffusion.teacher_every=8"]),
    "la2d without the photometric view": ("cotrain", [*LA2D, "superdiffusion.unlabelled_view=same"]),
    "la2d without the EMA student": ("cotrain", [*LA2D, "superdiffusion.ema=0"]),
}


def main(names: list[str]) -> None:
    torch.set_num_threads(2)
    for name in names or list(VARIANTS):
        method, extra = VARIANTS[name]
        spec = dict(device="cpu", variant={}, shape=[96, 96], batch=(16, 16), config="la2d-superdiffusion",
                    overrides=[], row_overrides=extra, method=method, warmup=3, repeats=12)
        row = train_row(spec)
        print(f"{name:75s} {statistics.mean(row['runs']):.3f} s/step", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
