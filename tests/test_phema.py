"""Post-hoc EMA math (plugin/phema.py) against closed forms and direct computation."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.integrate import quad

from plugin.phema import (
    exponent_of_sigma_rel, power_function_beta, power_function_correlation, relative_fit_error, sigma_rel_of_exponent,
    solve_posthoc_coefficients,
)  # fmt: skip


def test_sigma_rel_and_exponent_are_inverse_and_match_the_papers_values():
    sigma_rels = np.array([0.01, 0.05, 0.07, 0.10, 0.2, 0.28])
    assert np.allclose(sigma_rel_of_exponent(exponent_of_sigma_rel(sigma_rels)), sigma_rels, rtol=1e-12)
    assert exponent_of_sigma_rel(0.05) == pytest.approx(16.97, abs=0.01)  # the paper's γ for its two profiles
    assert exponent_of_sigma_rel(0.10) == pytest.approx(6.94, abs=0.01)
    # eq. 3 is the standard deviation of τ ~ t·U^(1/(γ+1)), the profile τ^γ, divided by t
    gamma = 3.0
    tau = np.random.default_rng(0).random(2_000_000) ** (1 / (gamma + 1))
    assert tau.std() == pytest.approx(sigma_rel_of_exponent(gamma), rel=2e-3)


def profile(t: float, sigma_rel: float, tau: float) -> float:
    gamma = exponent_of_sigma_rel(sigma_rel)
    return (gamma + 1) * tau**gamma / t ** (gamma + 1) if tau <= t else 0.0


@pytest.mark.parametrize("a_t, a_sigma, b_t, b_sigma", [(100, 0.05, 70, 0.10), (50, 0.2, 100, 0.07), (80, 0.1, 80, 0.1)])
def test_correlation_is_the_integral_of_the_two_profiles(a_t, a_sigma, b_t, b_sigma):
    integral, _ = quad(lambda tau: profile(a_t, a_sigma, tau) * profile(b_t, b_sigma, tau), 0, min(a_t, b_t), limit=200)
    assert power_function_correlation(a_t, a_sigma, b_t, b_sigma) == pytest.approx(integral, rel=1e-9)


def power_function_ema(trajectory: np.ndarray, sigma_rel: float, every: int | None = None):
    """The EMA of trajectory[t-1] (t = 1..T) with β_t from eq. 4; with `every`, also its snapshots."""
    average, snapshots = np.zeros_like(trajectory[0]), []
    for t, value in enumerate(trajectory, start=1):
        beta = power_function_beta(sigma_rel, t)
        average = beta * average + (1 - beta) * value
        if every and t % every == 0:
            snapshots.append((t, average.copy()))
    return average, snapshots


def test_the_beta_schedule_averages_with_the_power_function_profile():
    """For θ_τ = τ the profile's mean is (γ+1)/(γ+2)·t; the first step copies the weights (β_1 = 0)."""
    assert power_function_beta(0.1, 1) == 0.0
    steps, sigma_rel = 20_000, 0.1
    average, _ = power_function_ema(np.arange(1, steps + 1, dtype=np.float64)[:, None], sigma_rel)
    gamma = exponent_of_sigma_rel(sigma_rel)
    assert average[0] == pytest.approx((gamma + 1) / (gamma + 2) * steps, rel=1e-3)


def trajectory(steps: int) -> np.ndarray:
    """Three scalar 'weights' that drift, oscillate and settle, as training weights do."""
    t = np.arange(1, steps + 1, dtype=np.float64)[:, None]
    return np.hstack([np.log1p(t / 50), np.sin(t / 400) + t / 4000, np.exp(-t / 700) * np.cos(t / 90)])


def reconstruct(snapshots: list[tuple[float, float, np.ndarray]], out_t: float, out_sigma: float) -> np.ndarray:
    times, sigmas, values = zip(*snapshots)
    x = solve_posthoc_coefficients(times, sigmas, out_t, out_sigma)[:, 0]
    return np.tensordot(x, np.stack(values), axes=1)


def tracked_snapshots(path: np.ndarray, sigma_rels, every: int) -> list[tuple[float, float, np.ndarray]]:
    return [(t, sigma, value) for sigma in sigma_rels for t, value in power_function_ema(path, sigma, every)[1]]


def test_an_untracked_ema_length_is_reconstructed_from_the_snapshots():
    steps, every = 4000, 200
    path = trajectory(steps)
    snapshots = tracked_snapshots(path, (0.05, 0.10), every)
    for sigma in (0.06, 0.08, 0.12):
        direct, _ = power_function_ema(path, sigma)
        rebuilt = reconstruct(snapshots, steps, sigma)
        assert np.abs(rebuilt - direct).max() < 2e-3 * np.abs(path).max(), sigma
    # a tracked profile comes back as (almost exactly) its own last snapshot
    last = dict(((t, s), v) for t, s, v in snapshots)[(steps, 0.10)]
    assert np.abs(reconstruct(snapshots, steps, 0.10) - last).max() < 1e-8
    # and at an earlier step than the end, from the snapshots up to it
    early = [s for s in snapshots if s[0] <= 2000]
    assert np.abs(reconstruct(early, 2000, 0.07) - power_function_ema(path[:2000], 0.07)[0]).max() < 2e-3 * np.abs(path).max()


def test_the_fit_error_says_which_lengths_the_snapshots_can_stand_in_for():
    times = [t for t in range(200, 4001, 200)] * 2
    sigmas = [0.05] * 20 + [0.10] * 20
    inside = relative_fit_error(times, sigmas, 4000, [0.05, 0.07, 0.10, 0.15])
    narrower = relative_fit_error(times, sigmas, 4000, 0.005)  # shorter than anything tracked
    later = relative_fit_error(times, sigmas, 8000, 0.07)  # past the last snapshot
    assert inside.max() < 0.01 and narrower[0] > 0.3 and later[0] > 0.3
    assert inside[0] < 1e-6 and inside[2] < 1e-6  # tracked profiles are fitted exactly
