"""Scaling-law fits of (N, D, loss) points (Hoffmann et al. 2022):

(a) L(N, D) = E + A / N^alpha + B / D^beta (approach 3): the Huber loss (delta 1e-3) of the
    residuals of log L, with L written as LSE(log A - alpha log N, log B - beta log D, log E),
    minimised by L-BFGS-B from the starts of a grid (Hoffmann et al.'s 4500) with the lowest
    objective; the best optimum is kept. 95% intervals:
    percentiles of refits to bootstrap resamples of the points.
(b) isoFLOP minima (approach 2): per budget a parabola of loss over log N; its vertex is N_opt(C),
    and D_opt = C / (6 N_opt). A line through log N_opt over log C gives N_opt ~ C^a, and so
    D_opt ~ C^b with b = 1 - a.
(c) L(N) at fixed D: the law at the largest D of the points, (E + B / D^beta) + A / N^alpha.

The compute-optimal model at a target compute C is the law (a) minimised under C = 6 N D:
N_opt = G (C/6)^(beta/(alpha+beta)), G = (alpha A / (beta B))^(1/(alpha+beta)); the isoFLOP
power law's prediction (b) is reported beside it."""

import itertools
import math

import numpy as np

from pretrain.scaling import ScalingError
from pretrain.scaling.observations import Observations

HUBER_DELTA = 1e-3
PARAMETERS = ("E", "A", "B", "alpha", "beta")
# Hoffmann et al.'s grid of initial values: (log A, log B, log E, alpha, beta)
GRID = {"log_A": np.arange(0.0, 30.0, 5.0), "log_B": np.arange(0.0, 30.0, 5.0), "log_E": np.arange(-1.0, 1.5, 0.5),
        "alpha": np.arange(0.0, 2.5, 0.5), "beta": np.arange(0.0, 2.5, 0.5)}
BOUNDS = [(-20.0, 60.0), (-20.0, 60.0), (-10.0, 10.0), (0.0, 5.0), (0.0, 5.0)]
DESCENTS = 64  # L-BFGS-B runs from the grid's starts of lowest objective (all 4500 take seconds)
BOOTSTRAP_STARTS = 8  # refits of a resample start from the best optima of the full fit
NEEDS = "`pretrain scaling fit` needs scipy and matplotlib: pip install -e '.[scaling]'"


def _minimize():
    try:
        from scipy.optimize import minimize
    except ImportError:
        raise ScalingError(NEEDS) from None
    return minimize


def huber_objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_loss: np.ndarray,
                    delta: float = HUBER_DELTA) -> tuple[float, np.ndarray]:
    """Mean Huber loss of log L residuals (divided by delta: same optimum, better scaled) and its gradient."""
    log_a, log_b, log_e, alpha, beta = theta
    terms = np.stack([log_a - alpha * log_n, log_b - beta * log_d, np.full_like(log_n, log_e)])
    top = terms.max(axis=0)
    weights = np.exp(terms - top)
    total = weights.sum(axis=0)
    residual = top + np.log(total) - log_loss
    weights /= total  # d log L / d term
    size = np.abs(residual)
    value = np.where(size <= delta, 0.5 * residual**2, delta * (size - 0.5 * delta)).sum()
    slope = np.clip(residual, -delta, delta)
    grad = np.array([(slope * weights[0]).sum(), (slope * weights[1]).sum(), (slope * weights[2]).sum(),
                     -(slope * weights[0] * log_n).sum(), -(slope * weights[1] * log_d).sum()])
    scale = 1.0 / (delta * len(log_loss))
    return value * scale, grad * scale


def _fit(obs: Observations, starts: np.ndarray) -> list[tuple[float, np.ndarray]]:
    """(objective, theta) of L-BFGS-B from each start, best first."""
    minimize = _minimize()
    data = (np.log(obs.params), np.log(obs.tokens), np.log(obs.loss))
    optima = []
    for start in starts:
        result = minimize(huber_objective, start, args=data, jac=True, method="L-BFGS-B", bounds=BOUNDS)
        optima.append((float(result.fun), result.x))
    return sorted(optima, key=lambda optimum: optimum[0])


