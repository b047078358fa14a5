"""The package's architecture: which way its imports run and where they sit, that it never imports the experiments,
that only the adapter knows a model's module paths, and that registries stand where name comparisons would."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.helpers import PACKAGE


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
                                                    ("experiments", "lowrank_vit_experiments", "benchmarks", "tests"))
                 for p in PACKAGE.rglob("*.py")}
    assert not {k: v for k, v in offenders.items() if v}


# A method or Z-kind name compared with a config value outside the registries: the if-chains the registries replace.
_NAME = r"(plain|mean|whitened|loss_aware|asvd|fwsvd|comcat|lowrank|diagonal|sparse|structured|uniform|greedy|marginal)"


_COMPARISON = re.compile(rf"[=!]= \"{_NAME}\"|in \(\"{_NAME}\", \"{_NAME}\"")  # a tuple of two method names


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
            "from lowrank_vit.cli.main import main\n"
            "for argv in (['list'], ['show', 'table2/deit_s/ours-50'],\n"
            "             ['plan', 'table2/deit_s/ours-50', '--synthetic', '--scale', 'smoke'],\n"
            "             ['plan', 'table2/deit_s/ours-50', '--estimate', '--gpu', 'a6000']):\n"
            "    with contextlib.redirect_stdout(io.StringIO()):\n"
            "        assert main(argv) == 0, argv\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]", proc.stdout


# The data flow, bottom up: the mathematics, the modules of a compressed model, the methods and what leaves the
# process, the configuration and the report, the Lightning stages and the compression pipeline, the reproduction
# machinery, the command line, the package's face.
LAYERS = {"core": 0, "nn": 1, "methods": 2, "io": 2, "speed": 2, "config": 3, "reports": 3, "stages": 4, "pipeline": 4,
          "repro": 5, "cli": 6, "__init__": 7}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_imports_run_one_way_along_the_data_flow():
    """No module imports one of a higher layer (function-level imports included)."""
    upward = []
    for path in PACKAGE.rglob("*.py"):
        here = ".".join(("lowrank_vit", *path.relative_to(PACKAGE).with_suffix("").parts))
        here = here.removesuffix(".__init__")
        for module in _imported_modules(path):
            if module.startswith("lowrank_vit.") and LAYERS[_layer(module)] > LAYERS[_layer(here)]:
                upward.append(f"{here} -> {module}")
    assert not upward, "\n".join(upward)
    assert set(LAYERS) - {"__init__"} == {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
                                         if p.name != "__init__.py" and not p.name.startswith(("_", "."))}


# The roots of a timm model's module paths that only the adapter may name (the data flow below it sees layers).
_MODULE_ROOTS = {"patch_embed", "blocks", "head", "head_dist", "cls_token", "dist_token", "reg_token", "pos_embed",
                 "fc_norm", "norm_pre"}


_LOOKUPS = {"getattr", "hasattr", "get_submodule", "get_parameter"}


def _module_path_uses(path: Path) -> list[str]:
    """Attribute accesses ``x.patch_embed`` and lookups ``getattr(x, "head_dist")`` / ``get_submodule("blocks.0")``
    of a model's module paths (docstrings and comments do not count)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr in _MODULE_ROOTS:
            found.append(f"{path.name}:{node.lineno}: .{node.attr}")
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) in _LOOKUPS:
            for arg in node.args:
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and \
                        arg.value.split(".")[0] in _MODULE_ROOTS:
                    found.append(f"{path.name}:{node.lineno}: {arg.value!r}")
    return found


def test_only_the_adapter_knows_module_paths():
    adapter = PACKAGE / "nn" / "adapters.py"
    assert _module_path_uses(adapter), "the check must see the adapter's own uses"
    models = {PACKAGE / "nn" / "vssm.py"}  # a model's own definition builds the paths the adapter reads
    found = [use for p in PACKAGE.rglob("*.py") if p != adapter and p not in models for use in _module_path_uses(p)]
    assert not found, "\n".join(found)


