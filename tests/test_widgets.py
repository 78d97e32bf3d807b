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
    assert repr(demo) == "rank explorer for a 40 x 30 image (drag the slider)"
