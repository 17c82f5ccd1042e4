"""The five diagrams draw what their chapters say (qlora_edu.diagrams)."""

import pytest

from qlora_edu import diagrams


def texts(fig):
    return " ".join(t.get_text() for ax in fig.axes for t in [*ax.texts, ax.title])


def test_packing_shows_the_bytes_high_nibble_first():
    shown = texts(diagrams.nibble_packing((15, 0, 7, 12)))
    assert "byte 0xF0 = 1111 0000" in shown and "byte 0x7C = 0111 1100" in shown


@pytest.mark.parametrize("blocksize, bits", [(64, "4.127"), (128, "4.063")])
def test_double_quant_layout_counts_the_bits(blocksize, bits):
    shown = texts(diagrams.double_quant_layout(blocksize))
    assert f"{bits} bits per parameter at blocksize {blocksize}" in shown


@pytest.mark.parametrize("name", ["lora_path", "dequantize_twice", "paging"])
def test_every_diagram_has_a_title_and_boxes(name):
    fig = getattr(diagrams, name)()
    assert fig.axes[0].get_title() and len(fig.axes[0].patches) >= 5
