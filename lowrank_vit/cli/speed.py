"""``lowrank-vit profile``, and the latency options of ``compress`` and ``evaluate``: speed measured, never guessed.

- ``profile MODEL --device cpu|cuda --runtime torch|onnxruntime --dtype float32|bfloat16|float16 --batch N ...``
  measures the model's layer latency table at every batch size (:func:`lowrank_vit.speed.cached_profile`: cached per
  machine and software versions, reused while they match), prints each shape's dense time and break-even rank, and
  draws latency against rank (``--plot``).
- ``compress ... --latency-table PATH|auto`` caps every layer's rank where it would be slower than dense on that
  target; ``--target-speedup S`` allocates for a predicted end-to-end speedup instead of a parameter count (profiling
  the model first when no table is given). Afterwards the dense and the compressed model (folded) are timed side by
  side on the table's target, and predicted and measured latency are printed and saved in ``report.json``.

The options themselves are declared with every other command's in :mod:`lowrank_vit.cli.args`.
"""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from lowrank_vit.cli.args import add_input_size, add_latency_target, add_model, positive_int
from lowrank_vit.cli.base import UserError, say_to_user, user_command
from lowrank_vit.cli.sources import timm_source
from lowrank_vit.core.files import strict_json
from lowrank_vit.core.latency import LatencyTable
from lowrank_vit.speed import cached_profile, model_input_size, plot_table, time_models


def add_profile_command(sub: Any) -> dict[str, Callable[[argparse.Namespace], int]]:
    p = sub.add_parser("profile", help="measure a model's layer latency table (dense and factored forms by rank)")
    add_model(p, "MODEL")
    add_input_size(p, "H, HxW or C,H,W (default: the model's own)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="the target timed (default cpu)")
    add_latency_target(p)
    p.add_argument("--batch", type=positive_int, nargs="+", default=[1], help="batch sizes (default 1)")
    p.add_argument("--rank-step", type=positive_int, default=8, help="ranks profiled: multiples of this (default 8)")
    p.add_argument("--repeats", type=positive_int, default=5, help="interleaved repeats per form (default 5)")
    p.add_argument("--output", help="also copy every table here (a folder; default: the cache only)")
    p.add_argument("--plot", help="a folder for the figures of latency against rank (one PNG per batch size)")
    p.add_argument("--force", action="store_true", help="measure again even if the cache holds a table")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress bars or messages")
    return {"profile": user_command(cmd_profile)}


def _dense_model(args: argparse.Namespace) -> tuple[nn.Module, str]:
    """The dense architecture MODEL names, with random weights (speed does not depend on them)."""
    if Path(args.model).expanduser().is_dir():
        raise UserError(f"{args.model!r} is a model directory: profile the dense architecture by its timm name "
                        f"(with the same --model-kwargs)")
    args.no_pretrained, args.checkpoint = True, None
    source = timm_source(args)
    return source.model.eval(), source.architecture


def cmd_profile(args: argparse.Namespace) -> int:
    model, name = _dense_model(args)
    size = model_input_size(model)
    results = []
    for batch in args.batch:
        try:
            table, path, fresh = cached_profile(model, batch=batch, input_size=size, device=args.device,
                                                runtime=args.runtime, dtype=args.dtype, rank_step=args.rank_step,
                                                name=name, force=args.force, repeats=args.repeats,
                                                progress=not args.quiet)
        except ValueError as err:
            raise UserError(str(err)) from None
        say_to_user(args, f"{'measured' if fresh else 'cached'}: {path}")
        if args.output:
            out = Path(args.output).expanduser()
            out.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, out / path.name)
            path = out / path.name
        figure = plot_table(table, Path(args.plot).expanduser() / f"{path.stem}.png") if args.plot else None
        results.append((table, path, figure))
    if args.json:
        print(strict_json([{"table": str(path), "figure": None if fig is None else str(fig),
                            **summary(table)} for table, path, fig in results]))
        return 0
    for table, path, figure in results:
        print(render(table))
        print(f"table: {path}" + (f"\nfigure: {figure}" if figure else ""))
    return 0


