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


WIDGET_MARK = "[interactive widget]"  # ends the stored text of every demo (tests look for it)


def _demo_box(children, label: str):
    """A VBox whose text form is `label` + WIDGET_MARK (what a notebook stores for it)."""
    import ipywidgets as widgets

    class Demo(widgets.VBox):
        def __repr__(self) -> str:
            return f"{label} {WIDGET_MARK}"

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


QUANT_TYPES = {"int4": "int4 absmax", "fp4": "FP4", "nf4": "NF4"}  # type -> label


def quantization_levels(quant_type: str) -> torch.Tensor:
    """The sorted values in [-1, 1] a block divided by its absmax is rounded to.

    "int4" is absmax int4 (k / 7 for k = -7..7, 15 levels); "fp4" and "nf4" are
    the 16-value codebooks of `lora_edu.quant`.
    """
    from lora_edu.quant import fp4_codebook, nf4_codebook

    if quant_type == "int4":
        return torch.arange(-7, 8) / 7
    if quant_type in ("fp4", "nf4"):
        code = fp4_codebook() if quant_type == "fp4" else nf4_codebook()
        return code.sort().values
    raise ValueError(f"quant_type must be one of {list(QUANT_TYPES)}, got {quant_type!r}")


def quantization_error(
    w: torch.Tensor, quant_type: str, blocksize: int
) -> tuple[torch.Tensor, float]:
    """Blockwise 4-bit quantization of `w`: its values divided by their block's absmax,
    and the relative error ||w - w_hat||^2 / ||w||^2 of the round trip."""
    from lora_edu import quant

    quantization_levels(quant_type)  # raises on an unknown type
    flat = w.reshape(-1).float()
    if quant_type == "int4":
        q, scales = quant.quantize_blockwise_absmax(flat, blocksize, bits=4)
        w_hat = quant.dequantize_blockwise_absmax(q, scales, blocksize)
    else:
        packed, state = quant.quantize_4bit(flat, quant_type, blocksize)
        w_hat = quant.dequantize_4bit(packed, state)
    scaled, _ = quant.scale_blocks(flat, blocksize)  # (n,) in [-1, 1]
    return scaled, float((flat - w_hat).pow(2).sum() / flat.pow(2).sum())


def _quantization_png(scaled: torch.Tensor, levels: torch.Tensor, title: str) -> bytes:
    """Histogram of `scaled` with the code levels as vertical lines, as PNG bytes."""
    from matplotlib.figure import Figure  # no pyplot: nothing shows up in the notebook

    fig = Figure(figsize=(6.4, 3.0), dpi=80)
    ax = fig.subplots()
    ax.hist(scaled.numpy(), bins=161, range=(-1, 1), density=True, color="0.75")
    for v in levels.tolist():
        ax.axvline(v, color="C3", lw=1)
    ax.set(xlabel="weight / absmax of its block", ylabel="density", xlim=(-1.05, 1.05))
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def quantization_explorer(w: torch.Tensor | None = None):
    """A blocksize slider and a type menu: the scaled weights, the code levels and the error.

    Args:
        w: the weights to quantize; by default 256 x 256 draws of N(0, 0.02^2).
    """
    import ipywidgets as widgets

    from lora_edu.quant import BLOCKSIZES_4BIT

    if w is None:
        w = torch.randn(256, 256, generator=torch.Generator().manual_seed(0)) * 0.02
    size = widgets.SelectionSlider(
        options=BLOCKSIZES_4BIT, value=64, description="blocksize", continuous_update=False
    )
    kind = widgets.Dropdown(
        options=[(label, key) for key, label in QUANT_TYPES.items()],
        value="nf4",
        description="type",
    )
    caption = widgets.Label()
    picture = widgets.Image(format="png", width=480)

    def update(change=None):
        scaled, rel = quantization_error(w, kind.value, size.value)
        bits = 4 + 32 / size.value  # 4-bit codes + one float32 absmax per block
        caption.value = (
            f"{QUANT_TYPES[kind.value]}, blocksize {size.value}: relative error {rel:.3g}, "
            f"{bits:.3g} bits per parameter"
        )
        picture.value = _quantization_png(scaled, quantization_levels(kind.value), caption.value)

    size.observe(update, names="value")
    kind.observe(update, names="value")
    update()
    return _demo_box(
        [size, kind, caption, picture],
        f"quantization explorer for {w.numel():,} weights (pick a blocksize and a type)",
    )


