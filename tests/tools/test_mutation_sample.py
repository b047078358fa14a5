"""Tests of tools/mutation_sample.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import (
    REPO,
)


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
