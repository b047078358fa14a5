"""Tests of tools/mutants.py."""

from __future__ import annotations

import pytest

from tests.helpers import (
    REPO,
)


def test_every_mutant_still_applies_and_names_existing_tests():
    """tools/mutants.py (``make mutants-listed``): each deliberate defect's original text occurs exactly once in its
    file, so the list follows the code; the tests that must catch it exist; and a text that is not there is
    refused."""
    import sys

    sys.path.insert(0, str(REPO / "tools"))
    try:
        import mutants
    finally:
        sys.path.remove(str(REPO / "tools"))
    assert len(mutants.MUTANTS) >= 40
    for m in mutants.MUTANTS:
        text = (REPO / m.path).read_text()
        assert mutants.apply(text, m) != text, m.why
        for test in m.tests:
            assert (REPO / test.split("::")[0]).is_file(), test
    with pytest.raises(ValueError, match="occurs 0 times"):
        mutants.apply("nothing here", mutants.MUTANTS[0])
