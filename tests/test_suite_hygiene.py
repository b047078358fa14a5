"""The test suite's own contract: `make test` runs everything, `make test-fast` skips what is marked slow, and every
test starts from the same seeded global RNG state (tests/conftest.py)."""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def make_recipe(target: str) -> str:
    """The command lines of a Makefile target."""
    text = (REPO / "Makefile").read_text()
    match = re.search(rf"^{re.escape(target)}:.*\n((?:\t.*\n)+)", text, flags=re.MULTILINE)
    assert match, f"no target {target!r} in the Makefile"
    return match.group(1)


def test_make_test_runs_everything_and_test_fast_skips_slow():
    assert "-m pytest" in make_recipe("test") and "slow" not in make_recipe("test")
    assert '-m "not slow"' in make_recipe("test-fast")


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_help_lists_both_test_targets():
    out = subprocess.run(["make", "-s", "-C", str(REPO), "help"], capture_output=True, text=True, check=True).stdout
    targets = {line.split()[0] for line in out.splitlines() if line.strip()}
    assert {"test", "test-fast", "check-plans"} <= targets


def test_slow_is_a_registered_marker(pytestconfig):
    """With --strict-markers (pyproject) a misspelt marker is an error instead of a test that never gets skipped."""
    assert any(m.startswith("slow:") for m in pytestconfig.getini("markers"))
    assert "--strict-markers" in pytestconfig.getini("addopts")


@pytest.mark.parametrize("draw", [0, 1])  # the second run sees the same numbers although the first one drew
def test_every_test_starts_from_the_same_seed(draw):
    expected_torch = torch.rand(3, generator=torch.Generator().manual_seed(0))
    expected_random = random.Random(0).random()
    expected_numpy = np.random.RandomState(0).rand()
    assert torch.equal(torch.rand(3), expected_torch)
    assert random.random() == expected_random
    assert np.random.rand() == expected_numpy


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


def test_the_mutation_sampler_lists_mutmuts_mutants_of_the_configured_modules():
    """tools/mutation_sample.py (``make mutants``): the modules are pyproject's ``only_mutate``; a module's mutants
    are named as mutmut names them; docs/mutation.md's triage lines parse."""
    pytest.importorskip("mutmut")
    import os
    import sys

    sys.path.insert(0, str(REPO / "tools"))
    here = os.getcwd()
    try:
        os.chdir(REPO)
        import mutation_sample

        modules = [str(p) for p in mutation_sample.modules()]
        assert "lowrank_vit/io/hub.py" in modules and "lowrank_vit/core/allocate.py" in modules
        assert "lowrank_vit/core/decompose.py" not in modules and all(p.endswith(".py") for p in modules)
        names = mutation_sample.mutant_names(REPO.joinpath("lowrank_vit/io/hub.py").relative_to(REPO))
        assert len(names) > 20 and all(n.startswith("lowrank_vit.io.hub.x") and "__mutmut_" in n for n in names)
        assert isinstance(mutation_sample.triaged(), dict)
        # a mutant's diff comes from the source alone: one line out, its mutated form in, nothing else
        diff = mutation_sample.show(names[0], Path("lowrank_vit/io/hub.py")).split("\n")
        assert [line.strip()[:1] for line in diff] == ["-", "+"] and diff[0][7:] != diff[1][7:]
        # --module restricts the pool; --sample 0 takes all of it (an exhaustive run of one module)
        every = mutation_sample.draw(0, 0, ["lowrank_vit/io/hub.py"])
        assert sorted(every) == sorted(names) and set(every.values()) == {Path("lowrank_vit/io/hub.py")}
        assert len(mutation_sample.draw(5, 1, ["lowrank_vit/io/hub.py"])) == 5
        with pytest.raises(SystemExit, match="no mutated module matches nowhere.py"):
            mutation_sample.draw(5, 1, ["nowhere.py"])
        # --triaged: a triage line whose function changed is shown as its mutant now is, or counted as naming none
        assert mutation_sample.module_of(names[0]) == Path("lowrank_vit/io/hub.py")
        assert mutation_sample.check_triaged({names[0]: "why", "lowrank_vit.io.hub.x_gone__mutmut_1": "why",
                                              names[0].rsplit("_", 1)[0] + "_99999": "why"}) == 2
    finally:
        os.chdir(here)
        sys.path.remove(str(REPO / "tools"))


def test_the_mutation_history_adds_up_and_the_guide_quotes_its_latest_runs():
    """docs/mutation_history.json (one object per run of tools/mutation_sample.py): each run's counts add up, its
    score is its counts' and its module rows fit them; docs/mutation.md quotes the last entry as the latest run and
    the last whole-pool sample as the latest fresh one; every line the sampler reads there as triage names a mutant."""
    import sys

    history = json.loads((REPO / "docs" / "mutation_history.json").read_text())
    assert len(history) >= 16
    for entry in history:
        assert 0 <= entry["caught"] <= entry["sample"], entry
        assert entry["survived"] == entry["sample"] - entry["caught"], entry
        assert entry["score_percent"] == round(100 * entry["caught"] / entry["sample"], 1), entry
        assert entry["kind"] in ("sample", "exhaustive", "redraw") and entry["survivors"] and entry["note"], entry
        if entry["modules"] is not None:  # the report's rows: a crashed mutant is caught but in no row
            assert sum(row["sampled"] for row in entry["modules"]) == entry["sample"], entry["commit"]
            assert sum(row["caught"] for row in entry["modules"]) <= entry["caught"], entry["commit"]
            for row in entry["modules"]:
                assert 0 <= row["caught"] <= row["sampled"], (entry["commit"], row)
                assert abs(row["percent"] - 100 * row["caught"] / row["sampled"]) <= 0.05 + 1e-9, (entry["commit"], row)
    numbered = [entry["run"] for entry in history if entry["run"] is not None]
    assert numbered == list(range(1, len(numbered) + 1))

    guide = (REPO / "docs" / "mutation.md").read_text()

    def quoted(label: str) -> tuple[str, int, int, float]:
        match = re.search(rf"\*\*{label}\*\* \([^)]*?commit (\w+)[^)]*\):\s+\*\*(\d+) of (\d+) caught\s+"
                          r"\((\d+\.\d)%\)\*\*", guide)
        assert match, f"docs/mutation.md quotes no '{label}' figure"
        return match[1], int(match[2]), int(match[3]), float(match[4])

    def recorded(entry: dict) -> tuple[str, int, int, float]:
        return entry["commit"], entry["caught"], entry["sample"], entry["score_percent"]

    assert quoted("Latest run") == recorded(history[-1])
    assert quoted("Latest fresh sample") == recorded([e for e in history if e["kind"] == "sample"][-1])

    sys.path.insert(0, str(REPO / "tools"))
    try:
        import mutation_sample
    finally:
        sys.path.remove(str(REPO / "tools"))
    triaged = mutation_sample.triaged()
    assert len(triaged) >= 60
    assert all(name.startswith("lowrank_vit.") and re.search(r"__mutmut_\d+$", name) for name in triaged), triaged
