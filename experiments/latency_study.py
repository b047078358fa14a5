"""Accuracy at equal latency: the latency-targeted allocation against the parameter-targeted one at the same speed.

    python -m experiments.latency_study --cifar10 PATH --models cifar_vit3_wide,cifar_deit4,cifar_swin_long \
        --reach 0.4,0.8 --output experiments/results/latency_study.json

For every model (the study's CIFAR-10 models, experiments/models) the dense model is profiled on this machine
(``lowrank_vit.speed.cached_profile``, at ``--batch`` in ``--runtime``), then compressed with the library's default
recipe (loss-aware, marginal allocation, ranks in multiples of 8) three ways for every target speedup S (given as a
fraction of the way from 1x to the fastest the table allows, which differs much between models this small):

* ``latency``: ``target_speedup=S``, the predicted loss spent per millisecond saved;
* ``params``: a parameter target, the allocation blind to speed, its reduction found by bisection so that the
  table predicts the same speedup S;
* ``params+cap``: the same with the table's cap (no layer slower than dense), bisected the same way.

All of them and the dense model are then timed side by side (interleaved, medians), and evaluated on the same
held-out images without fine-tuning: top-1, KL to the dense model, and the exact McNemar test of ``latency`` against
each other recipe image by image.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

import torch

from lowrank_vit import CompressionConfig, compress
from lowrank_vit.pipeline import plan_compression
from lowrank_vit.speed import cached_profile, model_input_size, time_models

from .loss_aware_study import load_model, paired, predict, scores

MODELS = ("cifar_vit3_wide", "cifar_deit4", "cifar_swin_long")


def _config(calib: int, seed: int, **fields: Any) -> CompressionConfig:
    return CompressionConfig(rank_multiple=8, calib_samples=calib, progress=False, seed=seed, **fields)


def matched_reduction(dense: torch.nn.Module, batches: list, table: str, target: float, calib: int, seed: int,
                      limit: bool, steps: int = 12) -> tuple[float, float]:
    """The parameter reduction whose plan the table predicts at ``target`` (bisection; the predicted speedup grows
    with the reduction): (reduction, predicted speedup)."""
    lo, hi = 0.02, 0.95
    best = None
    for _ in range(steps):
        mid = (lo + hi) / 2
        try:
            plan = plan_compression(copy.deepcopy(dense), batches, _config(calib, seed, reduction=mid,
                                                                            latency_table=table, latency_limit=limit))
        except ValueError:  # beyond what the (capped) layers can reach
            hi = mid
            continue
        predicted = plan.latency["predicted_speedup"]
        if best is None or abs(predicted - target) < abs(best[1] - target):
            best = (mid, predicted)
        lo, hi = (lo, mid) if predicted >= target else (mid, hi)
    if best is None or abs(best[1] - target) > 0.02 * target:
        raise ValueError(f"no parameter target reaches a predicted {target:.2f}x (closest: "
                         f"{'none' if best is None else f'{best[1]:.2f}x'})")
    return best


def reachable(dense: torch.nn.Module, table: Any) -> float:
    """The largest speedup the table predicts for this model (every layer at its fastest rank under the cap)."""
    from lowrank_vit.core.budget import LayerBudget
    from lowrank_vit.core.latency import fastest_ms, rank_limits
    from lowrank_vit.nn.adapters import get_adapter

    layers = [LayerBudget(name, layer.in_features, layer.out_features, 0, torch.zeros(1))
              for name, layer in get_adapter(dense).compressible_layers(dense).items()]
    limits = rank_limits(layers, table)
    layers = [LayerBudget(b.name, b.in_features, b.out_features, 0, b.energy_losses, limits[b.name]) for b in layers]
    return table.model_ms.median / fastest_ms(layers, table)


def run_model(name: str, args: argparse.Namespace, results: dict[str, Any]) -> None:
    dense, data = load_model(name, args.cifar10, Path(args.models_dir), args.eval, args.calib, args.seed)
    dense_logits = predict(dense, data["eval_x"])
    batches = [(data["train_x"][i: i + 64], data["train_y"][i: i + 64]) for i in range(0, args.calib, 64)]
    table, path, _ = cached_profile(dense, batch=args.batch, runtime=args.runtime, name=name, progress=True)
    entry = results.setdefault(name, {})
    reach = reachable(dense, table)
    entry.update(dense_top1=scores(dense_logits, dense_logits, data["eval_y"])["top1"], table=path.name,
                 dense_profiled_ms=table.model_ms.median, reachable_speedup=reach)
    # targets as fractions of the way to the fastest the table allows: models this small differ in what they reach
    for target in [round(1 + fraction * (reach - 1), 2) for fraction in args.reach]:
        models: dict[str, torch.nn.Module] = {"dense": dense}
        cells: dict[str, dict[str, Any]] = {}
        plans = {"latency": dict(target_speedup=target, latency_table=str(path))}
        for label, limit in (("params", False), ("params+cap", True)):
            try:
                reduction, predicted = matched_reduction(dense, batches, str(path), target, args.calib, args.seed,
                                                         limit)
            except ValueError as err:
                cells[label] = {"error": str(err)}
                continue
            plans[label] = dict(reduction=reduction, latency_table=str(path), latency_limit=limit)
        for label, fields in plans.items():
            model = copy.deepcopy(dense)
            try:
                report = compress(model, batches, _config(args.calib, args.seed, **fields))
            except ValueError as err:
                cells[label] = {"error": str(err)}
                continue
            models[label] = model
            cells[label] = {"reduction": report.reduction, "params": report.params_after,
                            "predicted_speedup": report.latency["predicted_speedup"], "ranks": report.ranks,
                            **scores(predict(model, data["eval_x"]), dense_logits, data["eval_y"])}
        times = time_models(models, batch=args.batch, input_size=model_input_size(dense), runtime=args.runtime,
                            repeats=args.repeats, min_time=0.2)
        for label, cell in cells.items():
            if label in times:
                cell.update(ms=times[label].median, ms_q1=times[label].low, ms_q3=times[label].high,
                            measured_speedup=times["dense"].median / times[label].median)
        for label in ("params", "params+cap"):
            if "correct" in cells.get(label, {}) and "correct" in cells.get("latency", {}):
                only_latency, only_other, p = paired(cells["latency"], cells[label])
                cells[label]["vs_latency"] = {"only_latency": only_latency, "only_this": only_other, "p": p}
        entry[f"{target:g}"] = {"dense_ms": times["dense"].median, "cells": cells}
        print(markdown({"models": {name: {"dense_top1": entry["dense_top1"], f"{target:g}": entry[f"{target:g}"]}}}),
              flush=True)


def markdown(results: dict[str, Any]) -> str:
    """The study as docs/speed.md shows it (a test keeps the two equal)."""
    lines = ["| model | target | recipe | params removed | predicted | measured | top-1 | KL | vs latency-targeted |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, entry in results["models"].items():
        for target, block in entry.items():
            if not isinstance(block, dict) or "cells" not in block:
                continue
            for label, cell in block["cells"].items():
                head = f"| {name} (dense {entry['dense_top1']:.2f}%) | {target}x | {label} |"
                if "error" in cell:
                    lines.append(f"{head} not reached | - | - | - | - | - |")
                    continue
                versus = cell.get("vs_latency")
                test = "-" if versus is None else (f"{versus['only_latency']} / {versus['only_this']} images, "
                                                   f"p = {versus['p']:.2g}")
                lines.append(f"{head} {100 * cell['reduction']:.1f}% | {cell['predicted_speedup']:.2f}x | "
                             f"{cell['measured_speedup']:.2f}x | {cell['top1']:.2f}% | {cell['kl']:.3g} | {test} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.latency_study", description=__doc__.split("\n")[0])
    parser.add_argument("--cifar10", required=True, help="local CIFAR-10 (train.parquet and test.parquet)")
    parser.add_argument("--models-dir", default="experiments/models")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--reach", default="0.4,0.8",
                        help="target speedups as fractions of the way from 1x to the fastest the model's table allows "
                             "(comma-separated)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--runtime", default="torch", choices=("torch", "onnxruntime"))
    parser.add_argument("--calib", type=int, default=256, help="calibration images (a multiple of 64)")
    parser.add_argument("--eval", type=int, default=5000, help="held-out images evaluated")
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="results/latency_study.json")
    args = parser.parse_args(argv)
    args.reach = [float(t) for t in args.reach.split(",") if t]
    if any(not 0 < t < 1 for t in args.reach):
        print("--reach takes fractions in (0, 1)", file=sys.stderr)
        return 2
    results: dict[str, Any] = {"settings": {k: v for k, v in vars(args).items() if k not in ("cifar10", "output")},
                               "models": {}}
    for name in [m for m in args.models.split(",") if m]:
        run_model(name, args, results["models"])
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
