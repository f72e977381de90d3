"""Optimal-transport pairing of noise and target points (scripts/diffusion/pairing.py)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from scripts.diffusion.pairing import ot_assignment, pair_noise
from scripts.diffusion.process import ConditionalDiffusion


def _cost(source, target, perm):
    return ((source[perm] - target) ** 2).sum()


def test_exact_assignment_is_the_brute_force_optimum():
    rng = np.random.default_rng(0)
    source, target = rng.normal(size=(6, 3)), rng.normal(size=(6, 3)) + 2.0
    perm = ot_assignment(source, target)
    best = min(_cost(source, target, np.array(p)) for p in itertools.permutations(range(6)))
    assert sorted(perm) == list(range(6))
    assert _cost(source, target, perm) == pytest.approx(best)


def test_cellwise_approximation_is_a_permutation_close_to_the_optimum():
    rng = np.random.default_rng(1)
    source = rng.normal(size=(512, 3))
    target = rng.normal(size=(512, 3)) * [0.6, 0.4, 0.05] + 2.0  # a flat, implant-like patch
    exact, approx = ot_assignment(source, target, exact_limit=512), ot_assignment(source, target, exact_limit=64)
    assert sorted(approx) == list(range(512))
    random_cost = _cost(source, target, np.arange(512))
    assert _cost(source, target, exact) <= _cost(source, target, approx) < 1.01 * _cost(source, target, exact)
    assert _cost(source, target, approx) < 0.95 * random_cost


def test_ot_pairing_sends_each_noise_point_to_its_nearest_target_in_a_shifted_copy():
    """Target = noise shifted and scaled: the optimal pairing is the identity, whatever the order."""
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(2, 3, 50, generator=g)
    shuffle = torch.randperm(50, generator=g)
    target = 0.3 * noise + 5.0
    torch.testing.assert_close(pair_noise(noise[:, :, shuffle], target, "ot"), noise)
    assert torch.equal(pair_noise(noise, target, "independent"), noise)
    with pytest.raises(ValueError, match="pairing"):
        pair_noise(noise, target, "greedy")


def test_ot_pairing_lowers_the_noise_to_target_distance_of_training():
    g = torch.Generator().manual_seed(0)
    noise, target = torch.randn(4, 3, 200, generator=g), torch.rand(4, 3, 200, generator=g) - 0.5
    paired = pair_noise(noise, target, "ot")
    assert torch.equal(paired.sort(dim=2).values, noise.sort(dim=2).values)  # same points per sample
    before, after = ((noise - target) ** 2).sum(1).mean(), ((paired - target) ** 2).sum(1).mean()
    assert after < 0.8 * before


def test_training_loss_with_ot_pairing_uses_the_paired_noise():
    torch.manual_seed(0)
    diff = ConditionalDiffusion(prediction_type="epsilon", pairing="ot")
    net = torch.nn.Conv1d(3, 3, 1)
    x0 = torch.randn(2, 3, 30)
    loss = diff.training_loss(lambda x, t: net(x), x0, 10, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    t = torch.randint(0, 1000, (2,), generator=g)
    noise = pair_noise(torch.randn(2, 3, 20, generator=g), x0[:, :, 10:], "ot")
    expected = ((net(diff.q_sample(x0, t, noise, 10))[:, :, 10:] - noise) ** 2).mean()
    torch.testing.assert_close(loss, expected)