def summary(table: LatencyTable) -> dict[str, Any]:
    """What ``profile`` prints, as data."""
    return {"model": table.model, "batch": table.batch, "device": table.device_name, "runtime": table.runtime,
            "dtype": table.dtype, "model_ms": table.model_ms.record(),
            "shapes": [{"in": s.in_features, "out": s.out_features, "rows": s.rows, "dense_ms": s.dense.record(),
                        "break_even_rank": s.break_even(), "equal_cost_rank": s.ranks[-1] if s.ranks else 0,
                        "layers": sum(1 for key in table.layers.values() if key == s.key)}
                       for s in table.shapes.values()]}


def render(table: LatencyTable) -> str:
    """The table for people: per shape its dense time and the largest rank still faster than dense."""
    lines = [f"{table.model}, batch {table.batch}, {table.runtime} {table.dtype} on {table.device_name} "
             f"({table.threads} threads): dense model {table.model_ms.text()}",
             f"{'shape':>12s} {'rows':>6s} {'layers':>6s} {'dense ms':>9s} {'IQR':>15s} {'break-even':>10s} "
             f"{'of':>5s}"]
    for s in table.shapes.values():
        count = sum(1 for key in table.layers.values() if key == s.key)
        lines.append(f"{s.in_features:>5d}x{s.out_features:<6d} {s.rows:>6d} {count:>6d} {s.dense.median:>9.3f} "
                     f"{s.dense.low:>7.3f}-{s.dense.high:<7.3f} {s.break_even():>10d} {s.ranks[-1]:>5d}")
    lines.append("break-even: the largest profiled rank at which the factored layer is faster than dense (0: never); "
                 "of: the largest rank profiled (the equal-cost rank, in steps)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- compress's options


def resolve_latency_table(args: argparse.Namespace, model: nn.Module, name: str, device: str) -> str | None:
    """The table ``compress`` uses: the given path, or (``auto``, or a target speedup without a table) the model
    profiled now on the latency target (from the cache when it was measured here before)."""

    given = args.latency_table
    if given is None and args.target_speedup is None:
        return None
    if given not in (None, "auto"):
        return str(Path(given).expanduser())
    target = args.latency_device or device
    try:
        table, path, fresh = cached_profile(model, batch=args.latency_batch, device=target,
                                            runtime=args.latency_runtime, dtype=args.latency_dtype, name=name,
                                            progress=not args.quiet)
    except ValueError as err:
        raise UserError(str(err)) from None
    say_to_user(args, f"latency table ({'measured now' if fresh else 'cached'}): {path}")
    return str(path)


def measured_latency(args: argparse.Namespace, dense: nn.Module, compressed: nn.Module,
                     report: dict[str, Any]) -> dict[str, Any]:
    """Dense and compressed (folded) timed side by side on the table's target; predicted beside measured."""

    predicted = report.get("latency") or {}
    if not predicted or args.no_timing:
        return {}
    table = LatencyTable.load(report["config"]["latency_table"])
    times = time_models({"dense": dense, "compressed": compressed}, batch=table.batch,
                        input_size=model_input_size(dense), device=table.device, runtime=table.runtime,
                        dtype=table.dtype, progress=not args.quiet)
    measured = times["dense"].median / times["compressed"].median
    out = {**predicted, "measured": {name: t.record() for name, t in times.items()}, "measured_speedup": measured}
    say_to_user(args, f"latency, batch {table.batch}, {table.runtime} {table.dtype} on {table.device}: dense "
                      f"{times['dense'].text()}, compressed {times['compressed'].text()}: {measured:.2f}x measured, "
                      f"{predicted['predicted_speedup']:.2f}x predicted")
    return out
