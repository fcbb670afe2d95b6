"""The scaling law of a study: ``L(N, D) = E + A / N^alpha + B / D^beta``, fitted as Hoffmann et al. 2022 do.

Approach 3 of "Training Compute-Optimal Large Language Models" (appendix D.2): with ``A = exp(a)``,
``B = exp(b)``, ``E = exp(e)`` the law's logarithm is a log-sum-exp,

    log L(N, D) = LSE(a - alpha log N, b - beta log D, e),

and the fit minimises the Huber loss (delta 1e-3) of its residuals against the measured log-losses with
L-BFGS (scipy.optimize), started from a grid of initialisations (theirs: alpha, beta in {0, 0.5, .., 2}, e in
{-1, -.5, .., 1}, a, b in {0, 5, .., 25}; here e also in {-4, -3, -2}); every grid point is scored and the
best few are refined. Besiroglu
et al. 2024 ("Chinchilla Scaling: A replication attempt") found the published fit stopped early: the
optimiser here runs to tight tolerances.

Confidence intervals come from the bootstrap over trials (each replicate refits a resample, drawn with
replacement, of the study's trials); prediction intervals add a residual of the full fit drawn at random to
each replicate's prediction (scaled by ``sqrt(n / (n - 5))``, as the residuals of a five-parameter fit
understate the noise), for what one more training run would measure.

With ``C = 6 N D`` the law has a closed-form compute-optimal allocation (their equation 4):
``N_opt = G (C / 6)^(beta / (alpha + beta))``, ``D_opt = G^-1 (C / 6)^(alpha / (alpha + beta))``,
``G = (alpha A / (beta B))^(1 / (alpha + beta))``.

Metrics that go up (accuracy, BLEU) are fitted as their distance to the ceiling (1, or 100 for metrics in
points): ``metric = ceiling - (E + A / N^alpha + B / D^beta)``, a form that saturates at ``ceiling - E``.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field

import numpy as np
from numpy.typing import ArrayLike

#: Hoffmann et al.'s grid of initialisations (e, a, b, alpha, beta), with e reaching down to E = 0.02 for
#: error rates (1 - accuracy), which sit far below the losses their grid was made for
GRID = {
    "e": np.array([-4.0, -3.0, -2.0, -1.0, -0.5, 0.0, 0.5, 1.0]),
    "a": np.arange(0.0, 25.1, 5.0),
    "b": np.arange(0.0, 25.1, 5.0),
    "alpha": np.arange(0.0, 2.01, 0.5),
    "beta": np.arange(0.0, 2.01, 0.5),
}
HUBER_DELTA = 1e-3
#: Chinchilla's fitted law (Hoffmann et al. 2022, equation 10), printed beside a study's
CHINCHILLA = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}


@dataclass(frozen=True)
class Law:
    """``E + A / N^alpha + B / D^beta``."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def __call__(self, n: ArrayLike, d: ArrayLike) -> np.ndarray:
        n, d = np.asarray(n, dtype=float), np.asarray(d, dtype=float)
        return self.E + self.A / n**self.alpha + self.B / d**self.beta

    @property
    def G(self) -> float:
        return (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))

    def optimal(self, flops: float) -> tuple[float, float]:
        """The (N, D) that minimise the law at ``flops = 6 N D`` (the closed form above)."""
        s = self.alpha + self.beta
        if self.alpha <= 0 or self.beta <= 0:
            raise ValueError("a law with alpha or beta <= 0 has no compute-optimal allocation")
        n = self.G * (flops / 6) ** (self.beta / s)
        return n, flops / 6 / n

    def optimal_loss(self, flops: float) -> float:
        n, d = self.optimal(flops)
        return float(self(n, d))

    def flops_for(self, target: float) -> float | None:
        """The least compute (``6 N D``, allocated optimally) at which the law reaches ``target``; None when
        the target is at or below E, which no amount of compute reaches."""
        from scipy.optimize import brentq

        if target <= self.E or self.alpha <= 0 or self.beta <= 0:
            return None
        lo, hi = 0.0, 200.0  # log10 of FLOPs
        if self.optimal_loss(10**lo) <= target:
            return 10**lo
        if self.optimal_loss(10**hi) > target:
            return None
        return 10 ** brentq(lambda x: self.optimal_loss(10**x) - target, lo, hi, xtol=1e-10)

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def _objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_y: np.ndarray, delta: float):
    """Huber loss of the LSE residuals and its gradient in (a, b, e, alpha, beta)."""
    a, b, e, alpha, beta = theta
    z = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])  # (3, n)
    top = z.max(axis=0)
    w = np.exp(z - top)
    total = w.sum(axis=0)
    lse = top + np.log(total)
    w /= total  # softmax: d lse / d z
    r = lse - log_y
    small = np.abs(r) <= delta
    loss = np.where(small, 0.5 * r**2, delta * (np.abs(r) - 0.5 * delta)).sum()
    g = np.where(small, r, delta * np.sign(r))  # d huber / d r
    grad = np.array(
        [
            (g * w[0]).sum(),
            (g * w[1]).sum(),
            (g * w[2]).sum(),
            -(g * w[0] * log_n).sum(),
            -(g * w[1] * log_d).sum(),
        ]
    )
    return loss, grad


