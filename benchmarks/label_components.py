"""How much of a dataset's ground truth a largest-connected-component step would erase, per slice and per volume.

Why: BCP reduces each pseudo-label image to its largest connected component (their LargestCC), right where an
object is one piece per image. On 2D slices of 3D volumes it need not be (LA's axial slices cut the atrium's
pulmonary veins into separate pieces); `bcp.largest_component` switches the step. Labels only; nothing trains.

    python benchmarks/label_components.py --format la --root ../shared/data/LA --list train.list --slice-axis 2
"""

from __future__ import annotations

import argparse

import numpy as np
from scipy import ndimage

from superdiffusion.data.readers import discover, load_case


def outside_largest(mask: np.ndarray) -> int:
    """Foreground pixels outside the mask's largest component (full connectivity, as skimage's label default)."""
    components, n = ndimage.label(mask, structure=np.ones((3,) * mask.ndim))
    if n < 2:
        return 0
    sizes = np.bincount(components.ravel())[1:]
    return int(sizes.sum() - sizes.max())


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
        lost_3d += outside_largest(label)
        for mask in np.moveaxis(label, args.slice_axis, 0):
            if mask.any():
                slices += 1
                lost = outside_largest(mask)
                split += lost > 0
                lost_2d += lost
    print(f"{len(refs)} cases, {slices} slices with foreground; {split} of them ({split / slices:.1%}) in more "
          f"than one piece; foreground outside each slice's largest piece: {lost_2d / foreground:.2%}, outside each "
          f"volume's: {lost_3d / foreground:.3%}")


if __name__ == "__main__":
    main()
