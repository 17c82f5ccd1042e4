"""The book's platform: notebooks, table of contents, setup cells, exercises, environments."""

import re

import nbformat
import pytest
import tomllib
import yaml
from booktools import (
    ROOT,
    colab_url,
    declared_floors,
    notebook_paths,
    setup_cell_source,
    strip_solutions,
    toc_files,
)
from packaging.version import Version

NOTEBOOKS = notebook_paths()
INSTRUCTORS = (ROOT / "book" / "instructors.md").read_text()
NB_IDS = [p.name for p in NOTEBOOKS]


def read(path):
    return nbformat.read(path, as_version=4)


def test_toc_and_notebooks_list_the_same_chapters():
    in_toc = {f for f in toc_files() if f.startswith("notebooks/")}
    on_disk = {f"notebooks/{p.stem}" for p in NOTEBOOKS}
    assert in_toc == on_disk
    for f in toc_files():
        assert (ROOT / f).with_suffix(".md").exists() or (ROOT / f).with_suffix(".ipynb").exists()


def test_notebooks_are_numbered_in_reading_order():
    chapters = [f for f in toc_files() if f.startswith("notebooks/")]
    numbers = [int(re.match(r"notebooks/(\d+)_", f).group(1)) for f in chapters]
    assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=NB_IDS)
def test_stored_outputs_come_from_one_clean_run(path):
    code = [c for c in read(path).cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1))
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, "a stored output is an error"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=NB_IDS)
def test_stored_outputs_name_no_local_paths(path):
    texts = [
        o.get("text", "") + str(o.get("data", {}).get("text/plain", ""))
        for c in read(path).cells
        if c.cell_type == "code"
        for o in c.outputs
    ]
    leaks = [t for t in texts if re.search(r"site-packages|/home/|/root/|/tmp/|/work/", t)]
    assert not leaks, leaks[0][:200]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=NB_IDS)
def test_first_cell_is_the_colab_setup_cell(path):
    nb = read(path)
    assert nb.cells[0].cell_type == "code"
    assert nb.cells[0].source == setup_cell_source()
    assert "remove-cell" in nb.cells[0].metadata.get("tags", [])  # not shown in the web book
    assert nb.metadata["kernelspec"]["name"] == "python3"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=NB_IDS)
def test_output_markers_carry_a_reason_and_nothing_is_skipped(path):
    for cell in read(path).cells[1:]:
        if cell.cell_type != "code":
            continue
        assert "NBVAL_SKIP" not in cell.source, "only the Colab setup cell may be skipped"
        lines = cell.source.splitlines()
        for i, line in enumerate(lines):
            if "NBVAL_IGNORE_OUTPUT" in line or "NBVAL_CHECK_OUTPUT" in line:
                # nbval needs the marker alone on its line; the reason is the comment below it
                assert line.strip() in ("# NBVAL_IGNORE_OUTPUT", "# NBVAL_CHECK_OUTPUT"), line
                reason = lines[i + 1].strip() if i + 1 < len(lines) else ""
                assert reason.startswith("#") and len(reason) > 12, f"no reason given: {line!r}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=NB_IDS)
def test_every_chapter_has_objectives_three_exercises_with_solutions_and_a_summary(path):
    nb = read(path)
    markdown = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    assert "Learning objectives" in markdown
    assert "## Summary" in markdown
    exercises = re.findall(r"```\{exercise\}\n:label: (\S+)", markdown)
    solved = re.findall(r"```\{solution-start\} (\S+)", markdown)
    assert len(exercises) >= 3
    assert sorted(exercises) == sorted(solved)
    student = strip_solutions(nb)
    assert all("solution-" not in c.source for c in student.cells)
    assert len(student.cells) < len(nb.cells)


# A solution, from its opening fence to its closing one, in the text of a whole notebook.
SOLUTION = re.compile(r"^```\{solution-start\}.*?^```\{solution-end\}\n```$", re.M | re.S)


def _lines(text):
    return [line for line in text.splitlines() if line.strip()]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=NB_IDS)
def test_student_edition_removes_the_solutions_and_nothing_else(path):
    """The student edition has, in order, every line of the chapter outside its solutions
    (headings, exercises, summaries, setup) and no line inside them; a cell outside every solution
    is there unchanged (a code cell with its outputs), and only a cell that shares its text with a
    solution is cut."""
    nb = read(path)
    student = strip_solutions(nb)
    full = "\n".join(c.source for c in nb.cells)
    assert len(SOLUTION.findall(full)) == full.count("```{solution-start}") >= 3
    assert _lines("\n".join(c.source for c in student.cells)) == _lines(SOLUTION.sub("", full))
    outside, depth = [], 0
    for cell in nb.cells:
        if depth == 0 and "{solution-" not in cell.source:
            outside.append(cell)
        depth += cell.source.count("```{solution-start}") - cell.source.count("```{solution-end}")
    assert [c for c in student.cells if c in outside] == outside
    assert all(c in outside or c.cell_type == "markdown" for c in student.cells)


