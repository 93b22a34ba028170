"""Figures quoted in the docs come from results files written by benchmark scripts (#18).

A measured figure (a time, a ratio, an accuracy, a residual, a correlation) sits in a block, a table or a
paragraph, right under a comment that names the results file(s) it comes from::

    <!-- figures: benchmarks/models-results.json -->
    | model | epoch (s) | ...

Every number in the block (outside `code` spans and link targets) must be a value of that JSON as printed, or
the mean of one of its lists of numbers (per-seed, per-point values): ``0.323`` matches 0.3234 (rounded to the
printed decimals), ``1,126,410`` matches 1126410, and a number that is
part of a name (``MLP 64-1024-1024-10``) matches when the JSON holds that name; a ratio's ``x`` ends its number
(``1.86x`` is checked as 1.86). Every page (README.md and docs/*.md) carries no measured figure outside such
blocks: the sweep reads a number followed by a unit (s, ms, min, %, x, points) or a number in the sentence after
a measurement word (Pearson, Spearman, accuracy, AUROC, recall) as measured. It does not read as measured: a
number glued to a letter, ``.``, ``,`` or ``@`` (``float32``, ``recall@10%``: a metric's cut-off, a setting),
``N% of ...`` (a share of a set), or a threshold after ``below``/``above``/``exceeds``/``limit``. Settings
and goals elsewhere are written so the sweep does not read them as measurements (``a tenth``, ``eight test
points``, ``1.7 times``). See CONTRIBUTING.md.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARK = re.compile(r"^<!-- figures: (?P<files>[^>]+?) -->\n(?P<block>(?:.+\n?)+)", re.M)
# a ratio's "x" (``1.86x``) ends the number, so the ratio itself is checked, not its leading digit
NUMBER = re.compile(r"(?<![\w.\-])(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:e[-+]?\d+)?(?!x\w)(?![^\Wx])")
SKIP = re.compile(r"`[^`]*`|\]\([^)]*\)|<!--.*?-->|https?://\S+")
# a number followed by a unit or a measurement word: what the sweep looks for outside figures blocks. A number
# starts where no letter, digit, "." or "," precedes it, and one glued to "@" is a metric's cut-off (recall@10%,
# a setting), not a measurement
START = r"(?<![@\w.,])"
MEASURED = re.compile(
    rf"{START}\d[\d.,]*\s+(?:s|ms|min|minutes?|seconds?|hours?|points?)\b|{START}\d[\d.,]*\s*(?:%(?!\s+of\b)|x(?!\w))"
    rf"|\b(?:Pearson|Spearman|accuracy|AUROC|recall)\b[^.|]*?(?<!below )(?<!above )(?<!exceeds )(?<!limit ){START}\d",
    re.I,
)
# every page: every measured figure on it sits in a figures block
SWEPT = [str(page.relative_to(ROOT)) for page in PAGES]


def _leaves(value: Any) -> tuple[list[float], list[str]]:
    numbers: list[float] = []
    strings: list[str] = []

    def walk(item: Any) -> None:
        if isinstance(item, bool) or item is None:
            return
        if isinstance(item, (int, float)):
            numbers.append(float(item))
        elif isinstance(item, str):
            strings.append(item)
            try:
                numbers.append(float(item))
            except ValueError:
                pass
        elif isinstance(item, dict):
            for key, child in item.items():
                strings.append(str(key))
                walk(child)
        elif isinstance(item, list):
            values = [child for child in item if isinstance(child, (int, float)) and not isinstance(child, bool)]
            if len(values) > 1:  # a list of per-seed or per-point values: its mean is quoted too
                numbers.append(sum(values) / len(values))
            for child in item:
                walk(child)

    walk(value)
    return numbers, strings


def found(token: str, numbers: list[float], strings: list[str]) -> bool:
    """Whether ``token`` as printed is a JSON number rounded to its printed decimals, or part of a JSON name."""
    text = token.replace(",", "")
    value = float(text)
    mantissa = text.lower().split("e")[0]
    decimals = len(mantissa.split(".")[1]) if "." in mantissa else 0
    half = 0.5 * 10.0 ** (-decimals) * (10.0 ** int(text.lower().split("e")[1]) if "e" in text.lower() else 1.0)
    if any(abs(number - value) <= half * (1 + 1e-9) for number in numbers):
        return True
    pattern = re.compile(rf"(?<![\d.]){re.escape(token)}(?![\d])")
    return any(pattern.search(string) for string in strings)


def _blocks() -> list[tuple[str, list[str], str]]:
    blocks = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for match in MARK.finditer(text):
            line = text[: match.start()].count("\n") + 1
            files = [name.strip() for name in match.group("files").split(",")]
            blocks.append((f"{page.relative_to(ROOT)}:{line}", files, match.group("block")))
    return blocks


BLOCKS = _blocks()


def test_blocks_are_found():
    assert len(BLOCKS) >= 5


@pytest.mark.parametrize(("where", "files", "block"), BLOCKS, ids=[b[0] for b in BLOCKS])
def test_every_number_in_a_figures_block_is_in_its_results_file(where, files, block):
    numbers: list[float] = []
    strings: list[str] = []
    for name in files:
        path = ROOT / name
        assert path.is_file() and name.startswith("benchmarks/"), f"{where}: {name} is not a benchmarks/ results file"
        more_numbers, more_strings = _leaves(json.loads(path.read_text()))
        numbers += more_numbers
        strings += more_strings
    missing = [token for token in NUMBER.findall(SKIP.sub(" ", block)) if not found(token, numbers, strings)]
    assert not missing, f"{where}: {missing} are not in {', '.join(files)} (rerun its benchmark, or drop them)"


def _prose(text: str) -> list[tuple[int, str]]:
    """``(line number, paragraph)`` of ``text`` outside fenced code and outside figures blocks."""
    text = re.sub(r"^```.*?^```", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.S | re.M)
    text = MARK.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    paragraphs, start = [], 0
    for part in re.split(r"(\n\s*\n)", text):
        if part.strip():
            paragraphs.append((text[:start].count("\n") + 1, part))
        start += len(part)
    return paragraphs


@pytest.mark.parametrize("page", SWEPT)
def test_swept_pages_quote_measurements_only_from_results_files(page):
    for line, paragraph in _prose((ROOT / page).read_text(encoding="utf-8")):
        hit = MEASURED.search(SKIP.sub(" ", paragraph))
        assert hit is None, (
            f"{page}:{line}: '{hit.group(0)}' reads as a measured figure: put it under "
            "<!-- figures: benchmarks/<results>.json --> or drop it"
        )


def test_found_rounds_as_printed():
    numbers, strings = [0.3234, 1126410.0, 164.94, 2.5e-3], ["MLP 64-1024-1024-10 (digits)"]
    assert found("0.323", numbers, strings) and found("1,126,410", numbers, strings)
    assert found("164.9", numbers, strings) and found("165", numbers, strings)
    assert found("2.50e-03", numbers, strings) and found("1024", numbers, strings)
    assert not found("0.324", numbers, strings) and not found("164.8", numbers, strings)
    assert not found("7", numbers, strings)


def test_digits_example_states_its_measured_run_time():
    """The example's docstring quotes its wall time from benchmarks/digits-walltime-results.json."""
    results = json.loads((ROOT / "benchmarks" / "digits-walltime-results.json").read_text())
    assert results["defaults"], "the quoted run must use the example's default settings"
    doc = (ROOT / "examples" / "digits.py").read_text().split('"""')[1]
    assert "digits-walltime-results.json" in doc
    numbers, strings = _leaves(results)
    quoted = NUMBER.findall(SKIP.sub(" ", re.search(r"\(([^()]*walltime[^()]*)\)", doc, re.S).group(1)))
    assert quoted and all(found(token, numbers, strings) for token in quoted), quoted


def test_measured_reads_measurements_not_settings():
    for text in ["took 5.2 s", "1.86x faster", "Pearson 0.95", "AUROC of 0.99", "a 12.5% gain", "lost 3 points"]:
        assert MEASURED.search(text), text
    for text in ["recall@10% / recall@k", "float32 Pearson.", "10% of the set", "Pearson below 0.05", "a tenth"]:
        assert not MEASURED.search(text), text
    assert NUMBER.findall("1.86x, 64x1024, top-10, 1e-3") == ["1.86", "1e-3"]
