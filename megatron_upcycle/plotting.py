"""The two matplotlib helpers every plot of the project uses: a figure without pyplot's
global state, and a PNG written under a temporary name then renamed."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from megatron_upcycle.atomic import current_umask


def figure(width: float = 6.4, height: float = 4.8):
    from matplotlib.figure import Figure  # no pyplot: no global state, no display

    return Figure(figsize=(width, height), layout="constrained")


def save_png(fig, path: Path) -> Path:
    """Never a half-written plot: drawn into a temporary file beside ``path``, then renamed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = Path(path)
    FigureCanvasAgg(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp creates 0600; a plot is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