def test_colab_links_derive_from_the_repository_url():
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    url = config["repository"]["url"]
    assert url.startswith("https://github.com/")
    assert config["launch_buttons"]["colab_url"] == "https://colab.research.google.com"
    assert colab_url("notebooks/01_memory_wall.ipynb") == (
        f"https://colab.research.google.com/github/{url.removeprefix('https://github.com/')}"
        "/blob/main/notebooks/01_memory_wall.ipynb"
    )
    assert f"git+{url}@{config['repository']['branch']}" in setup_cell_source()


def test_the_floors_are_declared_and_tested_at_exactly_those_versions():
    """constraints-floors.txt (`make test-floors`) pins each library the notebooks lean on at
    the floor pyproject.toml declares: a floor nobody ran is not a floor."""
    declared = declared_floors()
    lines = (ROOT / "constraints-floors.txt").read_text().splitlines()
    tested = dict(line.lower().split("==") for line in lines if line[:1].isalpha())
    assert {"torch", "bitsandbytes", "transformers", "peft", "accelerate"} <= tested.keys()
    for name, version in tested.items():
        assert name in declared, f"{name} is tested at a floor but not declared"
        assert Version(version) == Version(declared[name]), name


def _names(requirements):
    return {re.split(r"[<>=!\[ ;]", r, maxsplit=1)[0].lower() for r in requirements}


def test_environment_yml_names_the_same_packages_as_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = set(project["dependencies"])
    for extra in ("book", "test"):
        wanted |= set(project["optional-dependencies"][extra])
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    listed = {r for r in pip_section if not r.startswith("--")}
    assert listed == wanted
    assert "--editable ." in pip_section
    assert _names(wanted) <= _names(
        line for line in (ROOT / "constraints.txt").read_text().splitlines() if line[:1].isalpha()
    )


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme and "make book" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    workflows = " ".join(p.read_text() for p in (ROOT / ".github" / "workflows").glob("*.yml"))
    assert "make test" in workflows and "make book" in workflows


def _chapter_of_modules() -> dict[str, int]:
    """qlora_edu's modules and names -> the chapter that writes them (from the package's own map,
    its __init__ docstring, and from its imports)."""
    init = (ROOT / "qlora_edu" / "__init__.py").read_text()
    chapter = {}
    for line in init.split('"""')[1].split("\n- ")[1:]:
        found = re.search(r"\(Chapters? (\d+)", line)
        for module in re.findall(r":mod:`qlora_edu\.(\w+)`", line):
            chapter[module] = int(found[1]) if found else 0
    for module, names in re.findall(r"from qlora_edu\.(\w+) import \(?([^)]*?)\)?\n(?!\s)", init):
        for name in re.findall(r"\w+", names):
            chapter[name] = chapter.get(module, 0)
    return chapter


def test_each_chapters_prerequisites_cover_the_chapters_whose_code_it_imports():
    """book/instructors.md's prerequisites, read with the prerequisites of the chapters they name,
    include every earlier chapter whose part of qlora_edu the chapter imports."""
    chapter_of = _chapter_of_modules()
    chapter_map = INSTRUCTORS.split("## Chapter map")[1].split("\n## ")[0]
    rows = {
        int(m[1]): m[2]
        for m in re.finditer(r"^\| (\d+)\. [^|]*\|[^|]*\| ([^|]*) \|", chapter_map, re.M)
    }
    listed = {
        n: {
            c
            for a, b in re.findall(r"(\d+)(?:-(\d+))?", text)
            for c in range(int(a), int(b or a) + 1)
        }
        for n, text in rows.items()
    }

    def closure(n, seen=None):
        seen = set() if seen is None else seen
        for c in listed.get(n, ()):
            if c not in seen:
                seen.add(c)
                closure(c, seen)
        return seen

    assert sorted(rows) == list(range(1, len(NOTEBOOKS) + 1))
    for path in NOTEBOOKS:
        n = int(path.name[:2])
        code = "\n".join(c.source for c in read(path).cells if c.cell_type == "code")
        used = {chapter_of.get(m, 0) for m in re.findall(r"from qlora_edu\.(\w+) import", code)}
        for names in re.findall(r"from qlora_edu import \(?([^)]*?)\)?\n(?!\s)", code):
            used |= {chapter_of.get(name, 0) for name in re.findall(r"\w+", names)}
        missing = sorted(c for c in used if 0 < c < n and c not in closure(n))
        assert not missing, f"Chapter {n} imports the code of Chapters {missing}, not prerequisites"
