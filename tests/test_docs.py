"""The README and docs/: the install command CI runs is the README's, and every link between the
documents reaches a file and a heading that exist."""

from __future__ import annotations

import re

from conftest import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def first_code_block(text: str) -> str:
    return re.search(r"```[a-z]*\n(.*?)```", text, re.S).group(1)


def editable_extras(text: str) -> set[str]:
    """The extras of the `pip install ... -e ".[a,b]"` in a text."""
    found = re.findall(r'-e "\.\[([a-z,]+)\]"', text)
    assert len(found) == 1, found
    return set(found[0].split(","))


def anchor(heading: str) -> str:
    """GitHub's anchor for a markdown heading."""
    text = heading.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def test_readme_starts_with_the_two_commands_and_ci_runs_them():
    block = first_code_block((REPO / "README.md").read_text())
    assert "nkat quickstart" in block and "python -m pytest -q" in block
    ci = (REPO / ".ci" / "run").read_text()
    # CI installs what the README tells a new user to install, which covers the vision side too
    assert editable_extras(block) == editable_extras(ci) == {"test", "vit"}
    assert ci.rstrip().endswith("python3 -m pytest -q")


def test_links_between_the_documents_reach_a_heading():
    headings = {doc: {anchor(h) for h in re.findall(r"^#+ (.*)$", doc.read_text(), re.M)} for doc in DOCS}
    checked = 0
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
            if target.startswith(("http://", "https://")):
                continue
            path, _, fragment = target.partition("#")
            linked = (doc.parent / path).resolve() if path else doc
            assert linked.exists(), f"{doc.name}: {target}"
            if fragment:
                assert fragment in headings[linked], f"{doc.name}: {target} (no such heading)"
            checked += 1
    assert checked > 10
