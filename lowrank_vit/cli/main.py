"""``lowrank-vit``: the parser of every command and its entry point. The registry's commands (list, show, plan, run,
reproduce, demo, rehearse) are handled here, over :mod:`lowrank_vit.repro`; the commands for one's own model live in
:mod:`lowrank_vit.cli.compress` (compress, evaluate, export), :mod:`lowrank_vit.cli.finetune` and
:mod:`lowrank_vit.cli.speed` (profile).

Bad input (an unknown name, an invalid option, missing data or weights) ends with one line on stderr and exit
status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from lowrank_vit.cli.args import positive_int
from lowrank_vit.cli.compress import add_user_commands
from lowrank_vit.cli.speed import add_profile_command
from lowrank_vit.repro.demo import DEMO_ROWS, publish, run_demo
from lowrank_vit.repro.estimate import estimate_rows, format_row, format_rows
from lowrank_vit.repro.models import SetupError
from lowrank_vit.repro.planning import plan_row
from lowrank_vit.repro.registry import UnknownExperimentError, get_experiment, list_experiments
from lowrank_vit.repro.rehearse import LAYOUTS, RehearsalSettings, rehearse
from lowrank_vit.repro.rows import RESULT_FILE, finished
from lowrank_vit.repro.runner import default_output, reproduce, row_config, run_row, select_rows
from lowrank_vit.repro.standins import COMMITTED_STANDINS
from lowrank_vit.stages.data_config import DataFormatError, DataNotFoundError
from lowrank_vit.stages.logging_utils import silence_third_party

EXIT_USAGE = 2
LIGHTNING_FREE = ("list", "show", "plan")
"""Commands that never import Lightning (they read the registry and plan; nothing trains or loads data)."""
DEMO_PUBLISHED = "experiments/results/demo_table2.{json,txt}"


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # argparse prints the usage too; we want one line
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _add_hardware(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scale", choices=("full", "smoke"), default="full",
                        help="full: the paper (timm weights, ImageNet, GPUs); smoke: tiny MNIST stand-ins on a CPU")
    parser.add_argument("--devices", type=positive_int, help="processes (GPUs) per node; >1 runs DDP")
    parser.add_argument("--num-nodes", type=positive_int, help="nodes (SLURM / torchrun multi-node)")
    parser.add_argument("--accelerator", choices=("cpu", "gpu", "auto"),
                        help="the device the rows run on (default: the row's config; auto: a GPU if torch sees one)")
    parser.add_argument("--output", help="results directory (default: results/, or results/smoke/ for --scale smoke)")
    parser.add_argument("--wandb", choices=("online", "offline", "disabled"), default="offline",
                        help="wandb logging (online falls back to offline without an API key or network)")
    parser.add_argument("--wandb-group", dest="group",
                        help="wandb group of the runs (default TABLE-SCALE, e.g. compare-smoke)")
    parser.add_argument("--force", action="store_true", help="run again even if a result is already there")
    _add_set(parser)
    parser.add_argument("--quiet", action="store_true",
                        help="print nothing but the results (no progress lines or bars)")


def _add_set(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", dest="overrides",
                        help="change one config field, e.g. --set finetune.epochs=1 (repeatable; see `show`)")


def _add_estimate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--estimate", action="store_true",
                        help="estimated FLOPs, memory and time of every stage from the model's shapes and the data "
                             "sizes (no data, weights or network; docs/estimate.md)")
    parser.add_argument("--gpu", metavar="DEVICE",
                        help="with --estimate: a100 (default), h100, a6000, rtx4090 or cpu")


def _package_version() -> str:
    try:
        return importlib.metadata.version("lowrank_vit")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "(not installed)"


def add_rehearse_command(sub: Any) -> dict[str, Callable[[argparse.Namespace], int]]:
    """Register ``rehearse`` on ``lowrank-vit``'s subparsers; returns its handler by name."""
    p = sub.add_parser("rehearse", help="run rows' full-scale configs on a CPU (or GPUs) with random weights and "
                                        "generated data, cut to a few steps; one line per row, ok or what broke")
    p.add_argument("patterns", nargs="+", metavar="NAME_OR_PATTERN",
                   help="row names, shell patterns or prefixes, e.g. 'table2/deit_s/*' or table4")
    p.add_argument("--layout", choices=list(LAYOUTS), default="hub-parquet", help="the generated ImageNet layout")
    p.add_argument("--devices", type=positive_int, default=1, help="processes per row (>1: DDP), one per CPU or GPU")
    p.add_argument("--accelerator", choices=("cpu", "gpu"), default="cpu",
                   help="where the rows run (default cpu; gpu: one CUDA device per process)")
    p.add_argument("--depth", type=positive_int,
                   help="shrink every model to at most this many blocks per stage (said on every line; default: "
                        "the full architecture)")
    p.add_argument("--workdir", help="where the rows' temporary files go (default: the system's temporary folder)")
    p.add_argument("--record", metavar="FILE",
                   help="append each row's outcome to this JSON-lines file as soon as the row ends")
    p.add_argument("--resume", action="store_true",
                   help="skip the rows already ok in --record FILE with the same layout, devices, accelerator and "
                        "depth")
    return {"rehearse": _cmd_rehearse}


