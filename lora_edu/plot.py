"""Figure helpers for the book (matplotlib is imported lazily, inside each function).

Figures are PNG (stored notebook outputs compare as text; SVG would not be stable).
"""

from __future__ import annotations

import torch


def _plt():
    import matplotlib.pyplot as plt

    return plt


def book_style() -> None:
    """One look for every figure of the book: PNG at 100 dpi, light grid, readable fonts."""
    plt = _plt()
    plt.rcParams.update(
        {
            "figure.dpi": 100,
            "savefig.dpi": 100,
            "figure.figsize": (7.0, 3.4),
            "axes.grid": True,
            "grid.alpha": 0.3,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "font.size": 10,
            "legend.frameon": False,
        }
    )


def image_row(images, titles, cmap: str = "gray", width: float = 2.3):
    """Show 2-D tensors side by side with titles; returns the figure."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(images), figsize=(width * len(images), width * 1.3))
    for ax, img, title in zip(axes, images, titles):
        ax.imshow(torch.as_tensor(img).clamp(0, 1).numpy(), cmap=cmap, vmin=0, vmax=1)
        ax.set_title(title, fontsize=12)
        ax.axis("off")
    fig.tight_layout()
    return fig
