"""matplotlib without a display, and PNGs written atomically (eval reports, the split's rate histogram)."""
from __future__ import annotations

import io

from kardia_rl.utils.io import atomic_open


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed on cluster nodes)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str) -> None:
    """Render a matplotlib figure to PNG in memory, then write it atomically; closes the figure."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)
    with atomic_open(path, "wb") as f:
        f.write(buf.getvalue())
