"""Seconds per training step of SuperDiffusion's co-training variants beside the supervised step, at la2d's shapes
(96x96, 16 labelled + 8 or 16 unlabelled slices, 2 threads, one process): what each cost lever buys.

    python benchmarks/superdiffusion_cost.py [variant ...]

Mean over 12 steps after 3 warm-up steps (a teacher that learns on every k-th step makes the steps uneven, so the
mean, not the median, is the cost per step). Run it on idle cores: a second process halves every number.
"""

from __future__ import annotations

import statistics
import sys

import torch

from superdiffusion.bench.speed import train_row

LA2D = ["superdiffusion.rounds=0", "superdiffusion.round_images=4", "superdiffusion.teacher_every=2",
        "superdiffusion.teacher_width=0.5"]
FULL = ["superdiffusion.teacher_every=1", "superdiffusion.teacher_width=1.0", "superdiffusion.round_images=null"]
NEVER = ["superdiffusion.teacher_every=1000"]  # after the warm-up steps the teacher no longer learns
# name -> (method, overrides, unlabelled slices per step)
VARIANTS: dict[str, tuple[str, list[str], int]] = {
    "supervised": ("supervised", [], 16),
    "pretrain (cycle), full teacher": ("pretrain", ["superdiffusion.teacher_width=1.0"], 16),
    "pretrain (cycle), half-width teacher": ("pretrain", ["superdiffusion.teacher_width=0.5"], 16),
    "co-training R=3, every step, full teacher": ("cotrain", [*FULL, "superdiffusion.rounds=3"], 16),
    "co-training R=0, every step, full teacher": ("cotrain", [*FULL, "superdiffusion.rounds=0"], 16),
    "la2d with R=3 rounds (the 2026-12-02 la2d)": ("cotrain", [*LA2D, "superdiffusion.rounds=3"], 8),
    "la2d with R=1 round": ("cotrain", [*LA2D, "superdiffusion.rounds=1"], 8),
    "la2d with R=3, 16 unlabelled slices (the 2026-12-02 la2d)": ("cotrain", [*LA2D, "superdiffusion.rounds=3"], 16),
    "la2d (8 unlabelled slices, teacher learning on every 2nd step)": ("cotrain", LA2D, 8),
    "  8 unlabelled, steps where the teacher learns": ("cotrain", [*LA2D, "superdiffusion.teacher_every=1"], 8),
    "  8 unlabelled, other steps": ("cotrain", [*LA2D, *NEVER], 8),
    "la2d, teacher learning on every 4th step": ("cotrain", [*LA2D, "superdiffusion.teacher_every=4"], 8),
    "la2d without the photometric view": ("cotrain", [*LA2D, "superdiffusion.unlabelled_view=same"], 8),
    "la2d without the EMA student": ("cotrain", [*LA2D, "superdiffusion.ema=0"], 8),
}


def main(names: list[str]) -> None:
    torch.set_num_threads(2)
    for name in names or list(VARIANTS):
        method, extra, unlabelled = VARIANTS[name]
        spec = dict(device="cpu", variant={}, shape=[96, 96], batch=(16, unlabelled), config="la2d-superdiffusion",
                    overrides=[], row_overrides=extra, method=method, warmup=3, repeats=12)
        row = train_row(spec)
        print(f"{name:75s} {statistics.mean(row['runs']):.3f} s/step", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
