"""`make slides`: one reveal.js deck per chapter, from its notebook and stored outputs.

The cells are chosen here, not tagged by hand in the chapters: a slide per section heading (the
title slide with the learning objectives, the summary in full), and after it the section's
displayed equations, its figures and its asserted results (with their code when it is short).
Exercises, solutions and every other cell are left out.
Writes _build/slides/<chapter>.slides.html, with reveal.js (from the sphinx-revealjs package)
copied beside the decks so that they open offline.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import nbformat
import sphinx_revealjs
from booktools import ROOT, notebook_paths, solution_parts
from nbconvert import SlidesExporter
from nbconvert.preprocessors import TagRemovePreprocessor

OUT = ROOT / "_build" / "slides"
REVEAL = Path(sphinx_revealjs.__file__).parent / "_static" / "revealjs"
TEMPLATE = Path(__file__).parent / "slides_template"  # nbconvert's reveal, offline
SHOWN_IN_FULL = ("Summary",)
OBJECTIVES = re.compile(
    r"```\{admonition\} Learning objectives\n(?::class:[^\n]*\n)?(.*?)```", re.S
)


def glued(nb) -> dict[str, str]:
    """The values the chapter glues into its prose, by name."""
    return {
        o["metadata"]["scrapbook"]["name"]: o["data"]["application/papermill.record/text/plain"]
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
        if "scrapbook" in o.get("metadata", {})
    }


def plain_markdown(text: str, values: dict[str, str]) -> str:
    """MyST roles as plain Markdown: glued numbers filled in, terms as text, citations dropped."""
    text = re.sub(r"\{glue:\}`(\w+)`", lambda m: values.get(m[1], m[1]).strip("'"), text)
    text = re.sub(r"\s*\{cite(:\w+)?\}`[^`]*`", "", text)
    text = re.sub(r"\{term\}`([^`<]*?)\s*(<[^`]*>)?`", r"\1", text)
    return re.sub(r"\{\w+\}`([^`]*)`", r"\1", text)


def is_result(cell) -> bool:
    """A code cell whose printed output its asserts check, short enough for a slide."""
    text = "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")
    return "assert " in cell.source and 0 < len(text.splitlines()) <= 12


def slide_cells(nb) -> list:
    values, cells, exercises = glued(nb), [], False
    parts = solution_parts(nb)
    for cell, part in zip(nb.cells[1:], parts[1:], strict=True):  # not the Colab setup cell
        if any(inside for _, inside in part):
            continue
        if cell.cell_type == "markdown":
            headings = re.findall(r"^#{1,3} .+$", cell.source, re.M)
            exercises = exercises or "## Exercises" in headings
            if any(h.lstrip("# ").startswith(SHOWN_IN_FULL) for h in headings):
                text = cell.source[cell.source.index(headings[0]) :]
                cells.append(("slide", plain_markdown(text, values)))
            elif headings and not exercises:
                objectives = [
                    f"**Learning objectives**\n\n{m}" for m in OBJECTIVES.findall(cell.source)
                ]
                text = "\n\n".join(headings + objectives)
                cells.append(("slide", plain_markdown(text, values)))
            equations = re.findall(r"^\$\$.+?^\$\$.*$", cell.source, re.M | re.S)
            if equations and not exercises:
                cells.append(("subslide", "\n\n".join(equations)))
        elif not exercises and cell.cell_type == "code":
            figure = any("image/png" in o.get("data", {}) for o in cell.outputs)
            if figure or is_result(cell):
                cells.append(("subslide", cell))
    return cells


def deck(path: Path) -> nbformat.NotebookNode:
    nb = nbformat.read(path, as_version=4)
    out = nbformat.v4.new_notebook(metadata=nb.metadata)
    for slide_type, content in slide_cells(nb):
        if isinstance(content, str):
            cell = nbformat.v4.new_markdown_cell(content)
        else:
            cell = nbformat.from_dict(content)
            short = len(cell.source.splitlines()) <= 12  # a short computation shows with its result
            cell.metadata = {"tags": [] if short else ["remove-input"]}
            cell.outputs = [o for o in cell.outputs if "scrapbook" not in o.get("metadata", {})]
        cell.metadata["slideshow"] = {"slide_type": slide_type}
        out.cells.append(cell)
    return out


def main() -> None:
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    for part in ("dist", "plugin"):
        shutil.copytree(REVEAL / part, OUT / "reveal.js" / part)
    exporter = SlidesExporter(
        extra_template_basedirs=[str(TEMPLATE.parent)],
        template_name=TEMPLATE.name,
        reveal_url_prefix="reveal.js",
    )
    exporter.register_preprocessor(
        TagRemovePreprocessor(remove_input_tags={"remove-input"}), enabled=True
    )
    for path in notebook_paths():
        html, _ = exporter.from_notebook_node(
            deck(path), resources={"metadata": {"name": path.stem}}
        )
        (OUT / f"{path.stem}.slides.html").write_text(html)
        print(f"{(OUT / path.stem).relative_to(ROOT)}.slides.html")


if __name__ == "__main__":
    main()