def _law(theta: np.ndarray) -> dict[str, float]:
    log_a, log_b, log_e, alpha, beta = theta
    return {"E": math.exp(log_e), "A": math.exp(log_a), "B": math.exp(log_b), "alpha": float(alpha), "beta": float(beta)}


def check_points(obs: Observations) -> None:
    if len(obs) < 5 or len(set(obs.params)) < 2 or len(set(obs.tokens)) < 2:
        raise ScalingError(f"{obs.source}: the L(N, D) fit needs at least 5 points with at least 2 distinct N and 2 "
                           f"distinct D (it has {len(obs)} points, {len(set(obs.params))} N, "
                           f"{len(set(obs.tokens))} D): plan more budgets or --points")


def fit_law(obs: Observations, resamples: int = 200, seed: int = 0) -> dict:
    """(a): the law's parameters, their bootstrap 95% intervals and the fit's settings."""
    check_points(obs)
    grid = np.array(list(itertools.product(*GRID.values())))
    data = (np.log(obs.params), np.log(obs.tokens), np.log(obs.loss))
    screened = np.array([huber_objective(start, *data)[0] for start in grid])
    optima = _fit(obs, grid[np.argsort(screened)[:DESCENTS]])
    best = optima[0][1]
    refit_starts = np.array([theta for _, theta in optima[:BOOTSTRAP_STARTS]])
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(resamples):
        pick = rng.integers(0, len(obs), len(obs))
        sample = Observations(obs.params[pick], obs.tokens[pick], obs.loss[pick], obs.compute[pick], obs.source,
                              obs.count)
        law = _law(_fit(sample, refit_starts)[0][1])
        draws.append([law[name] for name in PARAMETERS])
    draws = np.array(draws).reshape(-1, len(PARAMETERS))
    ci = {name: [float(np.percentile(draws[:, i], 2.5)), float(np.percentile(draws[:, i], 97.5))]
          if resamples else None for i, name in enumerate(PARAMETERS)}
    return {**_law(best), "ci": ci, "huber_delta": HUBER_DELTA, "starts": len(grid), "bootstrap": resamples,
            "objective": optima[0][0]}


def predict(law: dict, params: np.ndarray | float, tokens: np.ndarray | float) -> np.ndarray | float:
    return law["E"] + law["A"] / np.power(params, law["alpha"]) + law["B"] / np.power(tokens, law["beta"])


def law_optimum(law: dict, compute: float) -> dict | None:
    """The law's minimum under C = 6 N D; None when alpha or beta is 0 (no interior optimum)."""
    alpha, beta = law["alpha"], law["beta"]
    if alpha <= 0 or beta <= 0:
        return None
    scale = (alpha * law["A"] / (beta * law["B"])) ** (1 / (alpha + beta))
    params = scale * (compute / 6) ** (beta / (alpha + beta))
    tokens = compute / (6 * params)
    return {"compute": compute, "params": params, "tokens": tokens, "loss": float(predict(law, params, tokens))}


def isoflop_minima(obs: Observations) -> list[dict]:
    """(b): per budget with at least 3 distinct N, the parabola of loss over log N and its vertex.
    `interior` is false where the vertex lies outside the budget's N (or the parabola opens
    downwards, and the best point stands in): the grid should then be widened."""
    minima = []
    for compute in sorted(set(obs.compute)):
        mine = obs.compute == compute
        x, y = np.log(obs.params[mine]), obs.loss[mine]
        if len(set(x)) < 3:
            continue
        curve = np.polyfit(x, y, 2)
        if curve[0] > 0:
            vertex = -curve[1] / (2 * curve[0])
            loss, interior = float(np.polyval(curve, vertex)), bool(x.min() <= vertex <= x.max())
        else:
            vertex, loss, interior = x[np.argmin(y)], float(y.min()), False
        params = math.exp(vertex)
        minima.append({"compute": float(compute), "params": params, "tokens": compute / (6 * params), "loss": loss,
                       "interior": interior, "parabola": [float(c) for c in curve]})
    return minima


