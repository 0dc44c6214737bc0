"""Drawing helpers shared by the report's figures: a figure, plain log ticks, a legend
outside the axes; the figure and its atomic save are megatron_upcycle.plotting's."""
from __future__ import annotations

import numpy as np

from megatron_upcycle.plotting import figure  # noqa: F401 (the sections call figures.figure and figures.save)
from megatron_upcycle.plotting import save_png as save  # noqa: F401


def compact(x: float) -> str:
    """A plain number for a tick label: 163840 -> 164K, 4.25 -> 4.25 (never 4 x 10^0)."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def plain_log_ticks(ax, axis: str = "both", count: int = 5) -> None:
    """Log-scaled axes labelled with a few plain numbers spread over the drawn range."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter, NullLocator

    for name in ("x", "y") if axis == "both" else (axis,):
        scale_axis = ax.xaxis if name == "x" else ax.yaxis
        if scale_axis.get_scale() != "log":
            continue
        lo, hi = sorted(ax.get_xlim() if name == "x" else ax.get_ylim())
        if hi / lo > 30:  # several decades: 1, 10, 100, ... (every other decade when many)
            decades = np.arange(np.ceil(np.log10(lo)), np.floor(np.log10(hi)) + 1)
            step = max(1, int(np.ceil(len(decades) / 7)))
            ticks = 10.0 ** decades[::step]
        else:
            ticks = np.array([float(f"{t:.2g}") for t in np.geomspace(lo, hi, count + 2)[1:-1]])
        scale_axis.set_major_locator(FixedLocator(ticks))
        scale_axis.set_major_formatter(FuncFormatter(lambda v, _pos: compact(v)))
        scale_axis.set_minor_locator(NullLocator())
        scale_axis.set_minor_formatter(NullFormatter())


def legend_outside(ax, fontsize: int = 7, source=None) -> None:
    """The legend (of ``source``'s lines, default ``ax``'s) to the right of ``ax``, never over data."""
    handles, labels = (source or ax).get_legend_handles_labels()
    if handles:
        ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=fontsize, frameon=False,
                  borderaxespad=0)


def note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, wrap=True, fontsize=9)
    ax.set_axis_off()
