"""Post-processing cost of one member at full resolution with a perfect model.

The indicator is the true complete skull (-1 inside, +1 outside) and the "generated" points are
Poisson-disk points on the true implant's surface, so the masks have the sizes a good model gives
(an untrained model's points and indicator fill the whole grid, which makes the distance filter
far slower than in real use). Times :func:`scripts.implant.complete_from_indicator` and
:func:`scripts.implant.implant_from_complete`, the per-member work of ``ImplantGenerator``.

    python -m scripts.benchmark_postprocessing --size 512 --defect bilateral --num_points 3072
"""

from __future__ import annotations

import time

import fire
import numpy as np

from scripts.data.points import mask_to_surface_points
from scripts.data.synthetic import skullbreak_case
from scripts.implant import complete_from_indicator, implant_from_complete
from scripts.metrics import dice


def main(size: int = 512, defect: str = "bilateral", num_points: int = 3072, dilate: int = 1,
         max_distance_vox: float = 10.0, seed: int = 1000) -> dict:
    """Print (markdown) and return the timings (s) on one synthetic case."""
    case = skullbreak_case(0, size=size, seed=seed)
    defective, implant = case.defect(defect)
    indicator = np.where(defective | implant, -1.0, 1.0).astype(np.float32)
    points = mask_to_surface_points(implant, num_points, seed=seed)
    start = time.perf_counter()
    complete = complete_from_indicator(indicator, dilate)
    t_complete = time.perf_counter() - start
    start = time.perf_counter()
    result = implant_from_complete(complete, defective, points, max_distance_vox)
    t_implant = time.perf_counter() - start
    row = {"size": size, "defect": defect, "points": num_points, "dilate": dilate,
           "raw_implant_voxels": int((complete & ~defective).sum()), "implant_voxels": int(result.sum()),
           "dsc_to_truth": round(dice(result, implant), 3), "complete_s": round(t_complete, 2),
           "implant_s": round(t_implant, 2)}
    print("| " + " | ".join(row) + " |\n|" + "---|" * len(row) + "\n| " + " | ".join(map(str, row.values())) + " |")
    return row


if __name__ == "__main__":
    fire.Fire(main)
