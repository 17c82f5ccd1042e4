"""The book's five diagrams, drawn with matplotlib so that they live beside the code they explain.

- :func:`lora_path`: LoRA's parallel path beside the frozen weight (Chapter 5);
- :func:`nibble_packing`: two 4-bit codes per byte, the first in the high nibble (Chapter 3);
- :func:`double_quant_layout`: 4-bit codes, 8-bit absmax codes, float32 absmax2 and offset
  (Chapter 4);
- :func:`dequantize_twice`: the 4-bit layer's forward and backward passes, each dequantizing the
  weight and keeping only the packed bytes in between (Chapter 6);
- :func:`paging`: pages of optimizer state moving between the device and the host (Chapter 7).

Each returns the figure; a chapter shows it with ``plt.show()``.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.patches import FancyBboxPatch, Patch

FROZEN, TRAINED, DATA, MOVED = "#dddddd", "#9ecae1", "#fdd0a2", "#c7e9c0"


def _canvas(width: float, height: float) -> tuple[Figure, plt.Axes]:
    fig, ax = plt.subplots(figsize=(width, height))
    ax.set_xlim(0, width)
    ax.set_ylim(0, height)
    ax.axis("off")
    return fig, ax


def _box(ax, x, y, w, h, text, color=FROZEN, size=9):
    """A rounded box with its lower left corner at (x, y), the text centred in it."""
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02", fc=color, ec="0.3"))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=size)


def _arrow(ax, start, end, text="", color="0.2", style="-|>"):
    ax.annotate(
        "", xy=end, xytext=start, arrowprops={"arrowstyle": style, "color": color, "lw": 1.2}
    )
    if text:
        mid = ((start[0] + end[0]) / 2, (start[1] + end[1]) / 2 + 0.12)
        ax.text(*mid, text, ha="center", va="bottom", fontsize=8, color=color)


def lora_path() -> Figure:
    """y = W x + (alpha / r) B (A x): the frozen weight and the trainable low-rank path."""
    fig, ax = _canvas(7.0, 2.6)
    _box(ax, 0.1, 1.0, 0.7, 0.6, "x\n(in)", DATA)
    _box(ax, 1.6, 1.75, 2.2, 0.6, "W  (out x in)\nfrozen", FROZEN)
    _box(ax, 1.6, 0.2, 1.0, 0.6, "A  (r x in)\ntrained", TRAINED)
    _box(ax, 2.9, 0.2, 1.0, 0.6, "B  (out x r)\ntrained", TRAINED)
    _box(ax, 4.4, 0.2, 0.8, 0.6, "x alpha / r", TRAINED, size=8)
    ax.text(5.75, 1.3, "+", fontsize=18, ha="center", va="center")
    _box(ax, 6.2, 1.0, 0.7, 0.6, "y\n(out)", DATA)
    _arrow(ax, (0.8, 1.45), (1.6, 2.05))
    _arrow(ax, (0.8, 1.15), (1.6, 0.5))
    _arrow(ax, (2.6, 0.5), (2.9, 0.5))
    ax.text(2.75, 0.02, "r values", ha="center", fontsize=8)
    _arrow(ax, (3.9, 0.5), (4.4, 0.5))
    _arrow(ax, (3.8, 2.05), (5.6, 1.45))
    _arrow(ax, (5.2, 0.5), (5.6, 1.15))
    _arrow(ax, (5.9, 1.3), (6.2, 1.3))
    ax.set_title("LoRA: a low-rank path beside the frozen weight (B starts at zero)")
    return fig


def nibble_packing(codes: tuple[int, ...] = (15, 0, 7, 12)) -> Figure:
    """Two 4-bit codes per byte: ``byte = first << 4 | second``."""
    pairs = len(codes) // 2
    fig, ax = _canvas(1.0 + 3.0 * pairs, 2.4)
    for i, code in enumerate(codes):
        x = 0.5 + 1.5 * i
        _box(ax, x, 1.5, 1.2, 0.6, f"code {code}\n{code:04b}", DATA)
    for j in range(pairs):
        high, low = codes[2 * j], codes[2 * j + 1]
        x = 0.5 + 3.0 * j
        byte = high << 4 | low
        _box(ax, x, 0.2, 2.7, 0.6, f"byte 0x{byte:02X} = {high:04b} {low:04b}", FROZEN)
        _arrow(ax, (x + 0.6, 1.5), (x + 0.75, 0.8))
        _arrow(ax, (x + 2.1, 1.5), (x + 1.95, 0.8))
        ax.text(x + 0.8, 1.15, "high nibble", fontsize=8)
        ax.text(x + 1.9, 1.15, "low nibble", fontsize=8, ha="right")
    ax.set_title("Packing: the first code of each pair in the high nibble")
    return fig


def double_quant_layout(blocksize: int = 64, blocksize2: int = 256) -> Figure:
    """What double quantization stores, level by level, with its bits per parameter."""
    fig, ax = _canvas(7.2, 3.0)
    rows = [
        (2.2, "weights", "4-bit codes, one per weight, packed two per byte", "4", DATA),
        (
            1.3,
            f"blocks of {blocksize}",
            "uint8 absmax code, one per block",
            f"8/{blocksize}",
            TRAINED,
        ),
        (
            0.4,
            f"groups of {blocksize2} blocks",
            "float32 absmax2, one per group; one float32 offset",
            f"32/({blocksize}x{blocksize2})",
            FROZEN,
        ),
    ]
    for y, what, stored, bits, color in rows:
        ax.text(0.1, y + 0.3, what, fontsize=9, va="center")
        _box(ax, 1.9, y, 3.9, 0.6, stored, color, size=8)
        ax.text(6.0, y + 0.3, f"{bits} bits", fontsize=9, va="center")
    _arrow(ax, (3.85, 2.2), (3.85, 1.9), style="<|-")
    _arrow(ax, (3.85, 1.3), (3.85, 1.0), style="<|-")
    ax.text(4.0, 2.0, "scaled by", fontsize=8)
    ax.text(4.0, 1.1, "scaled by, after the offset", fontsize=8)
    total = 4 + 8 / blocksize + 32 / (blocksize * blocksize2)
    ax.set_title(f"Double quantization: {total:.3f} bits per parameter at blocksize {blocksize}")
    return fig


def dequantize_twice() -> Figure:
    """The 4-bit layer's autograd function: dequantize in forward, again in backward."""
    fig, ax = _canvas(7.4, 3.0)
    _box(ax, 0.1, 1.2, 1.3, 0.6, "packed bytes\n+ QuantState", FROZEN, size=8)
    for y, label, op, result in (
        (2.2, "forward", "x W^T + b", "y"),
        (0.2, "backward", "grad_y W", "grad_x"),
    ):
        ax.text(1.7, y + 0.68, label, fontsize=9, weight="bold")
        _box(ax, 1.7, y, 1.4, 0.6, "dequantize", MOVED, size=8)
        _box(ax, 3.4, y, 1.2, 0.6, "W (dense)\nfreed after", DATA, size=8)
        _box(ax, 4.9, y, 1.3, 0.6, op, TRAINED, size=8)
        _box(ax, 6.5, y, 0.8, 0.6, result, DATA, size=8)
        _arrow(ax, (1.4, 1.5), (1.7, y + 0.3))
        _arrow(ax, (3.1, y + 0.3), (3.4, y + 0.3))
        _arrow(ax, (4.6, y + 0.3), (4.9, y + 0.3))
        _arrow(ax, (6.2, y + 0.3), (6.5, y + 0.3))
    ax.text(3.4, 1.45, "kept between the passes: the packed bytes and x, no dense W", fontsize=8)
    ax.set_title("The 4-bit layer: the weight is dequantized twice and never kept")
    return fig


