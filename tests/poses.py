"""Heads moved in known ways, for the canonical-frame tests."""

import numpy as np
from monai.data import MetaTensor

from scripts.frame import to_canonical


def moved(img: MetaTensor, linear: np.ndarray) -> np.ndarray:
    """The head of a cube mask ``img`` (1, S, S, S) moved by ``linear`` (3, 3: a rotation, a scaling) about the
    volume's centre, in the same field of view -> bool (S, S, S)."""
    affine = img.affine.numpy()
    centre = affine[:3, :3] @ ((np.asarray(img.shape[1:]) - 1) / 2) + affine[:3, 3]
    grid = np.eye(4)
    grid[:3, :3] = np.linalg.inv(linear) @ affine[:3, :3]
    grid[:3, 3] = np.linalg.inv(linear) @ (affine[:3, 3] - centre) + centre
    return np.asarray(to_canonical(img, grid, img.shape[1])[0]) > 0
