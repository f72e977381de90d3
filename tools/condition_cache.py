"""An :class:`~scripts.generator.ImplantGenerator` whose condition points can be computed ahead.

The GPU image has no Open3D (its wheel is about 100 MB, over what travels to the device machine),
so the Poisson-disk condition points are drawn on a machine with it and read back there.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from scripts.generator import ImplantGenerator


class CachedConditionGenerator(ImplantGenerator):
    """:class:`ImplantGenerator` that reads its condition points from ``condition_cache`` (.npz).

    Entries are keyed by a digest of the defective mask and the sampling settings (seed,
    ``num_condition``, ``surface_points``, ``num_samples``); a missing entry is computed as usual
    (Open3D) and added.
    Everything else, diffusion to post-processing, is the bundle's own code.
    """

    def __init__(self, *args, condition_cache: str | os.PathLike, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.condition_cache = Path(condition_cache)

    def condition_points(self, defective: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Defective mask (X, Y, Z) -> the members' skull points and conditions (K, Nc, 3) voxel coords, from the
        cache if it holds them."""
        settings = repr((defective.shape, self.seed, self.num_condition, self.num_mirror, self.surface_points,
                         self.num_samples)).encode()
        key = hashlib.sha256(np.packbits(defective).tobytes() + settings).hexdigest()
        cache = dict(np.load(self.condition_cache)) if self.condition_cache.is_file() else {}
        if key + "_skull" not in cache:
            cache[key + "_skull"], cache[key + "_condition"] = super().condition_points(defective)
            self.condition_cache.parent.mkdir(parents=True, exist_ok=True)
            np.savez(self.condition_cache, **cache)
        return cache[key + "_skull"], cache[key + "_condition"]