def _cmd_rehearse(args: argparse.Namespace) -> int:
    settings = RehearsalSettings(layout=args.layout, devices=args.devices, accelerator=args.accelerator,
                                 depth=args.depth)  # a ValueError is the CLI's one-line error
    outcomes = rehearse(args.patterns, settings, keep=args.workdir, echo=lambda line: print(line, flush=True),
                        record=args.record, resume=args.resume)
    failed = [o["name"] for o in outcomes if not o["ok"]]
    ran = [o for o in outcomes if not o.get("recorded")]
    recorded = len(outcomes) - len(ran)
    summary = (f"rehearse: {len(outcomes) - len(failed)} of {len(outcomes)} row(s) ok in "
               f"{sum(o['seconds'] for o in ran):.0f} s")
    if recorded:
        summary += (f" ({len(ran)} run now, {recorded} ok in the record; all rows together "
                    f"{sum(o['seconds'] for o in outcomes):.0f} s summed over the runs)")
    print(summary + (f"; broken: {', '.join(failed)}" if failed else ""), file=sys.stderr)
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lowrank-vit", description="Activation-aware mixed-rank compression of timm ViTs: "
                                                     "the paper's tables as reproducible jobs.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_package_version()}",
                        help="print the installed version and exit")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("list", help="names of the registered experiments")
    p.add_argument("pattern", nargs="?", help="shell pattern or prefix, e.g. 'table2/deit_s/*' or table3")
    p.add_argument("--json", action="store_true", help="each entry's table, method and paper numbers as JSON")

    p = sub.add_parser("show", help="an experiment's resolved config as JSON")
    p.add_argument("name", help="a registered experiment (see `list`), e.g. table2/deit_s/ours-50")
    p.add_argument("--scale", choices=("full", "smoke"), help="only this scale's config (default: both)")

    p = sub.add_parser("plan", help="allocate a row's ranks and count its parameters, without data")
    p.add_argument("name", help="a registered experiment (see `list`), e.g. table2/deit_s/ours-50")
    p.add_argument("--synthetic", action="store_true",
                   help="the only mode, also without the flag: seeded random weights and synthetic calibration "
                        "images, so two runs give the same ranks; no data, weights or network")
    p.add_argument("--scale", choices=("full", "smoke"), default="full",
                   help="the config planned: full (the paper's model) or smoke (its tiny stand-in); default full")
    p.add_argument("--calib-images", type=positive_int, default=4, help="synthetic calibration images (default 4)")
    _add_set(p)
    p.add_argument("--json", action="store_true", help="totals, per-layer ranks and parameter counts and MiB as JSON")
    _add_estimate(p)
    p.add_argument("--devices", type=positive_int,
                   help="with --estimate: GPUs of the data-parallel fine-tune (default 1)")

    p = sub.add_parser("run", help="the whole pipeline of one row; writes OUTPUT/NAME/result.json and the model")
    p.add_argument("name", help="a registered experiment (see `list`), e.g. table2/deit_s/ours-50")
    _add_hardware(p)

    p = sub.add_parser("reproduce", help="run a table's unfinished rows, then write OUTPUT/TABLE.md and .json")
    p.add_argument("table", help="table1, table2, table3, table4, ablation, compare or vmeanba")
    p.add_argument("--rows", help="only the rows matching this shell pattern, e.g. 'table2/deit_s/*'")
    p.add_argument("--dry-run", action="store_true", help="list the rows that would run; run nothing")
    _add_estimate(p)
    p.add_argument("--json", action="store_true", help="with --dry-run --estimate: the estimate as JSON")
    _add_hardware(p)
    p = sub.add_parser("demo", help="a miniature Table 2 on the MNIST stand-in of DeiT-S, offline on a CPU")
    p.add_argument("--output", default="results/demo", help="where the table, figures and runs go")
    p.add_argument("--rows", nargs="+", help="only these registry rows (default: all the demo's rows)")
    p.add_argument("--wandb", choices=("online", "offline", "disabled"), default="offline",
                   help="wandb logging of the rows' runs (default offline)")
    p.add_argument("--no-figures", action="store_true", help="skip drawing the figures (the table only)")
    p.add_argument("--force", action="store_true", help="run rows again even if finished")
    p.add_argument("--standins", default=str(COMMITTED_STANDINS),
                   help=f"the stand-in weights to start from (default {COMMITTED_STANDINS}, the committed ones: the "
                        "README's table on any machine; missing: the cached or a newly trained stand-in)")
    p.add_argument("--retrain", action="store_true", help="train the stand-in anew instead (another table)")
    p.add_argument("--quiet", action="store_true", help="print nothing but the table")
    p.add_argument("--publish", action="store_true",
                   help=f"also copy the table to {DEMO_PUBLISHED} and refresh the README's excerpt (what `make "
                        f"demo-refresh` runs)")
    _add_set(p)
    COMMANDS.update(add_user_commands(sub))  # compress / evaluate / finetune / export (lowrank_vit/cli/compress.py)
    COMMANDS.update(add_rehearse_command(sub))  # the rows' machinery is lowrank_vit/repro/rehearse.py
    COMMANDS.update(add_profile_command(sub))  # lowrank_vit/cli/speed.py
    return parser


