"""results.jsonl without training: what `phd study` keeps and what it cuts when it appends a row (kept apart from
tests/test_study.py, which trains runs)."""

from __future__ import annotations

import json

import pytest

from phd.study.recipes import StudyError
from phd.study.runner import append_result, read_results


def _row(i: int) -> dict:
    return {"suite": "s", "recipe": "r", "variant": "vanilla", "seed": i}


def _lines(rows: list[dict]) -> str:
    return "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)


def test_a_complete_last_row_without_newline_is_kept(tmp_path):
    """A complete row lacking only its newline (an editor, a copy) is a row: read, and given its newline by the
    next append; never cut as torn (4 rows stay 4, then 5)."""
    path = tmp_path / "results.jsonl"
    path.write_text(_lines([_row(i) for i in range(4)]).rstrip("\n"))
    assert read_results(path) == [_row(i) for i in range(4)]
    append_result(path, _row(4))
    assert read_results(path) == [_row(i) for i in range(5)]
    assert path.read_text() == _lines([_row(i) for i in range(5)])


@pytest.mark.parametrize("tail", ['{"suite": "s", "recipe": "r", "vari', "{", '{"seed": 3}}'])
def test_a_torn_last_line_is_ignored_then_cut(tmp_path, tail):
    """An append cut short by a kill (not valid JSON) is not a row: read_results skips it and the next append cuts
    it, leaving every complete row."""
    path = tmp_path / "results.jsonl"
    path.write_text(_lines([_row(0), _row(1)]) + tail)
    assert read_results(path) == [_row(0), _row(1)]
    append_result(path, _row(2))
    assert path.read_text() == _lines([_row(0), _row(1), _row(2)])


def test_blank_tails_and_bad_rows(tmp_path):
    """Blank space at the end is no row and no tear; a line that is valid JSON but no object is an error wherever
    it is (kept by append, named by read_results), as is a broken line before the last."""
    path = tmp_path / "results.jsonl"
    path.write_text(_lines([_row(0)]) + "  ")
    append_result(path, _row(1))
    assert read_results(path) == [_row(0), _row(1)]
    path.write_text(_lines([_row(0)]) + "[1, 2]")
    append_result(path, _row(1))
    with pytest.raises(StudyError, match=r"results.jsonl:2 is not a JSON object; fix or remove that line"):
        read_results(path)
    path.write_text(_lines([_row(0)]) + '{"torn\n' + _lines([_row(1)]))
    with pytest.raises(StudyError, match=r"results.jsonl:2 is not a JSON object"):
        read_results(path)