def paging(capacity_pages: int = 10) -> Figure:
    """A memory spike: activations need room, least recently used state pages go to the host
    and come back for the update."""
    fig, ax = _canvas(7.4, 3.2)
    steps = [
        ("before the spike", 4, 4, 0, 0),
        ("spike: activations", 4, 2, 4, 2),
        ("update: state back", 4, 4, 0, 0),
    ]
    for i, (title, fixed, state, activations, on_host) in enumerate(steps):
        x = 0.3 + 2.45 * i
        ax.text(x + 0.9, 2.9, title, ha="center", fontsize=9, weight="bold")
        slots = ["weights"] * fixed + ["state"] * state + ["activations"] * activations
        slots += [""] * (capacity_pages - len(slots))
        for k, kind in enumerate(slots):
            color = {"weights": FROZEN, "state": TRAINED, "activations": DATA}.get(kind, "white")
            ax.add_patch(
                FancyBboxPatch(
                    (x, 0.9 + 0.18 * k), 1.8, 0.15, boxstyle="square,pad=0", fc=color, ec="0.5"
                )
            )
        ax.text(x + 0.9, 0.7, "device", ha="center", fontsize=8)
        for k in range(on_host):
            ax.add_patch(
                FancyBboxPatch(
                    (x + 0.4 + 0.5 * k, 0.15),
                    0.4,
                    0.25,
                    boxstyle="square,pad=0",
                    fc=TRAINED,
                    ec="0.5",
                )
            )
        ax.text(x + 1.8, 0.25, "host" if on_host else "", fontsize=8)
    _arrow(ax, (2.0, 1.8), (2.75, 0.35), "evicted", color="C3")
    _arrow(ax, (4.6, 0.35), (5.3, 1.8), "paged in", color="C2")
    kinds = {"weights (fixed)": FROZEN, "optimizer state (paged)": TRAINED, "activations": DATA}
    handles = [Patch(fc=color, ec="0.5", label=label) for label, color in kinds.items()]
    ax.set_ylim(-0.5, 3.2)  # room for the legend under the first device
    ax.legend(handles=handles, loc="lower left", fontsize=8, frameon=False, ncol=3)
    ax.set_title("Paged optimizer state makes room for a spike and comes back for the update")
    return fig
