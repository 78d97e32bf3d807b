"""lora_edu.widgets: the demos react to their controls and store one stable line of text."""

import torch

from lora_edu.widgets import rank_explorer


def test_rank_explorer_redraws_and_reports_the_error_of_the_chosen_rank():
    torch.manual_seed(0)
    image = torch.rand(40, 30)
    demo = rank_explorer(image, max_rank=20)
    slider, caption, picture = demo.children
    first_png, first_text = bytes(picture.value), caption.value
    assert first_png.startswith(b"\x89PNG") and first_text.startswith("rank 10:")
    slider.value = 3
    approx = torch.linalg.svd(image)
    err = (image - (approx[0][:, :3] * approx[1][:3]) @ approx[2][:3]).norm() / image.norm()
    assert caption.value.startswith(f"rank 3: relative error {err:.3f}")
    assert bytes(picture.value) != first_png
    assert repr(demo) == "rank explorer for a 40 x 30 image (drag the slider) [interactive widget]"


def test_delta_weight_image_has_rank_r_and_shrinks_like_one_over_sqrt_r():
    from lora_edu.widgets import delta_weight_image

    norms = {}
    for r in [1, 4, 16, 64]:
        delta, n = delta_weight_image(r=r, alpha=16, d=64, k=48)
        assert n == r * (64 + 48)
        assert torch.linalg.matrix_rank(delta).item() == min(r, 48)
        norms[r] = delta.norm().item()
    # random factors: |BA| grows like sqrt(r), so (alpha / r)|BA| falls like 1/sqrt(r)
    assert 0.5 < (norms[1] / norms[64]) / 8 < 2


def test_lora_explorer_reacts_to_both_sliders():
    from lora_edu.widgets import lora_explorer

    demo = lora_explorer(d=32, k=32)
    r_slider, a_slider, caption, picture = demo.children
    before = bytes(picture.value)
    r_slider.value = 2
    assert caption.value.startswith("r=2, alpha=16: scaling 8,") and bytes(picture.value) != before
    a_slider.value = 4
    assert caption.value.startswith("r=2, alpha=4: scaling 2,")
