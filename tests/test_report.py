"""Glued values come back in the book exactly as the notebook formatted them."""

import ast

import pytest

myst_nb = pytest.importorskip("myst_nb")

from lora_edu.experiments import glue, sig  # noqa: E402


@pytest.mark.parametrize("text", ["4,100", "9.0e-08", "4.000", "97,600", "0.1915", "1e-2"])
def test_a_glued_string_reads_back_as_the_same_text(text, monkeypatch):
    stored = {}
    monkeypatch.setattr(myst_nb, "glue", lambda name, value, display: stored.update(v=value))
    glue("x", text)
    # myst-nb stores repr(value) as text/plain and renders literal_eval of it
    assert str(ast.literal_eval(repr(stored["v"]))) == text


def test_sig_rounds_to_significant_figures_not_decimals():
    assert sig(0.000123456) == 0.000123
    assert sig(123456) == 123000
    assert sig(-0.98765, 2) == -0.99