def _grid_scores(log_n: np.ndarray, log_d: np.ndarray, log_y: np.ndarray, delta: float) -> np.ndarray:
    """The objective at every grid point, vectorised: (points, 5) starts sorted best first."""
    starts = np.array(
        list(itertools.product(GRID["a"], GRID["b"], GRID["e"], GRID["alpha"], GRID["beta"]))
    )  # (P, 5) as (a, b, e, alpha, beta)
    z1 = starts[:, :1] - starts[:, 3:4] * log_n[None]
    z2 = starts[:, 1:2] - starts[:, 4:5] * log_d[None]
    z3 = np.broadcast_to(starts[:, 2:3], z1.shape)
    lse = np.logaddexp(np.logaddexp(z1, z2), z3)
    r = np.abs(lse - log_y[None])
    loss = np.where(r <= delta, 0.5 * r**2, delta * (r - 0.5 * delta)).sum(axis=1)
    return starts[np.argsort(loss, kind="stable")]


def fit_law(
    n: ArrayLike,
    d: ArrayLike,
    y: ArrayLike,
    *,
    delta: float = HUBER_DELTA,
    refine: int = 8,
    starts: np.ndarray | None = None,
) -> tuple[Law, float]:
    """Fit the law to losses ``y`` at sizes ``n`` and token counts ``d``; returns it and the Huber objective.

    Args:
        refine: how many of the best grid points L-BFGS starts from.
        starts: (k, 5) starting points (a, b, e, alpha, beta) to use instead of the grid (the bootstrap
            starts from the full fit).
    """
    from scipy.optimize import minimize

    log_n, log_d = np.log(np.asarray(n, dtype=float)), np.log(np.asarray(d, dtype=float))
    log_y = np.log(np.asarray(y, dtype=float))
    if starts is None:
        starts = _grid_scores(log_n, log_d, log_y, delta)[:refine]
    best, best_loss = None, math.inf
    for x0 in starts:
        done = minimize(
            _objective,
            x0,
            args=(log_n, log_d, log_y, delta),
            jac=True,
            method="L-BFGS-B",
            options={"maxiter": 5000, "ftol": 1e-15, "gtol": 1e-12},
        )
        if np.all(np.isfinite(done.x)) and done.fun < best_loss:
            best, best_loss = done.x, float(done.fun)
    assert best is not None
    a, b, e, alpha, beta = best
    return Law(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=float(alpha), beta=float(beta)), best_loss


def _theta(law: Law) -> np.ndarray:
    return np.array([math.log(law.A), math.log(law.B), math.log(law.E), law.alpha, law.beta])


