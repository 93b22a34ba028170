"""Paths of repository files named in README.md, CONTRIBUTING.md and docs/ exist (a moved test or script
would otherwise leave the docs pointing at nothing; mkdocs only checks links, not code spans)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
# a path after an output option is a file the command writes, not one that must exist
PATH = re.compile(r"(?<!--json )(?<!--out )(?<![\w/.-])((?:tests|benchmarks|examples|scripts)/[\w/.-]*\.(?:py|json|sh))(?![\w/])")


def test_named_repository_files_exist():
    missing = [
        f"{page.relative_to(ROOT)}: {path}"
        for page in PAGES
        for path in sorted(set(PATH.findall(page.read_text(encoding="utf-8"))))
        if not (ROOT / path).exists()
    ]
    assert not missing, f"the docs name files that do not exist: {missing}"
