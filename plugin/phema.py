"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models",
section 3 and appendix C.2): average the weights with power-function profiles during training, keep
snapshots of them, and after training solve for the combination of snapshots that best matches an EMA of
any other length, which then never has to be guessed before the run.

One function per equation, pure, in float64 numpy, in the shape of NVlabs/edm2's `training/phema.py`. Time
t counts optimizer steps from 1.

A power-function profile at time t weights the weights seen at τ ≤ t by p_t(τ) = (γ+1) τ^γ / t^(γ+1). Its
width relative to t is σ_rel = √((γ+1) / ((γ+2)² (γ+3))) (eq. 3); the paper names profiles by σ_rel.
"""

from __future__ import annotations

import numpy as np


def sigma_rel_of_exponent(gamma):
    """Eq. 3: the relative standard deviation of the profile τ^γ on [0, t]."""
    gamma = np.float64(gamma)
    return np.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def exponent_of_sigma_rel(sigma_rel):
    """Eq. 3 solved for γ (edm2's `std_to_exp`): the largest real root of γ³ + 7γ² + (16 − σ⁻²)γ + (12 − σ⁻²)."""
    sigma_rel = np.float64(sigma_rel)
    roots = [np.roots([1, 7, 16 - s, 12 - s]).real.max() for s in sigma_rel.ravel() ** -2]
    return np.float64(roots).reshape(sigma_rel.shape)


def power_function_beta(sigma_rel, t):
    """Eq. 4, the decay at step t that keeps the average a power-function profile: β_t = (1 − 1/t)^(γ+1).
    At t = 1 it is 0: the average starts as a copy of the weights."""
    return (1 - 1 / np.float64(t)) ** (exponent_of_sigma_rel(sigma_rel) + 1)


def power_function_correlation(a_t, a_sigma_rel, b_t, b_sigma_rel):
    """Appendix C.2: the inner product ∫ p_a(τ) p_b(τ) dτ of two profiles, one ending at a_t, the other at b_t.
    With t_lo = min(a_t, b_t): (γ_a+1)(γ_b+1) t_lo^(γ_a+γ_b+1) / ((γ_a+γ_b+1) a_t^(γ_a+1) b_t^(γ_b+1))."""
    a_gamma, b_gamma = exponent_of_sigma_rel(a_sigma_rel), exponent_of_sigma_rel(b_sigma_rel)
    a_t, b_t = np.float64(a_t), np.float64(b_t)
    t_lo = np.minimum(a_t, b_t)
    ratio = (t_lo / a_t) ** (a_gamma + 1) * (t_lo / b_t) ** (b_gamma + 1) / t_lo  # arranged to stay in range
    return (a_gamma + 1) * (b_gamma + 1) / (a_gamma + b_gamma + 1) * ratio


def correlation_matrices(in_t, in_sigma_rel, out_t, out_sigma_rel):
    """The inner products the least squares needs: A_ij = ⟨p_i, p_j⟩ among the snapshots' profiles and
    B_io = ⟨p_i, p_o⟩ with each wanted profile."""
    in_t, in_sigma_rel = np.broadcast_arrays(np.float64(in_t).ravel(), np.float64(in_sigma_rel).ravel())
    out_t, out_sigma_rel = np.broadcast_arrays(np.float64(out_t).ravel(), np.float64(out_sigma_rel).ravel())
    a = power_function_correlation(in_t[:, None], in_sigma_rel[:, None], in_t[None, :], in_sigma_rel[None, :])
    b = power_function_correlation(in_t[:, None], in_sigma_rel[:, None], out_t[None, :], out_sigma_rel[None, :])
    return a, b


def solve_posthoc_coefficients(in_t, in_sigma_rel, out_t, out_sigma_rel):
    """The least-squares fit of the profiles (out_t, out_sigma_rel) by the snapshots (in_t[i], in_sigma_rel[i]):
    the solution x of the normal equations A x = B. One row per snapshot, one column per wanted profile."""
    return np.linalg.solve(*correlation_matrices(in_t, in_sigma_rel, out_t, out_sigma_rel))


def relative_fit_error(in_t, in_sigma_rel, out_t, out_sigma_rel):
    """How far the best fit is from each wanted profile, ‖p_o − Σ x_io p_i‖ / ‖p_o‖, from the same inner
    products: small where the snapshots can stand in for that profile, large outside what they span."""
    a, b = correlation_matrices(in_t, in_sigma_rel, out_t, out_sigma_rel)
    x = np.linalg.solve(a, b)
    out_t, out_sigma_rel = np.broadcast_arrays(np.float64(out_t).ravel(), np.float64(out_sigma_rel).ravel())
    norm = power_function_correlation(out_t, out_sigma_rel, out_t, out_sigma_rel)
    residual = norm - 2 * np.sum(x * b, axis=0) + np.einsum("io,ij,jo->o", x, a, x)
    return np.sqrt(np.maximum(residual, 0) / norm)