def power_law(minima: list[dict]) -> tuple[float, float] | None:
    """N_opt = k C^a through the isoFLOP minima: (a, log k), or None with fewer than 2 budgets."""
    if len(minima) < 2:
        return None
    a, log_k = np.polyfit(np.log([m["compute"] for m in minima]), np.log([m["params"] for m in minima]), 1)
    return float(a), float(log_k)


def fit_all(obs: Observations, target_compute: float | None = None, resamples: int = 200, seed: int = 0) -> dict:
    """Everything fit.json holds: (a), (b), (c) and the compute-optimal model at the target."""
    law = fit_law(obs, resamples, seed)
    minima = isoflop_minima(obs)
    trend = power_law(minima)
    target = target_compute or float(obs.compute.max())
    isoflop_optimum = None
    if trend is not None:
        params = math.exp(trend[1]) * target ** trend[0]
        isoflop_optimum = {"compute": target, "params": params, "tokens": target / (6 * params),
                           "loss": float(predict(law, params, target / (6 * params)))}
    fixed = float(obs.tokens.max())
    return {
        **law,
        "a": trend[0] if trend else None,
        "b": 1 - trend[0] if trend else None,
        "compute_optimal": law_optimum(law, target),
        "compute_optimal_isoflop": isoflop_optimum,
        "isoflop": minima,
        "fixed_tokens": {"tokens": fixed, "offset": law["E"] + law["B"] / fixed ** law["beta"]},
        "count": obs.count,
        "source": obs.source,
        "points": [{"params": float(n), "tokens": float(d), "loss": float(l), "compute": float(c)}
                   for n, d, l, c in zip(obs.params, obs.tokens, obs.loss, obs.compute)],
    }


def table(fit: dict) -> str:
    """The printed summary of fit_all's result."""
    lines = [f"L(N, D) = E + A / N^alpha + B / D^beta over {len(fit['points'])} points of {fit['source']} "
             f"(N = {fit['count']}); Huber delta {fit['huber_delta']:g} on log L, L-BFGS-B from the best {DESCENTS} "
             f"of {fit['starts']} starts, 95% intervals from {fit['bootstrap']} bootstrap resamples",
             f"  {'':6} {'fit':>10}   95% interval"]
    for name in PARAMETERS:
        interval = fit["ci"][name]
        shown = f"[{interval[0]:.4g}, {interval[1]:.4g}]" if interval else "-"
        lines.append(f"  {name:6} {fit[name]:>10.4g}   {shown}")
    lines.append("isoFLOP minima (parabola of loss over log N per budget):")
    lines.append(f"  {'C (FLOPs)':>10} {'N_opt':>10} {'D_opt':>10} {'loss':>8}")
    for m in fit["isoflop"]:
        edge = "" if m["interior"] else "  (outside the sampled N: widen the grid)"
        lines.append(f"  {m['compute']:>10.3g} {m['params']:>10.3g} {m['tokens']:>10.3g} {m['loss']:>8.4f}{edge}")
    if fit["a"] is None:
        lines.append("  N_opt ~ C^a needs isoFLOP minima of at least 2 budgets (each with 3 or more N)")
    else:
        lines.append(f"  N_opt ~ C^{fit['a']:.3f}, D_opt ~ C^{fit['b']:.3f}")
    fixed = fit["fixed_tokens"]
    lines.append(f"L(N) at D = {fixed['tokens']:.3g} tokens: {fixed['offset']:.4g} + {fit['A']:.4g} / N^{fit['alpha']:.4g}")
    best = fit["compute_optimal"]
    if best is None:
        lines.append("compute-optimal model: none (alpha or beta is 0: the law has no optimum under C = 6 N D)")
    else:
        lines.append(f"compute-optimal at C = {best['compute']:.3g} FLOPs (the law minimised under C = 6 N D): "
                     f"N = {best['params']:.3g}, D = {best['tokens']:.3g} tokens, loss {best['loss']:.4f}")
    if fit["compute_optimal_isoflop"]:
        other = fit["compute_optimal_isoflop"]
        lines.append(f"  isoFLOP power law instead: N = {other['params']:.3g}, D = {other['tokens']:.3g} tokens")
    return "\n".join(lines)
