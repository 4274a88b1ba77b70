"""The fit's three figures (PNG, matplotlib): loss over N per budget with the fitted law,
the isoFLOP parabolas with their minima, and N_opt over C."""

from pathlib import Path

import numpy as np

from pretrain.scaling import ScalingError
from pretrain.scaling.fit import NEEDS, law_optimum, predict

FILES = ("loss_vs_params.png", "isoflop.png", "n_opt.png")


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ScalingError(NEEDS) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _by_budget(fit: dict) -> dict[float, tuple[np.ndarray, np.ndarray]]:
    budgets = {}
    for point in fit["points"]:
        budgets.setdefault(point["compute"], []).append((point["params"], point["loss"]))
    return {c: tuple(np.array(v).T) for c, v in sorted(budgets.items())}


def _span(values: np.ndarray) -> np.ndarray:
    return np.geomspace(values.min() / 1.5, values.max() * 1.5, 200)


def plot_all(fit: dict, out: Path) -> list[Path]:
    """Write the three figures into `out`; their paths."""
    plt = _pyplot()
    budgets = _by_budget(fit)
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(budgets)))
    label = f"N ({fit['count']})"
    paths = [out / name for name in FILES]

    figure, axes = plt.subplots(figsize=(6.4, 4.8))
    for color, (compute, (params, loss)) in zip(colors, budgets.items()):
        grid = _span(params)
        axes.scatter(params, loss, color=color, label=f"C = {compute:.2g}")
        axes.plot(grid, predict(fit, grid, compute / (6 * grid)), color=color)
    fixed = fit["fixed_tokens"]
    grid = _span(np.array([p["params"] for p in fit["points"]]))
    axes.plot(grid, fixed["offset"] + fit["A"] / grid ** fit["alpha"], color="grey", linestyle="--",
              label=f"L(N) at D = {fixed['tokens']:.2g}")
    axes.set(xscale="log", xlabel=label, ylabel="loss",
             title=f"L = {fit['E']:.3g} + {fit['A']:.3g}/N^{fit['alpha']:.3f} + {fit['B']:.3g}/D^{fit['beta']:.3f}")
    axes.legend(fontsize="small")
    figure.savefig(paths[0], dpi=120, bbox_inches="tight")
    plt.close(figure)

    figure, axes = plt.subplots(figsize=(6.4, 4.8))
    minima = {m["compute"]: m for m in fit["isoflop"]}
    for color, (compute, (params, loss)) in zip(colors, budgets.items()):
        axes.scatter(params, loss, color=color, label=f"C = {compute:.2g}")
        if compute in minima:
            grid = _span(params)
            axes.plot(grid, np.polyval(minima[compute]["parabola"], np.log(grid)), color=color)
            axes.scatter([minima[compute]["params"]], [minima[compute]["loss"]], color=color, marker="*", s=160,
                         edgecolor="black", zorder=3)
    axes.set(xscale="log", xlabel=label, ylabel="loss", title="isoFLOP curves (stars: N_opt per budget)")
    axes.legend(fontsize="small")
    figure.savefig(paths[1], dpi=120, bbox_inches="tight")
    plt.close(figure)

    figure, axes = plt.subplots(figsize=(6.4, 4.8))
    target = fit["compute_optimal"] or fit["compute_optimal_isoflop"]
    computes = np.array([m["compute"] for m in fit["isoflop"]] + ([target["compute"]] if target else []) +
                        list(budgets))
    grid = np.geomspace(computes.min() / 2, computes.max() * 2, 100)
    for m in fit["isoflop"]:
        axes.scatter([m["compute"]], [m["params"]], color="C0", facecolor="C0" if m["interior"] else "none")
    if fit["a"] is not None:
        other = fit["compute_optimal_isoflop"]
        axes.plot(grid, other["params"] * (grid / other["compute"]) ** fit["a"], color="C0",
                  label=f"isoFLOP minima: N_opt ~ C^{fit['a']:.3f}")
    if fit["compute_optimal"]:
        axes.plot(grid, [law_optimum(fit, c)["params"] for c in grid], color="C1", linestyle="--",
                  label="L(N, D) fit under C = 6ND")
        best = fit["compute_optimal"]
        axes.scatter([best["compute"]], [best["params"]], color="C1", marker="*", s=160, zorder=3,
                     label=f"at C = {best['compute']:.2g}: N = {best['params']:.3g}")
    axes.set(xscale="log", yscale="log", xlabel="compute C (FLOPs)", ylabel=f"N_opt ({fit['count']})",
             title="compute-optimal model size (hollow: minimum outside the grid)")
    axes.legend(fontsize="small")
    figure.savefig(paths[2], dpi=120, bbox_inches="tight")
    plt.close(figure)
    return paths
