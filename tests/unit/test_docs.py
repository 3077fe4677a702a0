"""The README stays short (at most 200 lines, the rest under docs/) and no relative link in it or
in docs/ points at a file that is not there."""

from __future__ import annotations

import re

from tests.conftest import REPO_ROOT

_LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_readme_is_short():
    assert len((REPO_ROOT / "README.md").read_text().splitlines()) <= 200


def test_every_relative_link_resolves():
    pages = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
    broken = [f"{page.relative_to(REPO_ROOT)} -> {target}" for page in pages
              for target in _LINK.findall(page.read_text())
              if "://" not in target and not (page.parent / target).exists()]
    assert len(pages) > 5 and not broken, broken
