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


def delta_weight_image(r: int, alpha: float, d: int = 64, k: int = 64, seed: int = 0):
    """A LoRA update s·B A with random factors, and its trainable parameter count r(d + k).

    A is drawn as PEFT does (Kaiming-uniform, a=√5) and B with std 0.5, as if after
    training; the factors for rank r are the first r of a fixed draw, so sliding r
    adds outer products to the same update.
    """
    import math

    g = torch.Generator().manual_seed(seed)
    bound = 1 / math.sqrt(k)  # kaiming_uniform_(a=√5) on an (r, k) matrix
    a = (torch.rand(256, k, generator=g) * 2 - 1) * bound  # (256, k), rows 0..r-1 used
    b = torch.randn(d, 256, generator=g) * 0.5  # (d, 256)
    delta = (alpha / r) * b[:, :r] @ a[:r]  # (d, k)
    return delta, r * (d + k)


def lora_explorer(d: int = 64, k: int = 64):
    """Sliders for r and α: the update s·B A as an image, its norm and the parameter count."""
    import ipywidgets as widgets
    import matplotlib.pyplot as plt

    r_slider = widgets.IntSlider(value=8, min=1, max=64, description="r", continuous_update=False)
    a_slider = widgets.FloatLogSlider(
        value=16, base=2, min=0, max=8, description="alpha", continuous_update=False
    )
    caption = widgets.Label()
    picture = widgets.Image(format="png", width=320)

    def update(change=None):
        delta, n = delta_weight_image(r_slider.value, a_slider.value, d, k)
        caption.value = (
            f"r={r_slider.value}, alpha={a_slider.value:g}: scaling "
            f"{a_slider.value / r_slider.value:.3g}, {n:,} trainable parameters, "
            f"|delta W| = {delta.norm():.3f}"
        )
        buf = io.BytesIO()
        plt.imsave(
            buf, delta.clamp(-0.5, 0.5).numpy(), cmap="RdBu", vmin=-0.5, vmax=0.5, format="png"
        )
        picture.value = buf.getvalue()

    r_slider.observe(update, names="value")
    a_slider.observe(update, names="value")
    update()
    return _demo_box(
        [r_slider, a_slider, caption, picture],
        f"LoRA update explorer for a {d} x {k} layer (drag the sliders)",
    )
