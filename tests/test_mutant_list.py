"""The mutant markers beside the code stay well formed as the code moves (tests/mutants.py)."""

from __future__ import annotations

from pathlib import Path

from mutants import ROOT, find_mutants  # tests/ is on sys.path under pytest


def test_every_marker_applies_to_its_line_and_names_existing_tests():
    """find_mutants fails on a marker whose OLD text is no longer on the line below it; each
    named test file must exist, so a renamed test cannot leave a mutant with no killer."""
    mutants = find_mutants()
    assert len(mutants) >= 40
    for m in mutants:
        assert m.tests, m.name
        for sel in m.tests:
            assert (ROOT / "tests" / f"test_{sel.partition(':')[0]}.py").is_file(), (m.name, sel)
        line = (ROOT / m.file).read_text().splitlines()[m.line - 1]
        assert line.count(m.old) == 1 and m.old != m.new, m.name
    # the list covers every level of both applications
    files = {str(Path(m.file)) for m in mutants}
    for f in ("trilevel.py", "lfm_dr.py", "meta.py", "small_loss.py", "search.py", "hypergrad.py"):
        assert any(x.endswith(f) for x in files), f
