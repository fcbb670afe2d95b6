"""The fitter on losses drawn from a known law: it recovers the law, its bootstrap covers the truth, the
compute-optimal allocation is the closed form, and a poor fit says so."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.optimize import minimize_scalar

from tansuo.plan.fit import Law, fit_law, fit_study

TRUE = Law(E=1.2, A=40.0, B=60.0, alpha=0.35, beta=0.3)


def grid(noise: float, seed: int = 0, law: Law = TRUE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Six sizes (12K-1.5M) x five budgets (100K-10M tokens), losses times log-normal noise."""
    n, d = np.meshgrid(np.geomspace(12e3, 1.5e6, 6), np.geomspace(1e5, 1e7, 5))
    n, d = n.ravel(), d.ravel()
    y = law(n, d) * np.exp(np.random.default_rng(seed).normal(0, noise, n.size))
    return n, d, y


def test_noiseless_losses_give_back_the_law() -> None:
    law, objective = fit_law(*grid(0.0))
    assert objective < 1e-12
    for k in ("E", "A", "B", "alpha", "beta"):
        assert getattr(law, k) == pytest.approx(getattr(TRUE, k), rel=1e-3), k


def test_noisy_losses_recover_the_law() -> None:
    n, d, y = grid(0.005)  # 0.5% noise, about a seed's spread in validation loss
    fit = fit_study(n, d, y, bootstrap=30)
    law = fit.law
    assert law.alpha == pytest.approx(TRUE.alpha, abs=0.05)
    assert law.beta == pytest.approx(TRUE.beta, abs=0.05)
    assert pytest.approx(TRUE.E, rel=0.1) == law.E
    assert fit.r2 > 0.99 and fit.quality()[0]
    p = fit.predict_interval(3e6, 3e7)  # an extrapolation: twice the largest size, three times the tokens
    assert p["pi_low"] <= p["value"] <= p["pi_high"] and p["low"] < p["high"]
    assert p["value"] == pytest.approx(float(TRUE(3e6, 3e7)), rel=0.01)


def test_bootstrap_intervals_cover_the_truth_about_as_often_as_they_say() -> None:
    """Over twelve noisy studies the 95% intervals of E, alpha, beta and an extrapolated loss hold the true
    value at least 9 times each (a correct 95% interval fails that with probability 0.002)."""
    hits = dict.fromkeys(("E", "alpha", "beta", "loss"), 0)
    for seed in range(12):
        n, d, y = grid(0.005, seed)
        fit = fit_study(n, d, y, bootstrap=30, seed=seed)
        for k in ("E", "alpha", "beta"):
            lo, hi = fit.spread(lambda r, k=k: getattr(r, k))
            hits[k] += lo <= getattr(TRUE, k) <= hi
        p = fit.predict_interval(3e6, 3e7)
        hits["loss"] += p["low"] <= float(TRUE(3e6, 3e7)) <= p["high"]
    assert min(hits.values()) >= 9, hits


def test_compute_optimal_allocation_is_the_closed_form() -> None:
    law = TRUE
    for flops in (1e15, 1e18, 1e21):
        n, d = law.optimal(flops)
        assert 6 * n * d == pytest.approx(flops)
        s = law.alpha + law.beta
        g = (law.alpha * law.A / (law.beta * law.B)) ** (1 / s)
        assert n == pytest.approx(g * (flops / 6) ** (law.beta / s))
        assert d == pytest.approx((flops / 6) ** (law.alpha / s) / g)
        # and it is the minimum: no other split of the same compute does better
        split = lambda x, c=flops: float(law(math.exp(x), c / 6 / math.exp(x)))  # noqa: E731 (N = e^x)
        best = minimize_scalar(split, bounds=(0, 50))
        assert math.exp(best.x) == pytest.approx(n, rel=1e-3)


def test_budget_for_a_target_loss() -> None:
    law = TRUE
    flops = law.flops_for(2.0)
    assert flops is not None and law.optimal_loss(flops) == pytest.approx(2.0, rel=1e-9)
    assert law.flops_for(2.5) < flops  # a looser target costs less
    assert law.flops_for(law.E) is None and law.flops_for(1.0) is None  # at or below E: never


def test_an_accuracy_is_fitted_as_its_distance_to_one() -> None:
    """accuracy = 1 - (E + A/N^alpha + B/D^beta): the saturating form, its ceiling 1 - E."""
    true = Law(E=0.05, A=4.0, B=9.0, alpha=0.3, beta=0.35)
    n, d, err = grid(0.003, law=true)
    fit = fit_study(n, d, 1 - err, metric="accuracy", direction="maximize", bootstrap=10)
    assert fit.form == "saturating" and fit.ceiling == 1.0
    assert fit.r2 > 0.99 and fit.law.alpha == pytest.approx(true.alpha, abs=0.05)
    assert np.abs(fit.predict(n, d) - (1 - true(n, d))).max() < 0.005  # within half a point everywhere
    assert fit.predict(1e18, 1e21) == pytest.approx(1 - fit.law.E, abs=1e-4)  # levels off below 1
    assert np.all(fit.predict(n, d) < 1)


def test_a_poor_fit_says_so() -> None:
    n, d, _ = grid(0.0)
    y = np.random.default_rng(0).uniform(2.0, 3.0, n.size)  # no law at all
    fit = fit_study(n, d, y, bootstrap=0)
    good, why = fit.quality()
    assert not good and "poorly" in why and "R^2" in why
