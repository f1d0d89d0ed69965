"""README.md and docs/*.md as written, checked without running anything: every command block is
run by a slow test (tests/readme.py's needles) or says why not, every relative link and anchor
leads somewhere, every `--set` names a real param, every `make` target exists, README's layout
map names every module, and README stays short enough to read in ten minutes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO
from tests.readme import NEEDLES, NOT_RUN, blocks_of, doc_files, fenced_blocks

README_MAX_LINES = 210
PAGES = [path.relative_to(REPO).as_posix() for path in doc_files()]


def prose(path: Path) -> str:
    """A page without its fenced blocks: what links and headings live in."""
    return re.sub(r"^```.*?^```$", "", path.read_text(), flags=re.DOTALL | re.MULTILINE)


def anchors(path: Path) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces as dashes."""
    headings = re.findall(r"^#+ (.+)$", prose(path), flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_every_fenced_block_is_run_by_a_test_or_says_why_not():
    needles = {**NEEDLES, **NOT_RUN}
    for block in fenced_blocks():
        found = [n for n in needles if n in block]
        assert found, f"a fenced block that no test runs (add a test and its needle to tests/readme.py):\n{block}"


@pytest.mark.parametrize("needle", [*NEEDLES, *NOT_RUN])
def test_each_needle_finds_exactly_one_block(needle):
    assert sum(needle in block for block in fenced_blocks()) == 1, needle


@pytest.mark.parametrize("needle", NEEDLES)
def test_each_needle_is_used_by_the_test_named_for_it(needle):
    assert needle in (REPO / NEEDLES[needle]).read_text(), f"{NEEDLES[needle]} does not use {needle!r}"


def test_the_experiment_commands_stay_in_readme():
    """tests/integration/test_dvc_experiments.py reads README.md itself, and test_readme.py the
    URL that `mlflow ui` serves."""
    readme = (REPO / "README.md").read_text()
    assert any("dvc exp show" in block for block in blocks_of(readme))
    assert "open http://127.0.0.1:5000" in readme


@pytest.mark.parametrize("page", PAGES)
def test_relative_links_and_anchors_lead_somewhere(page):
    path = REPO / page
    for target in re.findall(r"\]\(([^)\s]+)\)", prose(path)):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        assert linked.exists(), f"{page}: link to {target}, which does not exist"
        if anchor and linked.suffix == ".md":
            assert anchor in anchors(linked), f"{page}: link to {target}, no such heading in {linked.name}"


@pytest.mark.parametrize("page", PAGES)
def test_every_set_names_a_real_param(page):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    text = (REPO / page).read_text()
    overrides = re.findall(r"(?:--set|-S) [\"']?(\w+\.[\w.]+)=", text)  # `--set key=value`: no dot, no key
    assert overrides or page != "README.md"
    for key in overrides:
        node = params
        for part in key.split("."):
            assert isinstance(node, dict) and part in node, f"{page}: --set {key}: no such key in params.yaml"
            node = node[part]


@pytest.mark.parametrize("page", PAGES)
def test_every_make_target_exists(page):
    targets = set(re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), flags=re.MULTILINE))
    for target in re.findall(r"\bmake ([\w-]+)", (REPO / page).read_text()):
        assert target in targets, f"{page}: make {target}: no such target in the Makefile"


@pytest.mark.parametrize("page", PAGES)
def test_no_durations_outside_benchmarks(page):
    """Times go stale with every change and machine: they live in BENCHMARKS.md, with their date."""
    found = re.findall(r"\b\d+(?:\.\d+)?\s*(?:min|mins|minutes|hours?|h)\b", (REPO / page).read_text())
    assert not found, f"{page}: {found}; put the figure in BENCHMARKS.md and link to it"


def test_readme_layout_names_every_module():
    (layout,) = [b for b in blocks_of((REPO / "README.md").read_text()) if b.startswith("pipeline/ ")]
    listed = set(re.findall(r"^  (\S+\.(?:py|c)) ", layout, flags=re.MULTILINE))
    modules = {p.name for p in (REPO / "pipeline").iterdir() if p.suffix in (".py", ".c")} - {"__init__.py"}
    assert listed == modules, f"missing from README's layout: {modules - listed}; gone: {listed - modules}"


def test_readme_is_short():
    lines = len((REPO / "README.md").read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail to docs/"