def _top_level_imports(path: Path) -> set[str]:
    """What a module imports when it is imported: its top-level statements (a TYPE_CHECKING block does not run)."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for child in ast.walk(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                break
            if isinstance(child, ast.Import):
                names.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                names.add(child.module)
                names.update(f"{child.module}.{alias.name}" for alias in child.names)
    return names


def test_imports_sit_at_the_top_but_the_deferred_packages():
    """Inside a function, a module imports only one of DEFERRED_PACKAGES (optional, or seconds to import) or a module
    of the package that imports one at its top; a platform module guarded by try/except may be imported there too.
    Everything else is imported at the top, where a reader looks for it."""
    from lowrank_vit.core.common import DEFERRED_PACKAGES

    modules = {".".join(("lowrank_vit", *p.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__"): p
               for p in PACKAGE.rglob("*.py")}
    heavy: dict[str, bool] = {}

    def defers(module: str, seen: frozenset = frozenset()) -> bool:
        """Whether importing ``module`` imports a deferred package."""
        if module.split(".")[0] in DEFERRED_PACKAGES:
            return True
        if module not in modules or module in seen:
            return False
        if module not in heavy:
            heavy[module] = any(defers(m, seen | {module}) for m in _top_level_imports(modules[module]))
        return heavy[module]

    misplaced = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        guarded = {id(n) for t in ast.walk(tree) if isinstance(t, ast.Try) for b in t.body for n in ast.walk(b)}
        for func in ast.walk(tree):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(func):
                if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in guarded:
                    targets = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                    if not all(defers(t) for t in targets):
                        misplaced.append(f"{name}.{func.name}:{node.lineno}: {ast.unparse(node)}")
    assert not misplaced, "\n".join(sorted(set(misplaced)))
    assert len(DEFERRED_PACKAGES) == len(set(DEFERRED_PACKAGES))


def _module_file(module: str) -> Path | None:
    """The source file of a module of the package (a package's ``__init__.py``), or None for anything else."""
    base = PACKAGE.parent.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _own_and_imported_names(path: Path) -> tuple[set[str], dict[str, str]]:
    """The top-level names a module defines itself (def, class, assignment, under if/try too), and those it imports
    from another module of the package (name -> that module)."""
    own, imported = set(), {}

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                own.add(node.name)
            elif isinstance(node, ast.Assign | ast.AnnAssign):
                for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                    own.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lowrank_vit"):
                imported.update({alias.asname or alias.name: node.module for alias in node.names})
            elif isinstance(node, ast.If | ast.Try):
                for block in (node.body, node.orelse, getattr(node, "finalbody", []),
                              *(h.body for h in getattr(node, "handlers", []))):
                    visit(block)

    visit(ast.parse(path.read_text()).body)
    return own, imported


def test_names_are_imported_from_the_module_that_defines_them():
    """A name of the package is imported from its home, never through a module that merely imported it too: the
    package's faces (a package's ``__init__``: ``lowrank_vit``, ``lowrank_vit.speed``) are the only way round.
    Library, experiments, benchmarks, tools and tests alike, so that a reader who follows an import lands on the
    definition, and a module's imports are free to change."""
    sources = [p for folder in ("lowrank_vit", "experiments", "benchmarks", "tools", "tests")
               for p in PACKAGE.parent.joinpath(folder).rglob("*.py")
               if p != PACKAGE / "__init__.py"]
    passed_on = []
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
                    and node.module.startswith("lowrank_vit.")):
                continue
            source = _module_file(node.module)
            if source is None or source.name == "__init__.py":
                continue  # not the package's, or a face
            own, imported = _own_and_imported_names(source)
            for alias in node.names:
                if alias.name not in own and alias.name in imported \
                        and _module_file(f"{node.module}.{alias.name}") is None:
                    where = path.relative_to(PACKAGE.parent)
                    passed_on.append(f"{where}:{node.lineno}: {alias.name} from {node.module} "
                                     f"(defined in {imported[alias.name]})")
    assert not passed_on, "\n".join(passed_on)


def _module_name(path: Path) -> str:
    return ".".join(("lowrank_vit", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")


def _imports_for_the_reader(path: Path) -> set[str]:
    """The package's modules a module imports outside its functions, the ``TYPE_CHECKING`` block included (a cycle
    through annotations is still a cycle a reader has to untangle)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        for inner in ast.walk(node) if isinstance(node, ast.If | ast.Try | ast.Import | ast.ImportFrom) else ():
            ours = isinstance(inner, ast.ImportFrom) and (inner.module or "").startswith("lowrank_vit")
            if ours and inner.level == 0:
                found.update(f"{inner.module}.{alias.name}" if _module_file(f"{inner.module}.{alias.name}") else
                             inner.module for alias in inner.names)
            elif isinstance(inner, ast.Import):
                found.update(alias.name for alias in inner.names if alias.name.startswith("lowrank_vit"))
    return found


def test_no_two_modules_import_each_other_even_for_annotations():
    """The imports at the modules' tops form no cycle: a depth-first search over them finds no edge back to a module
    still on its path."""
    graph = {_module_name(p): {m for m in _imports_for_the_reader(p) if _module_file(m)} for p in PACKAGE.rglob("*.py")}
    state: dict[str, str] = {}
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                cycles.append(" -> ".join([*path[path.index(target):], target]))
            elif target not in state:
                visit(target, [*path, target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "\n".join(cycles)
