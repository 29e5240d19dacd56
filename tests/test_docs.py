"""The README and `docs/` as a newcomer reads them: the README stays an entry page (at most 300
lines), every relative link and anchor in them leads somewhere, every setting in
`core/settings.py` is on the settings page, and every page is reachable from the README."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from core.settings import Settings
from tests.support import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens (repeats
    numbered)."""
    seen: dict[str, int] = {}
    anchors = set()
    for heading in re.findall(r"^#+ (.+)$", _FENCE.sub("", page.read_text()), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", "")).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def _links(page: Path) -> list[str]:
    text = _FENCE.sub("", page.read_text())
    return [a or b for a, b in _LINK.findall(text)]


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_relative_link_and_anchor_leads_somewhere(page: Path) -> None:
    broken = []
    for target in _links(page):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not ours to check offline
        path, _, anchor = target.partition("#")
        where = (page.parent / path).resolve() if path else page
        if not where.exists():
            broken.append(f"{target}: no such file")
        elif anchor and where.suffix == ".md" and anchor not in _anchors(where):
            broken.append(f"{target}: no such heading in {where.name}")
    assert not broken, f"{page.name}: " + "; ".join(broken)


def test_the_readme_is_an_entry_page_that_reaches_every_doc() -> None:
    readme = ROOT / "README.md"
    assert len(readme.read_text().splitlines()) <= 300
    linked = {(readme.parent / target.partition("#")[0]).resolve() for target in _links(readme)}
    unreachable = [p.name for p in PAGES[1:] if p.resolve() not in linked]
    assert not unreachable, f"docs pages the README does not link: {unreachable}"


def test_the_settings_page_names_every_setting() -> None:
    page = (ROOT / "docs" / "settings.md").read_text()
    named = set(re.findall(r"`([A-Z][A-Z0-9_]+)`", page))
    missing = sorted(name.upper() for name in Settings.model_fields if name.upper() not in named)
    assert not missing, f"docs/settings.md does not name {missing}"