# Chapter 4: what alpha and r do to training, under Adam and under SGD.


def scaling_curves(
    task, alpha: float, r: int, lrs: dict[str, float], steps: int = 150, seed: int = 0
) -> dict[str, list[float]]:
    """Training-loss curves of one LoRA layer (rank r, lora_alpha alpha) on a `LinearShiftTask`.

    Args:
        task: the task; the layer starts from its W0, A is drawn with `seed`, B is zero.
        lrs: one learning rate per optimizer, e.g. {"adam": 1e-2, "sgd": 10.0}.
    Returns:
        {optimizer: losses}, the same data stream for every optimizer.
    """
    from lora_edu.experiments.dynamics import lora_student, train_lora

    return {
        opt: train_lora(lora_student(task, r, alpha, seed=seed), task, steps, lr, optimizer=opt)[
            "loss"
        ]
        for opt, lr in lrs.items()
    }


def _final(losses: list[float]) -> str:
    last = losses[-1]
    return "diverged" if not last < float("inf") else f"{last:.3g}"


def plot_scaling_curves(axes, curves: dict, label: str, reference: dict | None = None, **style):
    """Draw `curves` ({optimizer: losses}) on one axis per optimizer; `reference` in gray."""
    for ax, (opt, losses) in zip(axes, curves.items()):
        if reference is not None:
            ax.semilogy(reference[opt], color="0.6", lw=1.5, label="reference")
        ax.semilogy(losses, label=f"{label}: final {_final(losses)}", **style)
        ys = [y for line in ax.get_lines() for y in line.get_ydata() if 0 < y < float("inf")]
        # a diverging run leaves the plot through the top instead of squashing the others
        ax.set_ylim(min(ys) / 1.5, 3 * losses[0])
        ax.set(xlabel="step", ylabel="training loss", title=opt.upper() if opt == "sgd" else "Adam")
        ax.legend(fontsize=8)


def scaling_explorer(task, lrs: dict[str, float], steps: int = 150, reference=(16, 8)):
    """Sliders for alpha and r: loss curves under each optimizer, against a reference setting.

    Args:
        task: a `LinearShiftTask`.
        lrs: one learning rate per optimizer, kept fixed while alpha and r change.
        reference: (alpha, r) of the gray reference curves.
    """
    import ipywidgets as widgets
    from matplotlib.figure import Figure

    r_slider = widgets.IntSlider(value=8, min=1, max=64, description="r", continuous_update=False)
    a_slider = widgets.FloatLogSlider(
        value=16, base=2, min=0, max=8, description="alpha", continuous_update=False
    )
    caption = widgets.Label()
    picture = widgets.Image(format="png", width=640)
    ref = scaling_curves(task, *reference, lrs, steps)
    params = r_slider.value * (task.d_in + task.d_out)

    def update(change=None):
        r, alpha = r_slider.value, a_slider.value
        curves = scaling_curves(task, alpha, r, lrs, steps)
        fig = Figure(figsize=(8, 3.2), dpi=80)
        plot_scaling_curves(fig.subplots(1, len(lrs)), curves, f"alpha={alpha:g}, r={r}", ref)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        picture.value = buf.getvalue()
        finals = ", ".join(f"{opt} {_final(c)}" for opt, c in curves.items())
        caption.value = (
            f"r={r}, alpha={alpha:g}: s = alpha/r = {alpha / r:.3g}, "
            f"{r * (task.d_in + task.d_out):,} trainable parameters; final loss {finals}"
        )

    r_slider.observe(update, names="value")
    a_slider.observe(update, names="value")
    update()
    return _demo_box(
        [r_slider, a_slider, caption, picture],
        f"alpha and r explorer on a {task.d_out} x {task.d_in} layer, reference "
        f"alpha={reference[0]}, r={reference[1]} ({params:,} parameters; drag the sliders)",
    )
