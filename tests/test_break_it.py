"""tests/break_it.py stays true to the code: every break's text is still there, once, and names a real test.

A refactor that rewrites a line a break points at would otherwise leave the break stale until someone runs
`python -m tests.break_it` (which stops at the first stale one); this checks all of them in a second.
"""

from __future__ import annotations

import re

import pytest

from tests.break_it import BREAKS, REPO


def test_break_names_are_unique():
    names = [b.name for b in BREAKS]
    assert sorted({n for n in names if names.count(n) > 1}) == []


@pytest.mark.parametrize("b", BREAKS, ids=[b.name for b in BREAKS])
def test_each_break_finds_its_text_once_and_changes_it(b):
    text = (REPO / b.file).read_text()
    assert text.count(b.old) == 1, f"{b.file}: the text of break {b.name!r} is found {text.count(b.old)} times"
    assert b.new != b.old


@pytest.mark.parametrize("b", BREAKS, ids=[b.name for b in BREAKS])
def test_each_break_names_tests_that_exist(b):
    for node in b.test.split():
        path, _, name = node.partition("::")
        source = REPO / path
        assert source.is_file(), f"break {b.name!r}: no test file {path}"
        function = re.sub(r"\[.*\]$", "", name.split("::")[-1])
        assert re.search(rf"^\s*def {re.escape(function)}\(", source.read_text(), re.M), \
            f"break {b.name!r}: {path} has no test {function}"
