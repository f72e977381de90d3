"""Draw docs/images/pipeline.png: the four stages of the method on the shipped synthetic sample.

The "generated" points and the complete skull shown are the sample's ground truth (an illustration
of what each stage produces, not a model output).

    python -m tools.pipeline_figure --out docs/images/pipeline.png
"""

from __future__ import annotations

import fire
import numpy as np
from matplotlib.figure import Figure

from scripts.data.points import mask_to_surface_points
from scripts.io import atomic_write, load_mask
from scripts.outputs import depth_view


def _render(mask: np.ndarray) -> np.ndarray:
    """Depth-shaded view of a (X, Y, Z) mask seen from the right (+i), as (Z, Y) grey levels."""
    hit, depth = depth_view(mask, 0)
    return np.where(hit, 0.25 + 0.75 * depth, 1.0).T


def main(defective: str = "sample/defective_skull.nrrd", implant: str = "sample/implant_ground_truth.nrrd",
         out: str = "docs/images/pipeline.png") -> str:
    skull = np.asarray(load_mask(defective)[0]) > 0
    truth = np.asarray(load_mask(implant)[0]) > 0
    cond = mask_to_surface_points(skull, 2688, seed=0, init_factor=2)
    gen = mask_to_surface_points(truth, 384, seed=0, init_factor=2)

    fig = Figure(figsize=(16, 4.2), dpi=100, layout="constrained")
    axes = fig.subplots(1, 4)
    axes[0].imshow(_render(skull), cmap="gray", origin="lower", vmin=0, vmax=1)
    axes[0].set_title("1. defective skull mask\n(marching cubes + Poisson-disk points)")
    axes[1].scatter(cond[:, 1], cond[:, 2], s=0.5, c="0.55", label="known points (fixed)")
    axes[1].scatter(gen[:, 1], gen[:, 2], s=2, c="tab:orange", label="generated points")
    axes[1].set_aspect("equal")
    axes[1].legend(loc="lower right", markerscale=6, fontsize=8)
    axes[1].set_title("2. conditional point diffusion\n(PVCNN2 denoiser, DDPM / DDIM / DPM-Solver++)")
    axes[2].imshow(_render(skull | truth), cmap="gray", origin="lower", vmin=0, vmax=1)
    axes[2].set_title("3. Shape-as-Points + Poisson solver\n-> complete skull mask")
    rgb = np.repeat(_render(skull)[..., None], 3, axis=2)
    rgb[_render(truth) < 1.0] = (0.95, 0.45, 0.1)
    axes[3].imshow(rgb, origin="lower")
    axes[3].set_title("4. implant = complete - defective\n(cleaned; ensemble mean + variance)")
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    return str(atomic_write(out, lambda tmp: fig.savefig(tmp, format="png"), overwrite=True))


if __name__ == "__main__":
    fire.Fire(main)
