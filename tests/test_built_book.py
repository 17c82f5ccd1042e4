"""The built book, as a reader sees it: loaded in a real headless Chromium.

Needs `make book` and `make student` first (`make test` runs them). Without Chromium the browser
checks skip on a reader's machine, but fail in CI.
"""

import functools
import http.server
import os
import shutil
import threading

import nbformat
import pytest
from booktools import (
    ROOT,
    colab_url,
    notebook_paths,
    solution_texts,
    student_colab_url,
    toc_files,
)

pytestmark = pytest.mark.browser
HTML = ROOT / "_build" / "html"
STUDENT = ROOT / "_build" / "student"
SCREENSHOTS = ROOT / "_build" / "screenshots"
PAGES = [f for f in toc_files()]


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    return None


@pytest.fixture(scope="module")
def site():
    if not (HTML / "index.html").exists():
        pytest.fail("the book is not built: run `make book` first")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(HTML))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


@pytest.fixture(scope="module")
def browser():
    chromium, driver_path = _chromium(), shutil.which("chromedriver")
    if not (chromium and driver_path):
        if os.environ.get("CI"):
            pytest.fail("CI needs Chromium and chromedriver (Debian: chromium chromium-driver)")
        pytest.skip("no Chromium found: install chromium and chromium-driver to run this check")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1280,1600",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    yield driver
    driver.quit()


def _open(browser, site, page):
    """Load a page and wait until it has rendered its heading (retrying once on a slow machine)."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    url = f"{site}/{page}.html"
    for attempt in range(2):
        browser.get(url)
        try:
            WebDriverWait(browser, 20).until(
                lambda b: (
                    b.current_url == url
                    and b.execute_script("return document.readyState") == "complete"
                    and _heading(b)
                )
            )
            return browser
        except TimeoutException:
            if attempt:
                raise
    return browser


def _heading(browser):
    """The page's main heading as a reader sees it (without the hidden permalink sign)."""
    return browser.execute_script(
        "const h = document.querySelector('article h1');"
        "return h ? h.innerText.replace(/[#¶]\\s*$/, '').trim() : ''"
    )


def test_index_loads_with_the_book_title(browser, site):
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(f"{site}/index.html")
    # index.html redirects to the preface; wait until the preface has loaded
    WebDriverWait(browser, 20).until(
        lambda b: b.current_url.endswith("book/intro.html") and _heading(b)
    )
    assert "QLoRA from Scratch" in browser.title
    assert _heading(browser) == "QLoRA from Scratch"


@pytest.mark.parametrize("page", PAGES)
def test_page_renders_with_working_images_and_navigation(browser, site, page):
    _open(browser, site, page)
    heading = _heading(browser)
    assert heading and heading in browser.title
    broken = browser.execute_script(
        "return [...document.images].filter(i => !i.complete || i.naturalWidth === 0)"
        ".map(i => i.src)"
    )
    assert broken == []
    position = PAGES.index(page)
    links = {
        cls: browser.execute_script(
            f"const a = document.querySelector('a.{cls}'); return a && a.href"
        )
        for cls in ("left-prev", "right-next")
    }
    if position > 0:
        assert links["left-prev"] and links["left-prev"].endswith(f"{PAGES[position - 1]}.html")
    if position < len(PAGES) - 1:
        assert links["right-next"] and links["right-next"].endswith(f"{PAGES[position + 1]}.html")


@pytest.mark.parametrize("path", notebook_paths(), ids=lambda p: p.name)
def test_chapter_has_its_colab_link_and_figures(browser, site, path):
    _open(browser, site, f"notebooks/{path.stem}")
    hrefs = browser.execute_script(
        "return [...document.querySelectorAll('a')].map(a => a.href)"
        ".filter(h => h.includes('colab.research.google.com'))"
    )
    assert colab_url(f"notebooks/{path.name}") in hrefs
    nb = nbformat.read(path, as_version=4)
    figures = sum(
        "image/png" in o.get("data", {})
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
    )
    shown = browser.execute_script(
        "return [...document.images].filter(i => i.src.includes('_images/')"
        " && i.naturalWidth > 100).length"
    )
    assert shown >= figures
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(SCREENSHOTS / f"{path.stem}.png"))


def _page_text(path):
    """The text a reader sees on a built page, whitespace normalised."""
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(path.read_text(), "html.parser")
    return " ".join(soup.get_text(" ").split()), soup


