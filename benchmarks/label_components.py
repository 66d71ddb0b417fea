"""How much of a dataset's ground truth a largest-connected-component step would erase, per slice and per volume.

Why: BCP reduces each pseudo-label image to its largest connected component (their LargestCC), right where an
object is one piece per image. On 2D slices of 3D volumes it need not be (LA's axial slices cut the atrium's
pulmonary veins into separate pieces); `bcp.largest_component` switches the step. Labels only; nothing trains.

    python benchmarks/label_components.py --format la --root ../shared/data/LA --list train.list --slice-axis 2
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from superdiffusion.data.readers import discover, load_case
from superdiffusion.methods.baselines import largest_components


def outside_largest(masks: np.ndarray) -> np.ndarray:
    """Per image of a stack of binary masks, the foreground pixels outside its largest component (BCP's own step)."""
    stack = torch.from_numpy(masks.astype(np.int64))
    return (stack - largest_components(stack)).flatten(1).sum(1).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--format", default="la")
    parser.add_argument("--root", required=True)
    parser.add_argument("--list", default=None)
    parser.add_argument("--slice-axis", type=int, default=2, help="spatial axis the 2D slices are cut along")
    args = parser.parse_args()
    refs = discover(args.format, args.root, args.list)
    slices = split = foreground = lost_2d = lost_3d = 0
    for ref in refs:
        label = load_case(ref).label > 0
        foreground += int(label.sum())
        lost_3d += int(outside_largest(label[None])[0])
        stack = np.moveaxis(label, args.slice_axis, 0)
        lost = outside_largest(stack)
        slices += int(stack.any(axis=(1, 2)).sum())
        split += int((lost > 0).sum())
        lost_2d += int(lost.sum())
    print(f"{len(refs)} cases, {slices} slices with foreground; {split} of them ({split / slices:.1%}) in more "
          f"than one piece; foreground outside each slice's largest piece: {lost_2d / foreground:.2%}, outside each "
          f"volume's: {lost_3d / foreground:.3%}")


if __name__ == "__main__":
    main()
