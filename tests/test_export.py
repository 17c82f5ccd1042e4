"""The chapters are the source of the modules they teach (scripts/export_package.py), and
``qlora_edu.glue`` stores values as myst-nb's ``glue`` does."""

import json

import export_package
import nbformat
import pytest
from booktools import ROOT, notebook_paths

import qlora_edu
from qlora_edu.plotting import GluedText

# The modules whose every line is written in a chapter, and that chapter.
TAUGHT = {
    "qlora_edu/basics.py": "02_quantization_basics.ipynb",
    "qlora_edu/codebooks.py": "03_nf4.ipynb",
    "qlora_edu/quantize.py": "03_nf4.ipynb",
    "qlora_edu/double_quant.py": "04_double_quantization.ipynb",
    "qlora_edu/lora.py": "05_lora.ipynb",
    "qlora_edu/qlora.py": "06_qlora_linear.ipynb",
    "qlora_edu/model.py": "06_qlora_linear.ipynb",
    "qlora_edu/adapters.py": "06_qlora_linear.ipynb",
    "qlora_edu/paging.py": "07_paged_optimizers.ipynb",
    "qlora_edu/merge.py": "11_after_training.ipynb",
    "qlora_edu/loftq.py": "11_after_training.ipynb",
}


def test_committed_modules_equal_the_chapters_saved_cells():
    assert export_package.stale() == [], "run `make save` (scripts/export_package.py)"


@pytest.mark.parametrize("module", sorted(TAUGHT))
def test_taught_module_is_written_in_its_chapter(module):
    rendered = export_package.render()
    assert module in rendered, f"no # @save cell of {TAUGHT[module]} writes {module}"
    assert TAUGHT[module] in rendered[module].splitlines()[0]


def test_no_module_claims_a_chapter_that_does_not_write_it():
    claimed = {
        str(path.relative_to(ROOT))
        for path in (ROOT / "qlora_edu").glob("*.py")
        if path.read_text().startswith("# Written in notebooks/")
    }
    assert claimed == set(export_package.render())


def test_a_changed_saved_cell_is_found(tmp_path, monkeypatch):
    """Edit one saved line in a copy of the chapter: the check must name the module."""
    source = ROOT / "notebooks" / TAUGHT["qlora_edu/basics.py"]
    nb = nbformat.read(source, as_version=4)
    cell = next(c for c in nb.cells if c.source.startswith("# @save qlora_edu/basics.py"))
    cell.source = cell.source.replace("import torch", "import torch  # edited", 1)
    copy = tmp_path / source.name
    nbformat.write(nb, copy)
    others = [p for p in notebook_paths() if p.name != source.name]
    monkeypatch.setattr(export_package, "notebook_paths", lambda: sorted([copy, *others]))
    assert export_package.stale() == ["qlora_edu/basics.py"]


def test_glue_stores_what_myst_nb_glue_stores(monkeypatch):
    import IPython.display
    import myst_nb.ext.glue

    shown = []

    def capture(*args, **kwargs):
        shown.append(json.dumps([args, kwargs], sort_keys=True, default=str))

    monkeypatch.setattr(IPython.display, "display", capture)
    monkeypatch.setattr(myst_nb.ext.glue, "ipy_display", capture)
    for value in (0.125, [1, 2], GluedText("9.54")):
        qlora_edu.glue("name", value)
        myst_nb.ext.glue.glue("name", value, display=False)
        ours, theirs = shown[-2:]
        assert ours == theirs
    qlora_edu.glue("name", "9.54")  # a string is shown without quotes
    assert '"application/papermill.record/text/plain": "9.54"' in shown[-1]
