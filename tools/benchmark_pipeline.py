"""End-to-end cost of one case: load -> surface points -> diffusion -> voxelization -> post-processing.

Runs each setting in a fresh subprocess and reports wall time per stage and peak resident memory.
Untrained (randomly initialised) networks are fine for timing; pass weights to time real ones.

    python -m tools.benchmark_pipeline --preset paper --size 512 --sampler ddim --steps 50 --num_samples 1,5
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import fire

ROOT = Path(__file__).resolve().parents[1]


def _one(preset: str, mask: str, sampler: str, steps: int, num_samples: int, threads: int, seed: int,
         denoiser_weights: str | None, voxelizer_weights: str | None) -> dict:
    """Time one setting in this process: configs/inference.json's generator (its priors, margin and sampler
    settings) for ``preset``, with untrained networks unless weights are given; returns the stage timings (s)
    and peak RSS (GiB)."""
    import numpy as np
    import torch
    from monai.bundle import ConfigParser

    from scripts.frame import MODEL_GRIDS, CanonicalFramed
    from scripts.io import load_mask

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "inference.json"))
    parser.update({"bundle_root": str(ROOT), "preset": preset, "sampler": sampler, "steps": steps,
                   "num_samples": num_samples, "seed": seed, "progress": False, "device": "$torch.device('cpu')"})
    # given weights load through the config's recipe check; without them, its untrained network definitions
    for network, weights, untrained in (("denoiser", denoiser_weights, "@network_def"),
                                        ("voxelizer", voxelizer_weights, "@voxelizer_def")):
        parser.update({f"{network}_weights": weights} if weights else {network: untrained})
    generator = parser.get_parsed_content("inferer")
    start = time.perf_counter()
    img = load_mask(mask)
    grid, spacing = MODEL_GRIDS[preset]  # the skull in its canonical cube, as configs/inference.json puts it
    cube = np.asarray(CanonicalFramed("image", grid, spacing, generator.margin, seed)({"image": img})["image"][0]) > 0
    load = time.perf_counter() - start
    result = generator(cube)
    total = time.perf_counter() - start
    return {
        "preset": preset, "shape": list(img.shape[1:]), "sampler": sampler, "steps": steps,
        "num_samples": num_samples, "threads": threads, "load_s": round(load, 2),
        **{f"{k}_s": round(v, 2) for k, v in result["timings"].items()}, "total_s": round(total, 2),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    }


def markdown_table(rows: list[dict]) -> str:
    """Rows with the same keys -> a markdown table, the keys as its header."""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    return "\n".join(lines + ["| " + " | ".join(str(row[k]) for k in keys) + " |" for row in rows])


def _make_case(size: int, seed: int, folder: str) -> str:
    from scripts.data.synthetic import skullbreak_case
    from scripts.io import save_mask

    case = skullbreak_case(0, size=size, seed=seed)
    defective, _ = case.defect("bilateral")
    return str(save_mask(Path(folder) / f"bench_{size}.nrrd", defective, case.affine, overwrite=True))


def main(preset: str = "paper", size: int = 512, sampler: str = "ddim", steps: int = 50,
         num_samples: str | int | tuple = "1,5", threads: int = 2, seed: int = 0, mask: str | None = None,
         denoiser_weights: str | None = None, voxelizer_weights: str | None = None) -> None:
    """Print one markdown table row per ensemble size (each in a fresh subprocess)."""
    sizes = [int(n) for n in (num_samples.split(",") if isinstance(num_samples, str) else
                              (num_samples if isinstance(num_samples, tuple) else [num_samples]))]
    with tempfile.TemporaryDirectory() as tmp:
        mask = mask or _make_case(size, 1000, tmp)
        rows = []
        for n in sizes:
            args = [preset, mask, sampler, steps, n, threads, seed, denoiser_weights, voxelizer_weights]
            code = f"import json, sys; from tools.benchmark_pipeline import _one; print(json.dumps(_one(*{args!r})))"
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(markdown_table(rows))


if __name__ == "__main__":
    fire.Fire(main)
