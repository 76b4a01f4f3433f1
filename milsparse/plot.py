"""Sensitivity plots of an allocation (`--plot`, `plot=`): matplotlib, an optional extra."""

from __future__ import annotations

from pathlib import Path

from milsparse.errors import ConfigError

__all__ = ["plot_allocation"]


def plot_allocation(allocation: dict[str, dict], path) -> Path:
    """Write a figure of the per-layer sensitivity curves (relative output error against
    sparsity, the chosen sparsity marked) and the chosen sparsity per layer as bars."""
    if not allocation:
        raise ConfigError("nothing to plot: the plot shows the curves of allocate global/budget")
    try:  # a Figure with its own Agg canvas: no pyplot, so the caller's backend stays as it is
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError("--plot needs matplotlib: pip install 'milsparse[plot]'") from None
    path = Path(path)
    names = list(allocation)
    fig = Figure(figsize=(12, 4.5))
    FigureCanvasAgg(fig)
    curves, bars = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    for name in names:
        a = allocation[name]
        (line,) = curves.plot(a["sparsity"], a["error"], marker=".", label=name, linewidth=1)
        if a.get("chosen") is not None:
            chosen = a["chosen"]
            error = _interpolate(a["sparsity"], a["error"], chosen)
            curves.plot([chosen], [error], marker="o", color=line.get_color(), markersize=7)
    curves.set_xlabel("sparsity")
    curves.set_ylabel("relative output error of the layer")
    curves.set_yscale("symlog", linthresh=1e-4)
    curves.set_title("sensitivity (o: chosen)")
    if len(names) <= 16:
        curves.legend(fontsize=6)
    chosen = [allocation[n].get("chosen") or 0.0 for n in names]
    bars.barh(range(len(names)), chosen)
    bars.set_yticks(range(len(names)), names, fontsize=6)
    bars.invert_yaxis()
    bars.set_xlim(0, 1)
    bars.set_xlabel("chosen sparsity")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def _interpolate(xs, ys, x):
    import numpy as np

    return float(np.interp(x, xs, ys))