@pytest.mark.parametrize("path", notebook_paths(), ids=lambda p: p.name)
def test_student_edition_leaks_no_solution(path):
    secrets = solution_texts(nbformat.read(path, as_version=4))
    assert secrets, "the chapter has no solution text to hide"
    student_nb = (STUDENT / "notebooks" / path.name).read_text()
    for text in secrets:
        assert text not in student_nb
    teacher, _ = _page_text(HTML / "notebooks" / f"{path.stem}.html")
    student, soup = _page_text(STUDENT / "_build" / "html" / "notebooks" / f"{path.stem}.html")
    visible = [" ".join(t.split()) for t in secrets]
    shown = [t for t in visible if t in teacher]
    assert shown, "the teacher's page should show the solutions"
    assert not [t for t in shown if t in student]
    assert not soup.select(".solution"), "a solution block was rendered"
    assert soup.select(".exercise"), "the exercises must stay"


def test_student_launch_buttons_open_student_notebooks():
    """Every Colab link of the built student edition opens its page's notebook of the student
    edition (published without solutions), never a full notebook."""
    from bs4 import BeautifulSoup

    html = STUDENT / "_build" / "html"
    pages = sorted(html.rglob("*.html"))
    assert pages, "the student edition is not built: run `make student` first"
    linked = set()
    for page in pages:
        soup = BeautifulSoup(page.read_text(), "html.parser")
        for a in soup.find_all("a", href=True):
            if "colab.research.google.com" in a["href"]:
                assert page.parent == html / "notebooks", f"{page}: a Colab link off a chapter"
                assert a["href"] == student_colab_url(f"{page.stem}.ipynb")
                linked.add(page.stem)
    assert linked == {p.stem for p in notebook_paths()}  # every chapter has its button
    assert all((STUDENT / "notebooks" / p.name).exists() for p in notebook_paths())


@pytest.mark.parametrize("path", notebook_paths(), ids=lambda p: p.name)
def test_glued_numbers_terms_and_equations_are_rendered(path):
    """Every number the prose glues from a cell shows its stored value, no MyST role is left
    unresolved, and every displayed equation became a math block (MathJax typesets those in the
    reader's browser)."""
    import re

    nb = nbformat.read(path, as_version=4)
    markdown = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    glued = {
        o["metadata"]["scrapbook"]["name"]: o["data"]["application/papermill.record/text/plain"]
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
        if "scrapbook" in o.get("metadata", {})
    }
    text, soup = _page_text(HTML / "notebooks" / f"{path.stem}.html")
    assert not [role for role in ("{glue:", "{term}", "{cite}") if role in text]
    for name in re.findall(r"\{glue:\}`(\w+)`", markdown):
        assert glued[name] in text, f"{name}: {glued[name]!r} is not on the page"
    assert len(soup.select("div.math")) >= markdown.count("$$") // 2


SLIDES = ROOT / "_build" / "slides"


@pytest.mark.parametrize("path", notebook_paths(), ids=lambda p: p.name)
def test_slide_deck_opens_offline_on_its_title(browser, path):
    """`make slides`: each chapter's deck, opened from disk (nothing served, no CDN needed), starts
    the reveal.js copied beside it and shows the chapter's title on its first slide."""
    from selenium.webdriver.support.ui import WebDriverWait

    deck = SLIDES / f"{path.stem}.slides.html"
    assert deck.exists(), "the slides are not built: run `make slides` first"
    browser.get(deck.as_uri())
    WebDriverWait(browser, 20).until(
        lambda b: b.execute_script("return !!(window.Reveal && Reveal.isReady())")
    )
    nb = nbformat.read(path, as_version=4)
    title = next(c.source for c in nb.cells if c.cell_type == "markdown").splitlines()[0]
    slide = browser.execute_script(
        "const s = document.querySelector('.reveal .slides section.present section.present')"
        "  || document.querySelector('.reveal .slides section.present');"
        "const box = s.getBoundingClientRect();"
        "return {text: s.innerText, width: box.width, height: box.height,"
        "        h1: getComputedStyle(s.querySelector('h1')).fontSize}"
    )
    assert title.removeprefix("# ") in slide["text"]
    assert slide["width"] > 500 and slide["height"] > 100
    assert float(slide["h1"].removesuffix("px")) > 30  # styled by reveal.js's theme
    assert browser.execute_script("return Reveal.getTotalSlides()") > 5
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(SCREENSHOTS / f"{path.stem}.slides.png"))