def _cmd_list(args: argparse.Namespace) -> int:
    exps = list_experiments(args.pattern)
    if args.pattern and not exps:
        raise CLIError(f"no experiment matches {args.pattern!r}")
    if args.json:
        print(json.dumps([{k: v for k, v in e.to_dict().items() if k not in ("full", "smoke")} for e in exps],
                         indent=2))
    else:
        for e in exps:
            print(e.name)
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    print(json.dumps(get_experiment(args.name).to_dict(args.scale), indent=2))
    return 0


def _estimate_rows(pattern: str) -> list[Any]:
    """The rows ``plan --estimate`` prices: the one called ``pattern``, else every row it matches."""

    exps = list_experiments(pattern)
    if not exps and any(c in pattern for c in "*?["):
        raise CLIError(f"no experiment matches {pattern!r}")
    return exps or [get_experiment(pattern)]  # an unknown name: get_experiment's error suggests the closest names


def _print_estimate(args: argparse.Namespace, exps: list[Any], scale: str, devices: int,
                    table: bool = False) -> int:
    """One row in full (its stages), or several as one line each and the total (``table``: always the latter)."""

    data = estimate_rows(exps, scale, device=args.gpu or "a100", devices=devices, overrides=args.overrides)
    single = len(data["rows"]) == 1 and not table
    if args.json:
        print(json.dumps(data["rows"][0] if single else data, indent=2))
    else:
        print(format_row(data["rows"][0]) if single else format_rows(data))
    return 0


def _check_estimate_options(args: argparse.Namespace) -> None:
    """--gpu (and --json on reproduce) mean something only with --estimate: refused rather than ignored."""
    if args.gpu is not None and not args.estimate:
        raise CLIError("--gpu chooses the device of an estimate: add --estimate")
    if args.command == "reproduce" and args.json and not args.estimate:
        raise CLIError("--json prints an estimate: add --dry-run --estimate")


def _cmd_plan(args: argparse.Namespace) -> int:
    _check_estimate_options(args)
    if args.devices is not None and not args.estimate:
        raise CLIError("--devices prices the fine-tune of an estimate: add --estimate")
    if args.estimate:
        return _print_estimate(args, _estimate_rows(args.name), args.scale, args.devices or 1)
    exp = get_experiment(args.name)
    result = plan_row(exp, args.scale, synthetic=True, calib_images=args.calib_images,
                      overrides=args.overrides, progress=False)
    if args.json:
        keys = ["name", "scale", "seed", "params_before", "params_after", "target_params", "paper_params",
                "reduction", "size_mib", "paper_size_mib", "layers"]
        print(json.dumps({k: result[k] for k in keys if k in result}))
    else:
        print(f"{result['name']} [{args.scale}, synthetic weights and images, seed {result['seed']}]: "
              f"{result['params_before']:,} -> {result['params_after']:,} parameters "
              f"(-{100 * result['reduction']:.2f}%)"
              + (f", paper {result['paper_params']:,}" if result["paper_params"] else "")
              + (f", {result['size_mib']:.1f} MiB" if "size_mib" in result else ""))
        if result["layers"]:
            print(f"  {'layer':40s} {'rank':>6s} {'params':>12s} {'dense':>12s}")
        for layer in result["layers"]:
            rank = "dense" if layer["rank"] is None else str(layer["rank"])
            print(f"  {layer['name']:40s} {rank:>6s} {layer['params']:>12,d} {layer['dense_params']:>12,d}")
    return 0


