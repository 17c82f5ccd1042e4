"""How the chapters show results: one figure style (every chapter calls :func:`use_book_style`
once) and :func:`glue`, which hands a computed value to the prose around it."""

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
    """The book's settings for what a chapter prints: matplotlib's style (sizes, grid, no top and
    right spines), and no progress bars or deprecation notices from transformers, whose timings
    would change every run (tqdm's notice that Jupyter widgets are missing included)."""
    mpl.rcParams.update(BOOK_STYLE)
    warnings.filterwarnings("ignore", message="IProgress not found")
    warnings.filterwarnings("ignore", message=".*is deprecated and will be removed in v6")
    try:
        from transformers.utils import logging as transformers_logging
    except ImportError:
        return
    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()


GIB = 1024**3
GB = 1000**3


GLUE_PREFIX = "application/papermill.record/"


class GluedText(str):
    """A string that displays as itself, without the quotes of its ``repr``."""

    def __repr__(self) -> str:
        return str(self)


def glue(name: str, value: object) -> None:
    """Store ``value`` under ``name`` for the prose to show with MyST's ``{glue:}`name``` role.

    The protocol of ``myst_nb.glue(name, value, display=False)`` (tests/test_export.py checks that
    they agree), without needing myst-nb where a notebook runs: on Colab, say. A string is shown as
    it is, without quotes, so a cell can glue a number formatted as the sentence needs it. The cell
    shows nothing; the built book puts the value where the text asks for it, so a number in a
    sentence is the number the code computed.
    """
    from IPython.core.formatters import format_display_data  # in every Jupyter kernel
    from IPython.display import display

    if isinstance(value, str):
        value = GluedText(value)
    bundle, metadata = format_display_data(value)
    metadata["scrapbook"] = {"name": name, "mime_prefix": GLUE_PREFIX}
    display({GLUE_PREFIX + k: v for k, v in bundle.items()}, raw=True, metadata=metadata)
