"""Unstructured magnitude pruning, alone and after VMeanba, on the state-space stand-ins (experiments/ssm_models.py).

    python -m experiments.prune_study --cifar10 PATH --output experiments/results/prune_study.json

VMeanba's paper reports that its channel-mean scans combined with 40% unstructured pruning lose under 3 points of
top-1. For every model, without fine-tuning, on the same held-out CIFAR-10 test images as experiments/vmeanba_study.py
(the same seed, so the same images): the dense model; pruning of the block linear weights at 20%, 40% and 60%, under
one global threshold (the library's default, cells ``prune@S``) and each layer alike (``prune-layer@S``); VMeanba
alone in half the blocks (those of least impact); VMeanba there, then 40% pruning (each scope). Each cell: top-1, KL
to the dense model, the weights' sparsity reached, and the exact McNemar test image by image against the dense model,
and for the combinations against VMeanba alone and against 40% pruning alone of the same scope.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

import torch

from lowrank_vit.methods.prune import SCOPES, prune_model
from lowrank_vit.methods.vmeanba import apply_vmeanba, scan_blocks

from .loss_aware_study import load_model, paired, predict, scores

MODELS = ("cifar_vssm4", "cifar_vssm2_deep")
SPARSITIES = (0.2, 0.4, 0.6)
PAPER_SPARSITY = 0.4
"""The fraction VMeanba's paper combines with its scans."""


def _pruned(model: torch.nn.Module, sparsity: float, scope: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    pruned = copy.deepcopy(model)
    report = prune_model(pruned, sparsity=sparsity, scope=scope).to_dict()
    layers = [layer["sparsity"] for layer in report["layers"].values()]
    return pruned, {"sparsity": report["sparsity"], "zeroed": report["zeroed"], "weights": report["weights"],
                    "layer_min": min(layers), "layer_max": max(layers), "scope": scope,
                    "layers": {name: round(layer["sparsity"], 4) for name, layer in report["layers"].items()}}


def _compare(cells: dict[str, Any], key: str, against: str, label: str) -> None:
    """Record on ``cells[key]`` the paired test against ``cells[against]`` under ``label``."""
    pair = paired(cells[key], cells[against])
    if pair is not None:
        cells[key][f"vs_{label}"] = {"only_this": pair[0], "only_other": pair[1], "p": pair[2]}


def run_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    dense, data = load_model(name, args.cifar10, Path(args.models), args.eval_images, args.calib, args.seed)
    calib = [data["train_x"][i: i + 64] for i in range(0, args.calib, 64)]
    dense_logits = predict(dense, data["eval_x"])
    cells: dict[str, Any] = {}
    pruning: dict[str, Any] = {}

    def evaluate(key: str, model: torch.nn.Module) -> None:
        with torch.no_grad():
            cells[key] = scores(predict(model, data["eval_x"]), dense_logits, data["eval_y"])
        if key != "dense":
            _compare(cells, key, "dense", "dense")
        print(f"{name} {key}: top-1 {cells[key]['top1']:.2f}%", file=sys.stderr)

    evaluate("dense", dense)
    blocks = len(scan_blocks(dense))
    half = max(1, blocks // 2)
    vmeanba = copy.deepcopy(dense)
    report = apply_vmeanba(vmeanba, calib, num_blocks=half, calib_samples=args.calib, timing=False, progress=False)
    alone = f"vmeanba@{half}"
    for scope in SCOPES:  # the default scope's cells are named "prune@S", the other's "prune-layer@S"
        name_of = "prune" if scope == SCOPES[0] else f"prune-{scope}"
        for sparsity in SPARSITIES:
            key = f"{name_of}@{sparsity:g}"
            model, pruning[key] = _pruned(dense, sparsity, scope)
            evaluate(key, model)
        if scope == SCOPES[0]:
            evaluate(alone, vmeanba)
        paper = f"{name_of}@{PAPER_SPARSITY:g}"
        both = f"{alone}+{paper}"
        model, pruning[both] = _pruned(vmeanba, PAPER_SPARSITY, scope)
        evaluate(both, model)
        _compare(cells, both, alone, "vmeanba")
        _compare(cells, both, paper, "prune")
    return {"blocks": blocks, "params": sum(p.numel() for p in dense.parameters()), "cells": cells,
            "pruning": pruning, "vmeanba": {"chosen": report.chosen, "kl": report.kl}}


def _pair(cell: dict[str, Any], label: str) -> str:
    pair = cell.get(f"vs_{label}")
    return "" if pair is None else f"{pair['only_this']} / {pair['only_other']}, p = {pair['p']:.2g}"


def markdown(results: dict[str, Any]) -> str:
    """The tables of docs/pruning.md, from the study's JSON."""
    out = []
    for name, model in results["models"].items():
        out.append(f"**{name}** ({model['params']:,} parameters, {model['blocks']} blocks; "
                   f"{results['eval_images']:,} test images; no fine-tuning)\n")
        out.append("| cell | block weights zero % (layers min-max) | top-1 % | KL to dense | right only here / only "
                   "the other, McNemar p: vs dense | vs VMeanba alone | vs the same pruning alone |")
        out.append("|---|---|---|---|---|---|---|")
        for key, cell in model["cells"].items():
            info = model["pruning"].get(key)
            zero = "" if info is None else (f"{100 * info['sparsity']:.1f} ({100 * info['layer_min']:.0f}-"
                                            f"{100 * info['layer_max']:.0f})")
            out.append(f"| {key} | {zero} | {cell['top1']:.2f} | {cell['kl']:.4f} | {_pair(cell, 'dense')} | "
                       f"{_pair(cell, 'vmeanba')} | {_pair(cell, 'prune')} |")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.prune_study", description=__doc__.split("\n")[0])
    parser.add_argument("--cifar10", required=True)
    parser.add_argument("--models", default="experiments/models")
    parser.add_argument("--only", default=",".join(MODELS))
    parser.add_argument("--eval-images", type=int, default=5000)
    parser.add_argument("--calib", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch's CPU threads (default: torch's own)")
    parser.add_argument("--output", default="experiments/results/prune_study.json")
    parser.add_argument("--markdown", action="store_true", help="print the tables of an existing --output and stop")
    args = parser.parse_args(argv)
    out = Path(args.output)
    if args.markdown:
        print(markdown(json.loads(out.read_text())))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    results = json.loads(out.read_text()) if out.is_file() else {"models": {}}
    results.update(eval_images=args.eval_images, calib_images=args.calib, seed=args.seed)
    for name in args.only.split(","):
        results["models"][name] = run_model(name, args)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1))
    text = markdown(results)
    out.with_suffix(".md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
