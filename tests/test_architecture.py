"""The package's structure as the docs describe it: the library never imports its experiments (they register
through an entry point), and method choices go through registries rather than comparisons on names."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lowrank_vit"


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_the_library_never_imports_its_experiments():
    offenders = {str(p.relative_to(PACKAGE)): sorted(m for m in _imported_modules(p) if m.split(".")[0] in
                                                    ("experiments", "benchmarks", "tests"))
                 for p in PACKAGE.rglob("*.py")}
    assert not {k: v for k, v in offenders.items() if v}


def test_experiments_register_through_the_entry_point():
    from lowrank_vit import registry

    assert registry.ENTRY_POINT_GROUP in Path(PACKAGE.parent / "pyproject.toml").read_text()
    assert registry.list_experiments("table2") and registry.arch_label("deit_s") == "DeiT-S"


# A method or Z-kind name compared with a config value outside the registries: the if-chains the registries replace.
_NAME = r"(plain|mean|whitened|loss_aware|asvd|fwsvd|comcat|lowrank|diagonal|sparse|structured|uniform|greedy|marginal)"
_COMPARISON = re.compile(rf"[=!]= \"{_NAME}\"|in \(\"{_NAME}\"")


def test_at_most_three_comparisons_on_method_names():
    found = [f"{p.name}:{i}: {line.strip()}" for p in PACKAGE.rglob("*.py")
             for i, line in enumerate(p.read_text().splitlines(), 1) if _COMPARISON.search(line)]
    assert len(found) <= 3, "\n".join(found)


def test_list_show_and_plan_do_not_import_lightning():
    """The registry, its configs and the planner are Lightning-free: reading the tables costs no Lightning import."""
    import os
    import subprocess
    import sys

    code = ("import io, contextlib, sys\n"
            "from lowrank_vit.cli import main\n"
            "for argv in (['list'], ['show', 'table2/deit_s/ours-50'],\n"
            "             ['plan', 'table2/deit_s/ours-50', '--synthetic', '--scale', 'smoke']):\n"
            "    with contextlib.redirect_stdout(io.StringIO()):\n"
            "        assert main(argv) == 0, argv\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]", proc.stdout
