"""How long the command line takes to start, and what each deferred package would add to it.

    python benchmarks/cli_startup.py [--repeats 5] [--json PATH]

Every figure is a fresh interpreter's, the median of ``--repeats``, the runs of the cases interleaved: ``import
lowrank_vit``, ``lowrank-vit --help`` and ``lowrank-vit list`` end to end (with the deferred packages each one loaded,
which should be none), and for each of ``lowrank_vit.core.common.DEFERRED_PACKAGES`` the time to import it after
torch, which every path imports anyway: what importing it at a module's top would add to every command.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ArgumentParser, command_line, environment, format_table, median, write_json  # noqa: E402

from lowrank_vit.cli.args import positive_int  # noqa: E402
from lowrank_vit.core.common import DEFERRED_PACKAGES  # noqa: E402

REPORT = ("import json, sys; from lowrank_vit.core.common import DEFERRED_PACKAGES; "
          "print(json.dumps(sorted(p for p in DEFERRED_PACKAGES if p in sys.modules)))")
COMMANDS = {
    "import lowrank_vit": "import lowrank_vit",
    "lowrank-vit --help": ("import contextlib, io\nfrom lowrank_vit.cli.main import main\n"
                           "with contextlib.redirect_stdout(io.StringIO()):\n"
                           "    try:\n        main(['--help'])\n    except SystemExit:\n        pass"),
    "lowrank-vit list": ("import contextlib, io\nfrom lowrank_vit.cli.main import main\n"
                         "with contextlib.redirect_stdout(io.StringIO()):\n    main(['list'])"),
}


def _run(code: str) -> tuple[float, list[str]]:
    """(wall seconds of a fresh interpreter running ``code``, the deferred packages it loaded)."""
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code + "\n" + REPORT], capture_output=True, text=True, check=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    return time.perf_counter() - start, json.loads(out.stdout.strip().splitlines()[-1])


def _import_after_torch(package: str) -> float | None:
    """Seconds to import ``package`` once torch is loaded, in a fresh interpreter; None if it is not installed."""
    code = (f"import time, torch\nstart = time.perf_counter()\ntry:\n    import {package}\nexcept ImportError:\n"
            f"    print('missing')\nelse:\n    print(time.perf_counter() - start)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout.strip().splitlines()[-1]
    return None if out == "missing" else float(out)


def measure(repeats: int, packages: tuple[str, ...] = DEFERRED_PACKAGES) -> tuple[list[dict], list[dict]]:
    samples: dict[str, list[float]] = {name: [] for name in COMMANDS}
    loaded: dict[str, list[str]] = {}
    imports: dict[str, list[float]] = {p: [] for p in packages}
    for _ in range(repeats):  # interleaved: every case sees the same machine state
        for name, code in COMMANDS.items():
            seconds, loaded[name] = _run(code)
            samples[name].append(seconds)
        for package in packages:
            seconds = _import_after_torch(package)
            if seconds is not None:
                imports[package].append(seconds)
    commands = [{"command": name, "seconds": median(s), "samples": s, "deferred_loaded": loaded[name]}
                for name, s in samples.items()]
    deferred = [{"package": p, "seconds_after_torch": median(s) if s else None, "samples": s, "installed": bool(s)}
                for p, s in imports.items()]
    return commands, deferred


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="cli_startup.py", description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=positive_int, default=5, help="fresh interpreters per case (median)")
    parser.add_argument("--packages", nargs="+", choices=DEFERRED_PACKAGES, default=list(DEFERRED_PACKAGES),
                        help="the deferred packages to time (default: all)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    commands, deferred = measure(args.repeats, tuple(args.packages))
    print(f"fresh interpreters, median of {args.repeats}")
    print(format_table(commands, [("command", "command", "s"), ("seconds", "seconds", ".2f")]))
    print(format_table([d for d in deferred if d["installed"]],
                       [("package", "deferred package", "s"), ("seconds_after_torch", "import after torch, s", ".2f")]))
    if args.json:
        write_json(args.json, {"benchmark": "cli_startup", "command": command_line(), "environment": environment("cpu"),
                               "repeats": args.repeats, "commands": commands, "deferred": deferred})
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