def _hardware(args: argparse.Namespace) -> dict[str, Any]:
    return dict(accelerator=args.accelerator, devices=args.devices, num_nodes=args.num_nodes, output=args.output,
                overrides=args.overrides, wandb=args.wandb, force=args.force, progress=not args.quiet,
                group=args.group)


def _cmd_run(args: argparse.Namespace) -> int:
    result = run_row(get_experiment(args.name), args.scale, **_hardware(args))
    if result is not None:  # the result line (None on the other ranks of a DDP run)
        print(result_line(result, args.output, args.scale))
    return 0


def _cmd_reproduce(args: argparse.Namespace) -> int:
    if args.estimate and not args.dry_run:
        raise CLIError("--estimate prices the rows without running them: add --dry-run")
    _check_estimate_options(args)
    if args.dry_run:
        return _dry_run(args)
    data = reproduce(args.table, args.scale, rows=args.rows, **_hardware(args))
    print(data["selected_markdown"], end="")  # the rows asked for; OUTPUT/TABLE.md holds the whole table
    if data["failed"]:
        print(f"lowrank-vit: {len(data['failed'])} row(s) failed: {', '.join(data['failed'])}", file=sys.stderr)
        return 1
    return 0


def _dry_run(args: argparse.Namespace) -> int:
    """``reproduce --dry-run``: the rows that would run (unfinished ones), or with --estimate every row's estimated
    cost and the table's total."""


    exps = select_rows(args.table, args.rows)
    if args.estimate:
        return _print_estimate(args, exps, args.scale, args.devices or 1, table=True)
    output = Path(args.output) if args.output else default_output(args.scale)
    for exp in exps:
        cfg = row_config(exp, args.scale, args.overrides)
        print(f"{exp.name}: {'finished, skipped' if finished(exp, cfg, output) is not None else 'would run'}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.publish and (args.rows or args.overrides):
        raise CLIError("--publish records the demo as `make demo-refresh` runs it: drop --rows and --set")
    if args.publish and args.retrain:
        raise CLIError("--publish records the demo from the committed stand-in: drop --retrain")
    summary = run_demo(args.output, rows=args.rows or DEMO_ROWS, overrides=args.overrides, wandb=args.wandb,
                       force=args.force, figures=not args.no_figures, progress=not args.quiet,
                       standins=args.standins, retrain=args.retrain)
    if args.publish:
        for path in publish(summary):
            print(f"demo: wrote {path}", file=sys.stderr)
    return 0


COMMANDS = {"list": _cmd_list, "show": _cmd_show, "plan": _cmd_plan, "run": _cmd_run, "reproduce": _cmd_reproduce,
            "demo": _cmd_demo}


def result_line(result: dict[str, Any], output: str | None, scale: str) -> str:
    """What `run` prints on stdout: the row's top-1, parameters and size, and where its result.json is."""

    where = os.path.join(output or default_output(scale), result["name"], RESULT_FILE)
    return (f"{result['name']}: top-1 {result['top1']:.2f}% with {result['params']:,} parameters "
            f"({result['size_mib']:.1f} MiB) -> {where}")


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 500 else text[:497] + "..."


def main(argv: list[str] | None = None) -> int:
    """The console script. A reader that closes the pipe early (``lowrank-vit list | head -2``) ends it quietly
    with status 0, as ``cat`` and ``ls`` do, instead of a BrokenPipeError traceback."""
    try:
        code = _main(argv)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler, rather than at interpreter exit
        return code
    except BrokenPipeError:
        # Python flushes stdout again at exit; point it at /dev/null so that flush cannot fail a second time
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)

    silence_third_party(lightning=args.command not in LIGHTNING_FREE)
    expected = (CLIError, UnknownExperimentError, SetupError, DataNotFoundError, DataFormatError, ValueError,
                FileNotFoundError, FloatingPointError)
    try:
        return COMMANDS[args.command](args)
    except expected as err:
        print(f"lowrank-vit: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("lowrank-vit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
