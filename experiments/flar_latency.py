"""FLAR-SVD with and without its latency rule, on one model, on this machine.

    python -m experiments.flar_latency --cifar10 PATH/TO/cifar10 [--model cifar_vit6_long] [--ratios 0.2,0.3,0.5,0.7]
        [--batch 64] [--table results/flar_latency_table.json] [--output experiments/results/flar_latency.json]

FLAR-SVD's published search rejects ranks that a latency model predicts to be slower than the dense layer, and a
layer whose scaled rank is slower goes dense. With a ``profile`` table the library applies the same rule
(``CompressionConfig.latency_table`` with ``latency_limit``: a layer's ranks stop at its profiled break-even rank, and
FLAR-SVD's scaling turns a layer past it dense). This script profiles the model here (or reads a table measured here),
compresses it with ``flar-svd`` at each ratio with the rule (``latency_limit=True``) and without it (the same table,
``latency_limit=False``, so that both are predicted on it), and compares them image by image (exact McNemar) and in
end-to-end time: the table's prediction and a side-by-side measurement of both compressed models and the dense one.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

from lowrank_vit import compress
from lowrank_vit.config import RECIPES
from lowrank_vit.core.latency import LatencyTable
from lowrank_vit.speed.profile import model_input_size, profile_model, time_models

from .loss_aware_study import load_model, paired, predict, scores


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cifar10", default=None)
    parser.add_argument("--models-dir", default="experiments/models")
    parser.add_argument("--model", default="cifar_vit6_long")
    parser.add_argument("--ratios", default="0.2,0.3,0.5,0.7")
    parser.add_argument("--calib", type=int, default=256)
    parser.add_argument("--eval", type=int, default=5000)
    parser.add_argument("--batch", type=int, default=64, help="the batch the latency table is profiled at")
    parser.add_argument("--table", default="results/flar_latency_table.json",
                        help="the latency table (profiled here at the first run, reused after)")
    parser.add_argument("--output", default="experiments/results/flar_latency.json")
    args = parser.parse_args(argv)

    dense, data = load_model(args.model, args.cifar10, Path(args.models_dir), args.eval, args.calib, 0)
    table_path = Path(args.table)
    if not table_path.is_file():
        table_path.parent.mkdir(parents=True, exist_ok=True)
        profile_model(dense, batch=args.batch, name=args.model).save(table_path)
    table = LatencyTable.load(table_path)
    dense_logits = predict(dense, data["eval_x"])
    batches = [(data["train_x"][i: i + 64], data["train_y"][i: i + 64]) for i in range(0, args.calib, 64)]
    out: dict[str, Any] = {"model": args.model, "calib": args.calib, "eval": args.eval, "batch": table.batch,
                           "device_name": table.device_name, "threads": table.threads,
                           "dense_top1": scores(dense_logits, dense_logits, data["eval_y"])["top1"], "cells": {}}
    for ratio in [float(r) for r in args.ratios.split(",")]:
        models, cells = {}, {}
        for rule in (False, True):
            model = copy.deepcopy(dense)
            report = compress(model, batches, reduction=ratio, calib_samples=args.calib, progress=False, seed=0,
                              latency_table=str(table_path), latency_limit=rule, **RECIPES["flar-svd"])
            cells[rule] = {"params_after": report.params_after, "target": report.target_params,
                           "dense_layers": sum(layer.rank is None for layer in report.layers),
                           "predicted_speedup": report.latency["predicted_speedup"],
                           **scores(predict(model, data["eval_x"]), dense_logits, data["eval_y"])}
            models["with rule" if rule else "without rule"] = model
        timings = time_models({"dense": dense, **models}, batch=table.batch, input_size=model_input_size(dense),
                              progress=False)
        for rule, name in ((False, "without rule"), (True, "with rule")):
            cells[rule]["measured_speedup"] = timings["dense"].median / timings[name].median
        only_without, only_with, p = paired(cells[False], cells[True])
        out["cells"][str(ratio)] = {"without_rule": cells[False], "with_rule": cells[True],
                                    "only_without": only_without, "only_with": only_with, "p": p}
        print(f"-{round(100 * ratio)}%: without the rule top-1 {cells[False]['top1']:.2f} "
              f"(x{cells[False]['measured_speedup']:.2f} measured, x{cells[False]['predicted_speedup']:.2f} "
              f"predicted), with it {cells[True]['top1']:.2f} (x{cells[True]['measured_speedup']:.2f}, "
              f"x{cells[True]['predicted_speedup']:.2f}); McNemar p = {p:.2g}", file=sys.stderr, flush=True)
    Path(args.output).write_text(json.dumps(out, indent=1) + "\n")
    return 0


def render(results: dict[str, Any]) -> str:
    """docs/peers.md's table of the latency rule: per ratio, FLAR-SVD without and with it."""
    lines = ["| ratio | FLAR-SVD | top-1 | layers left dense | predicted speedup | measured speedup | McNemar p |",
             "|---|---|---|---|---|---|---|"]
    for ratio, cell in results["cells"].items():
        for key, label in (("without_rule", "without the latency rule"), ("with_rule", "with it")):
            c = cell[key]
            lines.append(f"| -{round(100 * float(ratio))}% | {label} | {c['top1']:.2f} | {c['dense_layers']} | "
                         f"x{c['predicted_speedup']:.2f} | x{c['measured_speedup']:.2f} | "
                         + (f"{cell['p']:.2g} |" if key == "with_rule" else "|"))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
