"""The uncertainty calibration benchmark's scores (tools/calibration.py) on ensembles whose errors are known."""

import numpy as np
import pytest

from tools.calibration import score_case, summarize

SHAPE = (40, 40, 40)


def ball(radius: float, centre=(19.5, 19.5, 19.5)) -> np.ndarray:
    return np.linalg.norm(np.indices(SHAPE).T - np.asarray(centre), axis=-1).T <= radius


def test_members_that_disagree_where_the_vote_is_wrong_score_well():
    """Members of radius 7-13 around a true ball of radius 10.5: they agree in the core and outside, disagree on
    the shell where the vote can be wrong, so the variance flags every wrong voxel and ranks them first."""
    truth = ball(10.5)
    members = np.stack([ball(r) for r in (7.0, 8.0, 9.0, 10.0, 12.0)])  # the vote (3 of 5) is the radius-9 ball
    scores = score_case(members, truth, voxel_ml=0.001)
    assert scores["flagged_share"] == 1.0 and scores["auroc"] > 0.7
    assert scores["wrong_ml"] == pytest.approx(((truth != ball(9.0)).sum()) * 0.001)
    assert 0 < scores["expected_wrong_ml"] and 0 <= scores["ece"] < 0.5
    assert sum(scores["bins"]["count"]) == (members.any(axis=0) | truth).sum()


def test_members_that_agree_on_a_wrong_implant_flag_nothing():
    """Identical members that miss part of the truth: nothing is flagged, and p (0 or 1) is as miscalibrated as
    the error is large."""
    truth = ball(10.0)
    members = np.stack([ball(10.0, centre=(23.5, 19.5, 19.5))] * 3)
    scores = score_case(members, truth, voxel_ml=0.001)
    wrong_share = scores["wrong_ml"] / ((members[0] | truth).sum() * 0.001)
    assert scores["flagged_share"] == 0.0 and scores["expected_wrong_ml"] == 0.0
    assert scores["ece"] == pytest.approx(wrong_share, abs=1e-6)


def test_summary_correlates_expected_with_true_error_across_cases():
    """The vote (2 of 3 members) misses a shell that widens with the members' spread: the expected wrong volume
    rises with the true one, and every wrong voxel is flagged."""
    truth = ball(10.5)
    rows = [score_case(np.stack([ball(10.5 - d), ball(10.5 - d / 2), ball(10.5 + d)]), truth, 0.001)
            for d in (1, 2, 3, 4)]
    assert np.all(np.diff([r["wrong_ml"] for r in rows]) > 0)
    summary = summarize(rows)
    assert summary["cases"] == 4 and summary["flagged_share"] == 1.0
    assert summary["spearman_wrong_ml"] == pytest.approx(1.0)
