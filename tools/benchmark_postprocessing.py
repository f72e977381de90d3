"""Post-processing cost at full resolution with a perfect model: indicators -> implants and ensemble.

The indicator is the true complete skull (-1 inside, +1 outside) and each member's "generated" points
are Poisson-disk points on the true implant's surface (one seed per member), so the masks have the
sizes a good model gives (an untrained model's points and indicator fill the whole grid, which makes
the distance filter far slower than in real use). Times
:func:`scripts.implant.postprocess_ensemble`, the post-processing step of ``ImplantGenerator``.

    python -m tools.benchmark_postprocessing --size 512 --defect bilateral --num_points 3072 --members 1,5
"""

from __future__ import annotations

import time

import fire
import numpy as np

from tools.benchmark_pipeline import markdown_table
from scripts.data.points import mask_to_surface_points
from scripts.data.synthetic import skullbreak_case
from scripts.implant import postprocess_ensemble
from scripts.metrics import dice


def main(size: int = 512, defect: str = "bilateral", num_points: int = 3072, members: str | int | tuple = "1,5",
         dilate: int = 1, max_distance_vox: float = 10.0, seed: int = 1000) -> None:
    """Print a markdown table: one row of timings (s) per ensemble size, on one synthetic case."""
    sizes = [int(k) for k in (members.split(",") if isinstance(members, str) else np.atleast_1d(members))]
    case = skullbreak_case(0, size=size, seed=seed)
    defective, implant = case.defect(defect)
    indicator = np.where(defective | implant, -1.0, 1.0).astype(np.float32)
    points = np.stack([mask_to_surface_points(implant, num_points, seed=seed + k) for k in range(max(sizes))])
    rows = []
    for k in sizes:
        start = time.perf_counter()
        out = postprocess_ensemble(np.broadcast_to(indicator, (k, *indicator.shape)), defective, points[:k], dilate,
                                   max_distance_vox)
        rows.append({"size": size, "defect": defect, "points": num_points, "members": k, "dilate": dilate,
                     "implant_voxels": int(out["implant_mean"].sum()),
                     "dsc_to_truth": round(dice(out["implant_mean"], implant), 3),
                     "postprocessing_s": round(time.perf_counter() - start, 2)})
    print(markdown_table(rows))


if __name__ == "__main__":
    fire.Fire(main)
