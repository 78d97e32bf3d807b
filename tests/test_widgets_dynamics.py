"""lora_edu.widgets, chapter 4: the alpha-and-r curves and the explorer that redraws them."""

import math

import matplotlib

matplotlib.use("Agg")

from lora_edu.experiments import LinearShiftTask  # noqa: E402
from lora_edu.widgets import WIDGET_MARK, plot_scaling_curves, scaling_curves  # noqa: E402

TASK = LinearShiftTask.decaying(16, 16, power=1.0, seed=0)
LRS = {"adam": 1e-2, "sgd": 2.0}


def test_scaling_curves_gives_one_reproducible_curve_per_optimizer():
    a = scaling_curves(TASK, alpha=4, r=2, lrs=LRS, steps=6)
    b = scaling_curves(TASK, alpha=4, r=2, lrs=LRS, steps=6)
    assert list(a) == ["adam", "sgd"] and all(len(c) == 6 for c in a.values())
    assert a == b  # same seed, same data stream
    assert a["adam"][-1] < a["adam"][0]  # it learns


def test_sgd_with_a_huge_scale_diverges_and_is_reported_so():
    curves = scaling_curves(TASK, alpha=256, r=1, lrs={"sgd": 50.0}, steps=30)
    assert not math.isfinite(curves["sgd"][-1])
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    plot_scaling_curves([ax], curves, "alpha=256, r=1")
    assert ax.get_legend().get_texts()[0].get_text() == "alpha=256, r=1: final diverged"
    plt.close(fig)


def test_scaling_explorer_redraws_on_both_sliders_and_stores_one_line():
    from lora_edu.widgets import scaling_explorer

    demo = scaling_explorer(TASK, LRS, steps=5, reference=(16, 8))
    r_slider, a_slider, caption, picture = demo.children
    first = bytes(picture.value)
    assert first.startswith(b"\x89PNG") and caption.value.startswith("r=8, alpha=16: s = ")
    r_slider.value = 2
    assert caption.value.startswith("r=2, alpha=16: s = alpha/r = 8,")
    assert "64 trainable parameters" in caption.value  # r (d_in + d_out) = 2 * 32
    assert bytes(picture.value) != first
    a_slider.value = 4
    assert caption.value.startswith("r=2, alpha=4: s = alpha/r = 2,")
    assert repr(demo).endswith(WIDGET_MARK) and "16 x 16 layer" in repr(demo)
