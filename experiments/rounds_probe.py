"""A probe of issue 61's third candidate: compress in rounds, the statistics re-estimated between rounds.

One-shot ``loss-aware-refit`` at the last reduction against the same recipe applied in rounds (e.g. -50% then -80%):
after each round but the last the factorized layers are folded back into dense ``nn.Linear`` (``U Vᵀ + Z``), so the
next round takes its statistics (H, G), decomposes and allocates on the partially compressed model, while its refit
still aims at the original dense model's outputs. The library has no option for that anchor (its refit aims at the
model ``compress`` was given), so this probe substitutes the original for the dense copy ``compress`` makes
(:func:`anchored_to`): a measurement, not a feature. ``--recipe`` sets every round's recipe (and the one-shot
cell's): with a distillation (``la-distill-long``) each round's model is trained toward the original's outputs
before it is folded, so the next round starts from a model that has recovered. Paired per image (exact McNemar) on
held-out CIFAR-10 images.

    python -m experiments.rounds_probe --cifar10 PATH --models cifar_vit6_long --schedules 0.5,0.8 0.7,0.8 \
        --json experiments/results/rounds_probe.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowrank_vit import FactorizedLinear, compress
from lowrank_vit.io.surgery import swap_layers

from .loss_aware_study import RECIPES, load_model, paired, predict, scores


def fold(model: nn.Module) -> nn.Module:
    """Every FactorizedLinear replaced, in place, by the nn.Linear of the same function (``U Vᵀ + Z``, its bias)."""
    def dense_of(fqn: str, layer: FactorizedLinear) -> nn.Linear:
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(layer.dense_weight().T)  # (k, m) in ours, (m, k) in nn.Linear
            if layer.bias is not None:
                linear.bias.copy_(layer.bias)
        return linear.to(layer.U.device)

    swap_layers(model, dense_of, lambda fqn, module: isinstance(module, FactorizedLinear))
    return model


@contextlib.contextmanager
def anchored_to(anchor: nn.Module, model: nn.Module) -> Iterator[None]:
    """Inside, ``compress(model, ...)``'s dense copy (what its refit aims at) is a copy of ``anchor`` instead."""
    import lowrank_vit.pipeline as pipeline

    real = pipeline.copy

    class Copy:
        @staticmethod
        def deepcopy(obj: Any, memo: Any = None) -> Any:
            return copy.deepcopy(anchor) if obj is model else copy.deepcopy(obj, memo)

    pipeline.copy = Copy  # type: ignore[assignment]
    try:
        yield
    finally:
        pipeline.copy = real


def in_rounds(dense: nn.Module, batches: list, schedule: list[float], calib: int, seed: int,
              recipe: str = "loss-aware-refit",
              folded: dict[tuple[float, ...], tuple[nn.Module, float]] | None = None) -> tuple[nn.Module, float]:
    """``recipe`` at each reduction of ``schedule`` in turn, folding between rounds, every refit (and distillation)
    aimed at ``dense``; the model and the seconds its rounds took. ``folded``: each folded model of earlier calls and
    the seconds it took, by the schedule's prefix, read and filled in (a schedule that starts like an earlier one
    does not compute its first rounds again; their seconds still count)."""
    folded = {} if folded is None else folded
    prefix = next((tuple(schedule[:i]) for i in range(len(schedule) - 1, 0, -1) if tuple(schedule[:i]) in folded), ())
    model, seconds = (copy.deepcopy(folded[prefix][0]), folded[prefix][1]) if prefix else (copy.deepcopy(dense), 0.0)
    for i in range(len(prefix), len(schedule)):
        last = i == len(schedule) - 1
        start = time.perf_counter()
        with anchored_to(dense, model) if i else contextlib.nullcontext():
            compress(model, batches, reduction=schedule[i], calib_samples=calib, progress=False, seed=seed,
                     **RECIPES[recipe])
        if not last:
            fold(model)
        seconds += time.perf_counter() - start
        if not last:
            folded[tuple(schedule[:i + 1])] = (copy.deepcopy(model), seconds)
    return model, seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.rounds_probe", description=__doc__.split("\n")[0])
    parser.add_argument("--cifar10", required=True)
    parser.add_argument("--models-dir", default="experiments/models")
    parser.add_argument("--models", default="cifar_vit6_long")
    parser.add_argument("--schedules", nargs="+", default=["0.5,0.8"], help="reductions, comma-separated, in order")
    parser.add_argument("--calib", type=int, default=256)
    parser.add_argument("--eval", type=int, default=2000)
    parser.add_argument("--eval-skip", type=int, default=0, help="held-out images start this far into the test order")
    parser.add_argument("--recipe", default="loss-aware-refit", choices=sorted(RECIPES),
                        help="the recipe of every round (and of the one-shot cell)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    schedules = [[float(r) for r in s.split(",")] for s in args.schedules]
    if any(not s or any(not 0 < r < 1 for r in s) or s != sorted(s) for s in schedules):
        print("--schedules: increasing reductions in (0, 1), e.g. 0.5,0.8", file=sys.stderr)
        return 2
    rows = []
    for name in args.models.split(","):
        dense, data = load_model(name, args.cifar10, Path(args.models_dir), args.eval, args.calib, args.seed,
                                 eval_skip=args.eval_skip)
        dense_logits = predict(dense, data["eval_x"])
        batches = [(data["train_x"][i:i + 64], data["train_y"][i:i + 64]) for i in range(0, args.calib, 64)]
        cells: dict[float, dict[str, Any]] = {}
        folded: dict[tuple[float, ...], tuple[nn.Module, float]] = {}
        for schedule in schedules:
            if schedule[-1] not in cells:
                one, seconds = in_rounds(dense, batches, schedule[-1:], args.calib, args.seed, args.recipe)
                cells[schedule[-1]] = {**scores(predict(one, data["eval_x"]), dense_logits, data["eval_y"]),
                                       "seconds": seconds}
            model, seconds = in_rounds(dense, batches, schedule, args.calib, args.seed, args.recipe, folded)
            rounds = {**scores(predict(model, data["eval_x"]), dense_logits, data["eval_y"]), "seconds": seconds}
            only_rounds, only_one, p = paired(rounds, cells[schedule[-1]])
            row = {"model": name, "schedule": schedule, "one_shot": cells[schedule[-1]], "rounds": rounds,
                   "top1_diff": rounds["top1"] - cells[schedule[-1]]["top1"], "only_rounds": only_rounds,
                   "only_one_shot": only_one, "p": p, "kl_ratio": rounds["kl"] / cells[schedule[-1]]["kl"]}
            rows.append(row)
            print(f"{name} {schedule}: one-shot {row['one_shot']['top1']:.2f} -> rounds {rounds['top1']:.2f} "
                  f"({only_rounds} / {only_one}, p = {p:.2g}; KL x{row['kl_ratio']:.3f})", flush=True)
            if args.json:  # after every row: a long run stopped half-way keeps what it measured
                Path(args.json).write_text(json.dumps({"command": "python -m experiments.rounds_probe " + " ".join(
                    sys.argv[1:] if argv is None else argv), "settings": vars(args), "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
