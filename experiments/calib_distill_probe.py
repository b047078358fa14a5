"""How the study's calibration distillation (``la-distill``, ``la-refit-distill``) got its setting: after a
compression recipe, each variant ``STEPS:LR:TRAINED`` of :func:`experiments.loss_aware_study.calibration_distill` on
the 256 calibration images, measured on the first test images (the tuning images; the study's claims use the images
after them, ``--eval-skip``), paired per image against the compressed model before it (exact McNemar).

    python -m experiments.calib_distill_probe --cifar10 PATH --models cifar_vit6_long,cifar_deit3_ls,cifar_swin_long \
        --bases loss-aware-refit --variants 8:1e-3:partial,32:3e-5:all \
        --json experiments/results/calib_distill_tuning.json

``TRAINED``: all, partial (norms, biases, head, patch embedding) or factors (those and U, V, Z); a fourth field
``mix`` distills on augmented calibration images (``mix_augment``). The JSON holds one
entry per model, base recipe and ratio: the base's scores under "" and each variant's under its name, added to what
the file already holds.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from lowrank_vit import compress

from .loss_aware_study import RECIPES, calibration_distill, load_model, paired, predict, scores


def parse_variant(text: str) -> tuple[int, float, str, bool]:
    """``STEPS:LR:TRAINED``, or ``STEPS:LR:TRAINED:mix`` for augmented calibration images (``mix_augment``)."""
    fields = text.split(":")
    try:
        steps, lr, trained = int(fields[0]), float(fields[1]), fields[2]
    except (IndexError, ValueError):
        steps, lr, trained = 0, 0.0, ""
    if (len(fields) not in (3, 4) or trained not in ("all", "partial", "factors") or steps < 1 or lr <= 0
            or fields[3:] not in ([], ["mix"])):
        raise ValueError(f"variant {text!r}: STEPS:LR:TRAINED[:mix] with STEPS >= 1, LR > 0, "
                         "TRAINED all|partial|factors")
    return steps, lr, trained, len(fields) == 4


def probe(name: str, dense: torch.nn.Module, data: dict[str, torch.Tensor], base: str, ratio: float,
          variants: list[str], calib: int = 256, seed: int = 0, say: Any = print) -> dict[str, Any]:
    """The base recipe's cell and every variant's after it, on ``data``'s evaluation images."""
    dense_logits = predict(dense, data["eval_x"])
    x = data["train_x"][:calib]
    batches = [(x[i: i + 64], data["train_y"][i: i + 64]) for i in range(0, calib, 64)]
    model = copy.deepcopy(dense)
    compress(model, batches, reduction=ratio, calib_samples=calib, progress=False, seed=seed, **RECIPES[base])
    cell = {"": scores(predict(model, data["eval_x"]), dense_logits, data["eval_y"])}
    say(f"{name} {base} {ratio}: {cell['']['top1']:.2f} KL {cell['']['kl']:.4f}")
    for variant in variants:
        steps, lr, trained, augment = parse_variant(variant)
        tuned = copy.deepcopy(model)
        start = time.perf_counter()
        calibration_distill(tuned, dense, x, seed, steps=steps, lr=lr, trained=trained, augment=augment)
        cell[variant] = {**scores(predict(tuned, data["eval_x"]), dense_logits, data["eval_y"]),
                         "seconds": time.perf_counter() - start}
        only_variant, only_base, p = paired(cell[variant], cell[""])
        say(f"{name} {base} {ratio} {variant}: {cell[variant]['top1']:.2f} KL {cell[variant]['kl']:.4f}, "
            f"{only_variant} / {only_base} against the base, p = {p:.2g}")
    return cell


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cifar10", required=True)
    parser.add_argument("--models-dir", default="experiments/models")
    parser.add_argument("--models", default="cifar_vit6_long,cifar_deit3_ls,cifar_swin_long")
    parser.add_argument("--bases", default="loss-aware-refit")
    parser.add_argument("--variants", required=True, help="comma-separated STEPS:LR:TRAINED[:mix]")
    parser.add_argument("--ratios", default="0.7,0.8")
    parser.add_argument("--eval", type=int, default=2000, help="the first test images (the tuning images)")
    parser.add_argument("--json", required=True)
    args = parser.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    bases = [b for b in args.bases.split(",") if b]
    try:
        for variant in variants:
            parse_variant(variant)
        unknown = [b for b in bases if b not in RECIPES]
        if unknown:
            raise ValueError(f"unknown base recipe(s) {', '.join(unknown)}")
    except ValueError as err:
        print(err, file=sys.stderr)
        return 2
    out = Path(args.json)
    results: dict[str, Any] = json.loads(out.read_text()) if out.is_file() else {}
    say = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    for name in [m for m in args.models.split(",") if m]:
        dense, data = load_model(name, args.cifar10, Path(args.models_dir), args.eval, 256, 0)
        for base in bases:
            for ratio in (float(r) for r in args.ratios.split(",")):
                cell = probe(name, dense, data, base, ratio, variants, say=say)
                results.setdefault(f"{name}|{base}|{ratio}", {}).update(cell)
                out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
