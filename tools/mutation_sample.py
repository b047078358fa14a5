"""Mutation testing by a maintained tool (mutmut) on a seeded sample of its automatically generated mutants of the
user-facing modules (the CLI, data, io, allocation, fine-tune; ``[tool.mutmut] only_mutate`` in pyproject.toml).

    make mutants                                    # 200 mutants, seed 0, the fast suite (30-45 min, 2 cores)
    python tools/mutation_sample.py --sample 50 --seed 3
    python tools/mutation_sample.py --report        # the last run's results again, without running anything
    python tools/mutation_sample.py --list          # how many mutants each module has
    python tools/mutation_sample.py --module 'lowrank_vit/cli/densecache.py' --sample 0   # every mutant of it
    python tools/mutation_sample.py --show NAME...  # mutants' diffs in the current source
    python tools/mutation_sample.py --triaged       # every triage line's mutant as the source now makes it

mutmut copies the package into ``mutants/`` with every mutant behind a switch, runs the fast suite once to learn
which tests call each function, then runs each sampled mutant against the tests that call its function (stopping at
the first failure). A mutant is *caught* when a test fails or it times out (an endless loop the suite noticed).
It *survives* when the tests pass or no test calls its function. Each run starts from a fresh ``mutants/``; its
results stay there for ``--report``.

The report gives the caught fraction per module and every survivor with its diff. A survivor must be triaged in
docs/mutation.md: either a test that now catches it (then it no longer survives) or a line saying why the change
is equivalent, in the form ``- `mutant name`: why``. Exit status 1 when under 90% of the sample is caught or a
survivor is not triaged. Mutant names number the mutants within a function, so a triage line holds until that
function changes: after editing one, ``--triaged`` shows each line's mutant as it now is beside its reason (and exits
1 where a name has no mutant any more), to be read again.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRIAGE = REPO / "docs" / "mutation.md"
MUTMUT = str(Path(sys.executable).with_name("mutmut"))  # the console script: `python -m mutmut` re-imports itself
GOAL = 0.90
# mutmut's exit codes for a mutant (mutmut/stats.py): a failing test run, or one that ran out of time, caught it.
# A test process that crashed (SIGABRT, SIGSEGV: mutmut calls these "suspicious" or "segfault") caught it too: the
# suite dies, as `make test` would (seen: a None key passed to onnxruntime aborts in its C++ code).
CAUGHT = {1: "killed", 3: "killed", 36: "timeout", -24: "timeout", 24: "timeout", 152: "timeout", 255: "timeout",
          -6: "crashed", 134: "crashed", -11: "crashed", 139: "crashed"}
SURVIVED = {0: "survived", 5: "no tests", 33: "no tests"}


def modules() -> list[Path]:
    """The files mutmut is told to mutate, in the order pyproject.toml names them."""
    from mutmut.configuration import config  # reads [tool.mutmut] from pyproject.toml in the current directory

    patterns = config().only_mutate
    files = sorted(p.relative_to(REPO) for p in (REPO / "lowrank_vit").rglob("*.py"))
    chosen = [f for pattern in patterns for f in files if fnmatch.fnmatch(str(f), pattern)]
    return [f for i, f in enumerate(chosen) if f not in chosen[:i] and f.name != "__init__.py"]


def mutant_names(path: Path) -> list[str]:
    """Every mutant mutmut generates for one file, named as mutmut names them."""
    from mutmut.mutation.file_mutation import mutate_file_contents
    from mutmut.utils.format_utils import get_mutant_name

    return [get_mutant_name(path, name) for name in mutate_file_contents(str(path), (REPO / path).read_text())
            .mutant_names]


def draw(n: int, seed: int, only: list[str] | None = None) -> dict[str, Path]:
    """A seeded uniform sample of n mutants over all the modules together (big modules get more): the n whose
    seeded hash of their name is smallest, so that a change to one function changes only its own mutants' places in
    the sample, not the whole sample (as reseeding a random draw over a changed population would). ``only``: the
    modules matching these globs alone; n = 0: every mutant of the pool (an exhaustive run of a weak module)."""
    paths = [path for path in modules() if not only or any(fnmatch.fnmatch(str(path), g) for g in only)]
    if not paths:
        raise SystemExit(f"no mutated module matches {' '.join(only or [])}: see --list")
    pool = {name: path for path in paths for name in mutant_names(path)}
    n = n or len(pool)

    def rank(name: str) -> str:
        return hashlib.sha256(f"{seed}:{name}".encode()).hexdigest()

    return {name: pool[name] for name in sorted(sorted(pool, key=rank)[:n])}


def exit_codes() -> dict[str, int | None]:
    """The exit code of every mutant mutmut has recorded in mutants/ (None: not run)."""
    codes: dict[str, int | None] = {}
    for meta in (REPO / "mutants" / "lowrank_vit").rglob("*.py.meta"):
        codes.update(json.loads(meta.read_text())["exit_code_by_key"])
    return codes


def triaged() -> dict[str, str]:
    """Survivors docs/mutation.md declares equivalent: ``- `name`: why`` lines."""
    if not TRIAGE.exists():
        return {}
    return dict(re.findall(r"^- `([^`]+)`: (.+)$", TRIAGE.read_text(), flags=re.MULTILINE))


def show(name: str, path: Path, _mutated: dict[Path, str] = {}, fresh: bool = False) -> str:  # noqa: B006 (a cache)
    """The mutant's diff: from the last run's copy in ``mutants/`` (the source the run tested, even if the tree has
    changed since), else (``fresh``, or before any run) generated from the current source."""
    from mutmut.mutation.diff_apply import get_diff_for_mutant
    from mutmut.mutation.file_mutation import mutate_file_contents

    if (REPO / "mutants" / path).is_file() and not fresh:  # mutmut reads its copy (and its index) itself
        text = get_diff_for_mutant(name, path=path)
    else:
        if path not in _mutated:
            _mutated[path] = mutate_file_contents(str(path), (REPO / path).read_text()).code
        text = get_diff_for_mutant(name, source=_mutated[path], path=path)
    diff = [line for line in text.splitlines() if line[:1] in "+-" and line[:3] not in ("---", "+++")]
    return "\n".join("      " + line for line in diff) or "      (no diff shown)"


def module_of(name: str) -> Path | None:
    """The mutated module a mutant name belongs to (the longest dotted prefix), None if none."""
    paths = {str(path.with_suffix("")).replace("/", "."): path for path in modules()}
    module = max((m for m in paths if name.startswith(m + ".")), key=len, default=None)
    return None if module is None else paths[module]


def check_triaged(equivalent: dict[str, str]) -> int:
    """Print each triaged mutant's diff in the current source beside the reason given; returns how many names no
    longer name a mutant (a function renamed, moved or shortened since)."""
    missing = 0
    for name, why in equivalent.items():
        path = module_of(name)
        try:
            diff = show(name, path, fresh=True) if path is not None else None
        except FileNotFoundError:  # mutmut: no such function, or no mutant of that number in it
            diff = None
        if diff is None:
            missing += 1
            print(f"\n  NO SUCH MUTANT: {name}\n      triaged: {why}")
        else:
            print(f"\n  {name}\n{diff}\n      triaged: {why}")
    print(f"\n{len(equivalent)} triage line(s), {missing} naming no mutant of the current source")
    return missing


def report(sample: dict[str, Path]) -> int:
    codes, equivalent = exit_codes(), triaged()
    missing = [name for name in sample if codes.get(name) is None]
    if missing:
        print(f"{len(missing)} sampled mutant(s) have no result (run without --report first): {missing[:3]}")
        return 1
    by_module: dict[Path, Counter] = {}
    survivors = []
    for name, path in sample.items():
        code = codes[name]
        verdict = CAUGHT.get(code) or SURVIVED.get(code) or f"suspicious (exit {code})"
        by_module.setdefault(path, Counter())[verdict] += 1
        if code not in CAUGHT:
            survivors.append((name, verdict))
    print(f"\n{'module':40s} {'sampled':>7s} {'caught':>7s} {'timeout':>7s} {'survived':>8s} {'no tests':>8s}")
    for path, counts in sorted(by_module.items()):
        n = sum(counts.values())
        caught = counts["killed"] + counts["timeout"]
        print(f"{str(path):40s} {n:7d} {caught:7d} {counts['timeout']:7d} {counts['survived']:8d} "
              f"{counts['no tests']:8d}   {100 * caught / n:5.1f}%")
    caught = len(sample) - len(survivors)
    print(f"{'all':40s} {len(sample):7d} {caught:7d}   caught {100 * caught / len(sample):.1f}% (goal {GOAL:.0%})")
    untriaged = [(name, verdict) for name, verdict in survivors if name not in equivalent]
    for name, verdict in survivors:
        why = equivalent.get(name)
        status = f"triaged: {why}" if why else "NOT TRIAGED"
        print(f"\n  {verdict}: {name}\n{show(name, sample[name])}\n      {status}")
    if untriaged:
        print(f"\n{len(untriaged)} survivor(s) not triaged in {TRIAGE.relative_to(REPO)}")
    return 0 if caught >= GOAL * len(sample) and not untriaged else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tools/mutation_sample.py", description=__doc__.split("\n")[0])
    parser.add_argument("--sample", type=int, default=200,
                        help="how many mutants to draw (default 200; 0: all of them, with --module)")
    parser.add_argument("--module", action="append", metavar="GLOB",
                        help="draw from the modules matching this glob only (repeatable), e.g. "
                             "'lowrank_vit/cli/densecache.py'; the 90%% goal is a whole-population sample's")
    parser.add_argument("--seed", type=int, default=0, help="the sample's seed (default 0)")
    parser.add_argument("--jobs", type=int, default=2, help="mutants run side by side (default 2)")
    parser.add_argument("--report", action="store_true", help="report the last run's results without running")
    parser.add_argument("--list", action="store_true", help="count the mutants of each module and stop")
    parser.add_argument("--show", nargs="+", metavar="NAME", help="print these mutants' diffs and stop")
    parser.add_argument("--triaged", action="store_true",
                        help="print every triage line's mutant in the current source beside its reason, and stop")
    args = parser.parse_args(argv)
    os.chdir(REPO)  # mutmut reads pyproject.toml and writes mutants/ in the current directory
    if args.list:
        for path in modules():
            print(f"{len(mutant_names(path)):6d}  {path}")
        return 0
    if args.triaged:
        return 1 if check_triaged(triaged()) else 0
    if args.show:
        for name in args.show:
            path = module_of(name)
            if path is None:
                parser.error(f"{name} is not a mutant of the mutated modules ({', '.join(map(str, modules()))})")
            print(f"{name}\n{show(name, path, fresh=True)}")
        return 0
    recorded = REPO / "mutants" / "sample.json"  # the sample the last run drew: what --report reports on
    if args.report and recorded.is_file():
        sample = {name: Path(path) for name, path in json.loads(recorded.read_text()).items()}
    else:
        sample = draw(args.sample, args.seed, args.module)
    if not args.report:
        # a fresh copy every run: mutmut's reuse of an older mutants/ after the tree changed is not reliable (seen:
        # new modules missing from the copy, the test collection failing there)
        shutil.rmtree(REPO / "mutants", ignore_errors=True)
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
        run = subprocess.run([MUTMUT, "run", "--max-children", str(args.jobs), *sample], cwd=REPO, env=env)
        if recorded.parent.is_dir():
            recorded.write_text(json.dumps({name: str(path) for name, path in sample.items()}, indent=1))
        if run.returncode != 0 and not any(exit_codes().get(name) is not None for name in sample):
            print(f"mutmut run failed with exit status {run.returncode}: no sampled mutant was run")
            return 2
    return report(sample)


if __name__ == "__main__":
    sys.exit(main())
