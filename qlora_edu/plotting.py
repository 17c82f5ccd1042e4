"""One figure style for the whole book: every chapter calls :func:`use_book_style` once."""

from __future__ import annotations

import warnings

import matplotlib as mpl

BOOK_STYLE = {
    "figure.figsize": (7.0, 3.6),
    "figure.dpi": 100,
    "savefig.dpi": 100,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "legend.fontsize": 9,
    "font.size": 10,
    "svg.hashsalt": "qlora-from-scratch",
}


def use_book_style() -> None:
    """Apply the book's matplotlib settings (sizes, grid, no top/right spines), and silence tqdm's
    notice that Jupyter widgets are missing (transformers imports tqdm; the book shows no bars)."""
    mpl.rcParams.update(BOOK_STYLE)
    warnings.filterwarnings("ignore", message="IProgress not found")


GIB = 1024**3
GB = 1000**3
