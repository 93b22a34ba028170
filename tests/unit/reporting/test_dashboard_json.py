"""The dashboard's reading of a report file: a file cut short is called truncated wherever the cut falls."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lightning_influence.dashboard.files import UnreadableFile, _load_json

REPORT = {"solver": {"solver": "lissa", "settings": {"route": "auto", "solved_by": "cg"}}, "points": [1, 2, 3]}


@pytest.mark.parametrize("cut", [len('{"solver": {"solver": "lis'), len('{"solver": {"solver": "lissa", '),
                                 len(json.dumps(REPORT)) - 1])
def test_a_file_cut_anywhere_is_reported_as_truncated(tmp_path: Path, cut: int) -> None:
    path = tmp_path / "epoch=1.json"
    path.write_text(json.dumps(REPORT)[:cut])  # inside a string, between tokens, before the last brace
    with pytest.raises(UnreadableFile, match=r"ends too early \(truncated\)"):
        _load_json(path, None)


def test_a_complete_file_that_is_not_json_is_not_called_truncated(tmp_path: Path) -> None:
    path = tmp_path / "epoch=1.json"
    path.write_text('{"solver": nonsense, "points": []}')
    with pytest.raises(UnreadableFile, match="not valid JSON"):
        _load_json(path, None)
    path.write_text(json.dumps(REPORT))
    assert _load_json(path, None) == REPORT