@dataclass
class Fit:
    """A fitted law with its bootstrap replicates and how well it describes the study."""

    law: Law
    metric: str
    form: str  # "loss": the metric is the law; "saturating": the metric is ceiling minus the law
    ceiling: float
    n: np.ndarray
    d: np.ndarray
    y: np.ndarray  # the metric as measured
    objective: float
    replicates: list[Law] = field(default_factory=list)
    seed: int = 0

    def metric_of(self, law_value: np.ndarray | float) -> np.ndarray:
        return np.asarray(law_value if self.form == "loss" else self.ceiling - np.asarray(law_value))

    def predict(self, n: ArrayLike, d: ArrayLike) -> np.ndarray:
        return self.metric_of(self.law(n, d))

    @property
    def fitted(self) -> np.ndarray:
        return self.predict(self.n, self.d)

    @property
    def residuals(self) -> np.ndarray:
        """Measured over predicted, minus 1: relative residuals of the metric."""
        return self.y / self.fitted - 1

    @property
    def r2(self) -> float:
        ss_res = float(((self.y - self.fitted) ** 2).sum())
        ss_tot = float(((self.y - self.y.mean()) ** 2).sum())
        return 1 - ss_res / ss_tot if ss_tot > 0 else float("nan")

    def quality(self) -> tuple[bool, str]:
        """(good, why): R^2 of at least 0.9 and no trial off by more than 10%, or what fails."""
        worst = float(np.abs(self.residuals).max())
        problems = []
        if not self.r2 >= 0.9:
            problems.append(f"R^2 is {self.r2:.3f} (< 0.9)")
        if worst > 0.10:
            problems.append(f"a trial lies {100 * worst:.1f}% from the fit (> 10%)")
        if self.law.alpha <= 0.01 or self.law.beta <= 0.01:
            problems.append("an exponent is ~0: the study does not vary that axis enough")
        if not problems:
            return True, f"R^2 {self.r2:.4f}, largest residual {100 * worst:.2f}%"
        return False, "the law describes this study poorly: " + "; ".join(problems) + (
            "; treat every projection below as unreliable"
        )

    def interval(self, values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
        lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
        return float(lo), float(hi)

    def predict_interval(self, n: float, d: float, level: float = 0.95) -> dict[str, float]:
        """The prediction at (n, d): ``value``, the confidence interval (``low``, ``high``: the bootstrap's
        replicates) and the prediction interval (``pi_low``, ``pi_high``: a replicate plus one of the full
        fit's residuals in log space, drawn at random)."""
        value = float(self.predict(n, d))
        out = {"value": value, "low": value, "high": value, "pi_low": value, "pi_high": value}
        if not self.replicates:
            return out
        reps = np.array([float(self.metric_of(r(n, d))) for r in self.replicates])
        rng = np.random.default_rng(self.seed + 1)
        # residuals of a fit of five parameters understate the noise: inflated by sqrt(n / (n - 5))
        n = len(self.y)
        log_res = (np.log(self.y) - np.log(self.fitted)) * math.sqrt(n / max(1, n - 5))
        noisy = reps * np.exp(rng.choice(log_res, size=len(reps)))
        out["low"], out["high"] = self.interval(reps, level)
        out["pi_low"], out["pi_high"] = self.interval(noisy, level)
        return out

    def spread(self, fn, level: float = 0.95) -> tuple[float, float] | None:  # noqa: ANN001
        """The interval of ``fn(law)`` over the replicates whose value is finite (None without any)."""
        vals = []
        for r in self.replicates:
            try:
                v = fn(r)
            except (ValueError, ZeroDivisionError, OverflowError):
                continue
            if v is not None and np.isfinite(v):
                vals.append(v)
        return self.interval(np.array(vals), level) if vals else None


def law_target(metric: str, y: np.ndarray, direction: str) -> tuple[str, float, np.ndarray]:
    """What the law is fitted to: the metric itself when it goes down (a loss), else its distance to the
    ceiling (1 for a fraction, 100 for points). Returns (form, ceiling, values to fit)."""
    if direction == "minimize":
        return "loss", 0.0, y
    ceiling = 1.0 if float(y.max()) <= 1.0 else 100.0
    return "saturating", ceiling, ceiling - y


def fit_study(
    n: ArrayLike,
    d: ArrayLike,
    y: ArrayLike,
    *,
    metric: str = "loss",
    direction: str = "minimize",
    bootstrap: int = 200,
    seed: int = 0,
) -> Fit:
    """Fit the law to a study's trials and bootstrap it ``bootstrap`` times (resampling trials)."""
    n, d, y = (np.asarray(v, dtype=float) for v in (n, d, y))
    form, ceiling, target = law_target(metric, y, direction)
    if np.any(target <= 0):
        raise ValueError(f"{metric} must stay below its ceiling {ceiling:g} to fit a saturating law")
    law, objective = fit_law(n, d, target)
    fit = Fit(law, metric, form, ceiling, n, d, y, objective, seed=seed)
    rng = np.random.default_rng(seed)
    starts = _theta(law)[None]  # a resample's optimum lies near the full fit's
    for _ in range(bootstrap):
        idx = rng.integers(0, len(n), size=len(n))
        replicate, _ = fit_law(n[idx], d[idx], target[idx], starts=starts)
        fit.replicates.append(replicate)
    return fit
