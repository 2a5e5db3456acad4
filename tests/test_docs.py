"""The README and the pages under docs/: every relative link resolves, the README stays a guide (at most
300 lines) and its test command is the one `.ci/run` runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def relative_links(text: str) -> list[str]:
    """Targets of the Markdown links and images in ``text`` outside fenced code, other than web addresses."""
    return [target for target in LINK.findall(FENCE.sub("", text)) if not re.match(r"[a-z]+:", target)]


def anchors(text: str) -> set[str]:
    """GitHub's anchors of the headings in ``text``: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+\s+(.*)$", FENCE.sub("", text), re.M)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


def test_the_link_reader_finds_links_and_anchors():
    text = "[a](docs/x.md#part) ![b](fig.png) [c](https://example.org)\n```\n[d](code.md)\n```\n## The `run` (one)\n"
    assert relative_links(text) == ["docs/x.md#part", "fig.png"]
    assert anchors(text) == {"the-run-one"}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page):
    broken = []
    for target in relative_links(page.read_text(encoding="utf-8")):
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif anchor and anchor not in anchors(resolved.read_text(encoding="utf-8")):
            broken.append(f"{target}: no heading with this anchor")
    assert broken == []


def test_the_readme_is_at_most_300_lines():
    assert len((REPO / "README.md").read_text(encoding="utf-8").splitlines()) <= 300


def test_the_readme_opens_with_the_install_commands_and_ci_runs_the_second():
    readme = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert readme[2] == "```bash" and readme[5] == "```"
    assert readme[3].endswith("&& kfh-probe sweep --out manifest.json")
    assert readme[4] == ci[-1]
