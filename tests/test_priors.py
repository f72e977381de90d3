"""Merging a prior's estimate of the missing bone into a sample (scripts/priors.py), on constructed point
sets: a sample with two caps of implant points and a mirror-like estimate that covers one of them."""

import numpy as np

from scripts.priors import merge_prior_points


def _cap(direction, radius, n, rng, spread=0.1):
    """n points at ``radius`` around unit ``direction`` (angular spread ~``spread`` rad)."""
    d = np.asarray(direction, float) / np.linalg.norm(direction) + rng.normal(0.0, spread, (n, 3))
    return radius * d / np.linalg.norm(d, axis=1, keepdims=True)


def test_merge_replaces_only_the_directions_the_estimate_covers():
    rng = np.random.default_rng(0)
    left, top = _cap([1, 0, 0], 50.0, 100, rng), _cap([0, 0, 1], 50.0, 100, rng)
    generated = np.concatenate([left, top])
    # the mirror's missing bone on the left, 3 voxels further out than the sample, plus asymmetry far away
    mirror_left, elsewhere = _cap([1, 0, 0], 53.0, 300, rng), _cap([0, -1, 0], 50.0, 50, rng)
    merged, fraction = merge_prior_points(generated, np.concatenate([mirror_left, elsewhere]), np.zeros(3),
                                          np.random.default_rng(1))
    assert merged.shape == generated.shape
    radius = np.linalg.norm(merged, axis=1)
    from_mirror = np.isclose(radius, 53.0)
    assert 0.4 < fraction == from_mirror.mean() <= 0.5  # the left cap (its ragged edge may stay)
    assert (merged[from_mirror, 0] > 30.0).all()  # only left points came from the mirror, none from elsewhere
    assert np.isin(top, merged).all(axis=1).all()  # the top cap, which the mirror does not cover, is kept


def test_merge_keeps_the_sample_when_the_estimate_covers_little():
    rng = np.random.default_rng(0)
    generated = _cap([0, 0, 1], 50.0, 200, rng)
    sliver = _cap([0.35, 0, 1], 50.0, 3, rng, spread=0.01)
    merged, fraction = merge_prior_points(generated, sliver, np.zeros(3), rng)
    assert fraction == 0.0 and merged is generated
    merged, fraction = merge_prior_points(generated, np.empty((0, 3)), np.zeros(3), rng)
    assert fraction == 0.0 and merged is generated
