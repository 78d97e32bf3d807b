"""Interactive demos for Jupyter and Colab (ipywidgets is imported lazily).

Each widget has a static figure beside it in the book, because a website cannot
run the Python behind a slider. The demos draw into an `Image` widget (no
`Output` widget), so executing a notebook stores one stable line of text for them.
"""

from __future__ import annotations

import io

import torch

from lora_edu.linalg import low_rank_approx


def _png(gray: torch.Tensor) -> bytes:
    """A grayscale image in [0, 1] as PNG bytes."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    plt.imsave(buf, gray.clamp(0, 1).numpy(), cmap="gray", vmin=0, vmax=1, format="png")
    return buf.getvalue()


def _demo_box(children, label: str):
    """A VBox whose text form is `label` (what a notebook stores for it)."""
    import ipywidgets as widgets

    class Demo(widgets.VBox):
        def __repr__(self) -> str:
            return label

    return Demo(children)


def rank_explorer(image: torch.Tensor, max_rank: int = 100):
    """A rank slider: the best rank-r approximation of a grayscale image and its error."""
    import ipywidgets as widgets

    h, w = image.shape
    slider = widgets.IntSlider(
        value=10, min=1, max=max_rank, description="rank", continuous_update=False
    )
    caption = widgets.Label()
    picture = widgets.Image(format="png", width=min(w, 400))

    def update(change=None):
        r = slider.value
        approx = low_rank_approx(image, r)
        err = float((image - approx).norm() / image.norm())
        caption.value = f"rank {r}: relative error {err:.3f}, storage {r * (h + w) / (h * w):.1%}"
        picture.value = _png(approx)

    slider.observe(update, names="value")
    update()
    return _demo_box(
        [slider, caption, picture], f"rank explorer for a {h} x {w} image (drag the slider)"
    )
