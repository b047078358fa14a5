"""VMeanba and the low-rank methods on the vision state-space stand-ins (experiments/ssm_models.py).

    python -m experiments.vmeanba_study --cifar10 PATH --output experiments/results/vmeanba_study.json

For every model: the channel-mean scan in the K blocks of least impact for every K from 0 to all blocks; the
library's default (loss-aware) and the paper's recipe at -30% and -50% of the parameters; and the two together
(VMeanba on half the blocks, then the low-rank recipe). Each cell is evaluated on the same held-out CIFAR-10 test
images without fine-tuning: top-1, KL to the dense model, and the exact McNemar test against the dense model image
by image. Then the dense model and the chosen cells are timed side by side (interleaved medians) at batch 1 and 32 in
torch and onnxruntime, and the scans alone (dense against channel-mean, on each block's own inputs).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

import torch

from lowrank_vit import compress
from lowrank_vit.config import recipe
from lowrank_vit.methods.vmeanba import apply_vmeanba, scan_blocks
from lowrank_vit.speed import model_input_size, time_models

from .loss_aware_study import load_model, paired, predict, scores

MODELS = ("cifar_vssm4", "cifar_vssm2_deep")
REDUCTIONS = (0.3, 0.5)


def _cell(model: torch.nn.Module, data: dict[str, torch.Tensor], dense_logits: torch.Tensor,
          dense_cell: dict[str, Any] | None) -> dict[str, Any]:
    cell = scores(predict(model, data["eval_x"]), dense_logits, data["eval_y"])
    if dense_cell is not None:
        only_this, only_dense, p = paired(cell, dense_cell)
        cell.update(only_this=only_this, only_dense=only_dense, p_vs_dense=p)
    return cell


def run_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    dense, data = load_model(name, args.cifar10, Path(args.models), args.eval_images, args.calib, args.seed)
    calib = [data["train_x"][i: i + 64] for i in range(0, args.calib, 64)]
    dense_logits = predict(dense, data["eval_x"])
    cells: dict[str, Any] = {"dense": _cell(dense, data, dense_logits, None)}
    blocks = len(scan_blocks(dense))
    models: dict[str, torch.nn.Module] = {"dense": dense}
    reports: dict[str, Any] = {}
    for k in range(1, blocks + 1):
        model = copy.deepcopy(dense)
        report = apply_vmeanba(model, calib, num_blocks=k, calib_samples=args.calib, timing=k == blocks,
                               latency_batch=32, progress=False)
        cells[f"vmeanba@{k}"] = _cell(model, data, dense_logits, cells["dense"])
        reports[f"vmeanba@{k}"] = {key: report.to_dict()[key] for key in ("chosen", "kl", "scores", "scan_speedup",
                                                                          "predicted_speedup", "measured_speedup")}
        models[f"vmeanba@{k}"] = model
        print(f"{name} vmeanba@{k}: top-1 {cells[f'vmeanba@{k}']['top1']:.2f}%", file=sys.stderr)
    half = max(1, blocks // 2)
    for reduction in REDUCTIONS:
        for recipe_name in ("loss-aware", "paper"):
            model = copy.deepcopy(dense)
            compress(model, calib, recipe(recipe_name, reduction=reduction, calib_samples=args.calib,
                                          progress=False, seed=args.seed))
            key = f"{recipe_name}@{reduction:g}"
            cells[key] = _cell(model, data, dense_logits, cells["dense"])
            models[key] = model
            print(f"{name} {key}: top-1 {cells[key]['top1']:.2f}%", file=sys.stderr)
        model = copy.deepcopy(models[f"vmeanba@{half}"])
        compress(model, calib, recipe("loss-aware", reduction=reduction, calib_samples=args.calib, progress=False,
                                      seed=args.seed))
        key = f"vmeanba@{half}+loss-aware@{reduction:g}"
        cells[key] = _cell(model, data, dense_logits, cells["dense"])
        models[key] = model
        print(f"{name} {key}: top-1 {cells[key]['top1']:.2f}%", file=sys.stderr)
    timed = ["dense", f"vmeanba@{half}", f"vmeanba@{blocks}", "loss-aware@0.5", f"vmeanba@{half}+loss-aware@0.5"]
    timings: dict[str, Any] = {}
    for runtime in args.runtimes.split(","):
        for batch in (1, 32):
            result = time_models({k: models[k] for k in timed}, batch=batch, input_size=model_input_size(dense),
                                 runtime=runtime, repeats=args.repeats, progress=False)
            timings[f"{runtime}/b{batch}"] = {k: {"median_ms": t.median, "q1_ms": t.low, "q3_ms": t.high,
                                                  "repeats": t.repeats, "speedup": result["dense"].median / t.median}
                                              for k, t in result.items()}
    return {"blocks": blocks, "params": sum(p.numel() for p in dense.parameters()), "cells": cells,
            "vmeanba": reports, "timings": timings}


def markdown(results: dict[str, Any]) -> str:
    """The accuracy tables and the timing table of docs/vmeanba.md, from the study's JSON."""
    out = []
    for name, model in results["models"].items():
        out.append(f"**{name}** ({model['params']:,} parameters, {model['blocks']} blocks; "
                   f"{results['eval_images']:,} test images; timed on {results.get('threads', '?')} CPU "
                   "thread(s))\n")
        out.append("| cell | top-1 % | KL to dense | right only here / only dense | McNemar p |")
        out.append("|---|---|---|---|---|")
        for key, cell in model["cells"].items():
            pair = (f"{cell['only_this']} / {cell['only_dense']} | {cell['p_vs_dense']:.2g}" if "p_vs_dense" in cell
                    else "| ")
            out.append(f"| {key} | {cell['top1']:.2f} | {cell['kl']:.4f} | {pair} |")
        out.append("")
        full = model["vmeanba"][f"vmeanba@{model['blocks']}"]
        if full.get("scan_speedup"):
            out.append(f"Scans alone, all {model['blocks']} blocks switched (torch, batch 32): "
                       f"{full['scan_speedup']:.1f}x faster.\n")
        runs = list(model["timings"])
        spread = "q1_ms" in next(iter(model["timings"].values()))["dense"]  # studies before quartiles were kept
        out.append("| model | " + " | ".join(f"{r} speedup" + (" (median ms, IQR)" if spread else "") for r in runs)
                   + " |")
        out.append("|---" * (len(runs) + 1) + "|")
        for key in next(iter(model["timings"].values())):
            cells = [model["timings"][r][key] for r in runs]
            out.append(f"| {key} | " + " | ".join(
                f"{c['speedup']:.2f}x" + (f" ({c['median_ms']:.1f}, {c['q1_ms']:.1f}-{c['q3_ms']:.1f})"
                                          if "q1_ms" in c else "") for c in cells) + " |")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.vmeanba_study", description=__doc__.split("\n")[0])
    parser.add_argument("--cifar10", required=True)
    parser.add_argument("--models", default="experiments/models")
    parser.add_argument("--only", default=",".join(MODELS))
    parser.add_argument("--eval-images", type=int, default=5000)
    parser.add_argument("--calib", type=int, default=256)
    parser.add_argument("--runtimes", default="torch,onnxruntime")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch's CPU threads (default: torch's own)")
    parser.add_argument("--output", default="experiments/results/vmeanba_study.json")
    parser.add_argument("--markdown", action="store_true", help="print the tables of an existing --output and stop")
    args = parser.parse_args(argv)
    out = Path(args.output)
    if args.markdown:
        print(markdown(json.loads(out.read_text())))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    results = json.loads(out.read_text()) if out.is_file() else {"models": {}}
    results.update(eval_images=args.eval_images, calib_images=args.calib, seed=args.seed,
                   threads=torch.get_num_threads())
    for name in args.only.split(","):
        results["models"][name] = run_model(name, args)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
