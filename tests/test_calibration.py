"""The uncertainty calibration benchmark's scores (tools/calibration.py) on ensembles whose errors are known."""

import numpy as np
import pytest
from scipy import ndimage
from scipy.special import ndtr

from scripts.implant import ensemble_mean_and_variance
from tools.calibration import REGION_VOXELS, score_case, summarize

SHAPE = (40, 40, 40)


def ball(radius: float, centre=(19.5, 19.5, 19.5)) -> np.ndarray:
    return np.linalg.norm(np.indices(SHAPE).T - np.asarray(centre), axis=-1).T <= radius


def scores_of(members: np.ndarray, truth: np.ndarray) -> dict:
    """score_case of binary members (K, X, Y, Z): their majority vote and their share p."""
    vote, probability, _ = ensemble_mean_and_variance(members)
    return score_case(probability, vote, truth, voxel_ml=0.001)


def region(vote: np.ndarray) -> np.ndarray:
    return ndimage.binary_dilation(vote, iterations=REGION_VOXELS)


def test_members_that_disagree_where_the_vote_is_wrong_score_well():
    """Members of radius 7-13 around a true ball of radius 10.5: they agree in the core and outside, disagree on
    the shell where the vote can be wrong, so the variance flags every wrong voxel and ranks them first."""
    truth = ball(10.5)
    members = np.stack([ball(r) for r in (7.0, 8.0, 9.0, 10.0, 12.0)])  # the vote (3 of 5) is the radius-9 ball
    scores = scores_of(members, truth)
    assert scores["flagged_share"] == 1.0 and scores["auroc"] > 0.7
    assert scores["wrong_ml"] == pytest.approx(((truth != ball(9.0)).sum()) * 0.001)
    assert 0 < scores["expected_wrong_ml"] and 0 <= scores["ece"] < 0.5
    assert sum(scores["bins"]["count"]) == region(ball(9.0)).sum()


def test_members_that_agree_on_a_wrong_implant_flag_nothing():
    """Identical members that miss part of the truth: nothing is flagged, and p (0 or 1) is as miscalibrated as
    the error is large."""
    truth = ball(10.0)
    members = np.stack([ball(10.0, centre=(23.5, 19.5, 19.5))] * 3)
    scores = scores_of(members, truth)
    near = region(members[0])
    wrong_share = (members[0] != truth)[near].mean()  # ECE is taken near the vote; the wrong volume everywhere
    assert scores["flagged_share"] == 0.0 and scores["expected_wrong_ml"] == 0.0
    assert scores["ece"] == pytest.approx(wrong_share, abs=1e-6)


def test_summary_correlates_expected_with_true_error_across_cases():
    """The vote (2 of 3 members) misses a shell that widens with the members' spread: the expected wrong volume
    rises with the true one, and every wrong voxel is flagged."""
    truth = ball(10.5)
    rows = [scores_of(np.stack([ball(10.5 - d), ball(10.5 - d / 2), ball(10.5 + d)]), truth) for d in (1, 2, 3, 4)]
    assert np.all(np.diff([r["wrong_ml"] for r in rows]) > 0)
    summary = summarize(rows)
    assert summary["cases"] == 4 and summary["flagged_share"] == 1.0
    assert summary["spearman_wrong_ml"] == pytest.approx(1.0)


def test_a_probability_soft_across_the_surface_is_better_calibrated_than_agreeing_members():
    """The vote is a ball of radius 9 around a true ball of radius 10.5; a probability that falls off across the
    vote's surface (a 1.5-voxel Gaussian edge at radius 10) flags the wrong shell, ranks it above the sure core,
    is better calibrated than members that all agree on the vote and expects about the wrong volume they miss."""
    truth, vote = ball(10.5), ball(9.0)
    distance = np.linalg.norm(np.indices(SHAPE).T - 19.5, axis=-1).T
    soft = ndtr((10.0 - distance) / 1.5).astype(np.float32)
    sure = score_case(vote.astype(np.float32), vote, truth, 0.001)
    unsure = score_case(soft, vote, truth, 0.001)
    assert sure["flagged_share"] == 0.0 and unsure["flagged_share"] == 1.0
    assert unsure["auroc"] > 0.9 and unsure["ece"] < sure["ece"]
    assert sure["expected_wrong_ml"] == 0 and unsure["expected_wrong_ml"] == pytest.approx(unsure["wrong_ml"], rel=0.2)
    assert unsure["dice_vote"] == sure["dice_vote"]  # the same vote
