"""``lowrank-vit compress --recipe vmeanba`` and ``--vmeanba-blocks K`` beside a low-rank recipe: VMeanba's options,
their checks (before any data is read) and its line of the summary. ``cmd_compress`` runs VMeanba first, so that a
low-rank recipe after it calibrates on the scans the model will run."""

from __future__ import annotations

import argparse
from typing import Any

from torch import nn

from lowrank_vit.harness.argtypes import positive_int
from lowrank_vit.harness.userbase import UserError

RECIPE = "vmeanba"


def add_vmeanba_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("VMeanba (vision state-space models: the channel-mean scan in the blocks of least "
                             "impact)")
    g.add_argument("--vmeanba-blocks", type=positive_int, metavar="K",
                   help="switch K blocks: with --recipe vmeanba alone, or beside a low-rank recipe (VMeanba first)")


def low_rank_budget_given(args: argparse.Namespace) -> bool:
    return any(getattr(args, key, None) is not None for key in ("reduction", "target_params", "target_speedup"))


def vmeanba_config(args: argparse.Namespace) -> Any:
    """The VMeanbaConfig the options ask for, or None; a UserError for a combination that cannot be meant."""
    from lowrank_vit.methods.vmeanba import VMeanbaConfig

    blocks = getattr(args, "vmeanba_blocks", None)
    if args.recipe == RECIPE:
        if args.reduction is not None or args.target_params is not None:
            raise UserError("--recipe vmeanba removes no parameters: give --vmeanba-blocks K or --target-speedup S "
                            "(or a low-rank --recipe with --reduction and --vmeanba-blocks K to combine them)")
        if (blocks is None) == (args.target_speedup is None):
            raise UserError("--recipe vmeanba needs exactly one of --vmeanba-blocks K and --target-speedup S")
        speedup = args.target_speedup
    elif blocks is None:
        return None
    else:
        speedup = None  # beside a low-rank recipe, --target-speedup is the low-rank allocation's
    try:
        return VMeanbaConfig(num_blocks=blocks, target_speedup=speedup, calib_samples=args.calib_samples,
                             latency_batch=args.latency_batch, timing=not args.no_timing, progress=not args.quiet)
    except ValueError as err:
        raise UserError(str(err)) from None


def check_vmeanba(model: nn.Module, cfg: Any) -> None:
    """A model without selective scans, or a K above its count: one line, before the data is read."""
    from lowrank_vit.methods.vmeanba import check_blocks

    try:
        check_blocks(model, cfg)
    except ValueError as err:
        raise UserError(str(err)) from None


def summary_line(report: dict[str, Any]) -> str:
    text = f", VMeanba on {len(report['chosen'])} block(s) (KL {report['kl']:.4f})"
    if report.get("measured_speedup") is not None:
        text += (f", {report['predicted_speedup']:.2f}x predicted / {report['measured_speedup']:.2f}x measured "
                 f"(scans {report['scan_speedup']:.1f}x)")
    return text
