"""How strongly FLAR-SVD's published code shrinks its input Grams, measured on the study's models.

    python -m experiments.flar_shrinkage --cifar10 PATH/TO/cifar10 [--models cifar_vit6_long,cifar_swin_long,...]
        [--calib 1024] [--batch 128] [--output experiments/results/flar_shrinkage.json]

The published code shrinks each calibration batch's Gram (the mean over the batch's images of X_i^T X_i) toward
mean(diag S) I with the intensity clip(1e10 (tr S - tr(mean(diag S) I)) / ||S - mean(diag S) I||_F^2, 0, 1), then
sums the shrunk Grams. The numerator is zero in exact arithmetic (the target keeps the trace), so what the code
computes is rounding residue multiplied by 1e10: this script evaluates that expression on every block linear's
per-batch Grams, in float64 (the code's hook converts the inputs to float64) and in float32 (where the inputs stay in
float32), and sets it beside the Ledoit-Wolf intensity of the whole calibration set that the library's ``flar``
decomposition applies (:func:`lowrank_vit.core.covariance.ledoit_wolf_intensity`). The expression is written here
from its description, not copied.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import torch

from lowrank_vit.core.covariance import ledoit_wolf_intensity

from .loss_aware_study import load_model

MODELS = ("cifar_vit6_long", "cifar_swin_long", "cifar_deit3_ls", "mnist_deit_s")


def published_intensity(gram: torch.Tensor) -> float:
    """The published code's shrinkage intensity of one batch Gram, in ``gram``'s own precision."""
    target = torch.eye(gram.shape[0], dtype=gram.dtype) * torch.diagonal(gram).mean()
    numerator = torch.trace(gram) - torch.trace(target)
    return float(torch.clip(1e10 * numerator / torch.linalg.matrix_norm(gram - target) ** 2, 0.0, 1.0))


def summary(values: list[float]) -> dict[str, Any]:
    return {"count": len(values), "zero": sum(v == 0.0 for v in values) / len(values),
            "one": sum(v == 1.0 for v in values) / len(values), "median": statistics.median(values),
            "max": max(values), "mean": statistics.fmean(values)}


@torch.no_grad()
def measure(model: torch.nn.Module, images: torch.Tensor, batch: int) -> dict[str, Any]:
    """Per block linear and calibration batch, the published intensity (float64 and float32); per layer, the
    Ledoit-Wolf intensity of all the calibration tokens."""
    layers = {name: m for name, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and ("blocks" in name or "layers" in name)}
    grams: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    totals = {name: [0, 0.0] for name in layers}  # tokens, sum of ||x||^4
    sums: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def record(_, args, __):
            x = args[0].detach()
            x = x.reshape(x.shape[0], -1, x.shape[-1])
            grams[name].append(x)
            flat = x.reshape(-1, x.shape[-1]).double()
            sums[name] = sums.get(name, 0) + flat.T @ flat
            totals[name][0] += flat.shape[0]
            totals[name][1] += float(flat.norm(dim=1).pow(4).sum())
        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in layers.items()]
    model.eval()
    out: dict[str, Any] = {"float64": [], "float32": [], "ledoit_wolf": []}
    for start in range(0, images.shape[0], batch):
        for name in layers:
            grams[name].clear()
        model(images[start: start + batch])
        for name in layers:
            x = torch.cat(grams[name])
            for dtype, key in ((torch.float64, "float64"), (torch.float32, "float32")):
                xs = x.to(dtype)
                out[key].append(published_intensity(torch.matmul(xs.transpose(1, 2), xs).mean(0)))
    for handle in handles:
        handle.remove()
    for name in layers:
        out["ledoit_wolf"].append(ledoit_wolf_intensity(sums[name], totals[name][1], totals[name][0]))
    return {key: summary(values) for key, values in out.items()}


def render(results: dict[str, Any]) -> str:
    """docs/peers.md's table: per model, the published intensity over its layers and batches (float64, float32) and
    the Ledoit-Wolf intensity over its layers."""
    lines = ["| model | published code, float64: zero / median / max | published code, float32: zero / exactly 1 | "
             "Ledoit-Wolf of the whole set (ours): median / max |", "|---|---|---|---|"]
    for name, r in results["models"].items():
        f64, f32, lw = r["float64"], r["float32"], r["ledoit_wolf"]
        lines.append(f"| {name} | {f64['zero']:.0%} / {f64['median']:.1e} / {f64['max']:.1e} | "
                     f"{f32['zero']:.0%} / {f32['one']:.0%} | {lw['median']:.4f} / {lw['max']:.4f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cifar10", default=None)
    parser.add_argument("--models-dir", default="experiments/models")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--calib", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=128, help="images per calibration batch (the published 128)")
    parser.add_argument("--output", default="experiments/results/flar_shrinkage.json")
    args = parser.parse_args(argv)
    results = {}
    for name in [m for m in args.models.split(",") if m]:
        model, data = load_model(name, args.cifar10, Path(args.models_dir), 1, args.calib, 0)
        results[name] = measure(model, data["train_x"][: args.calib], args.batch)
        print(name, json.dumps(results[name]), flush=True)
    Path(args.output).write_text(json.dumps({"calib": args.calib, "batch": args.batch, "models": results},
                                            indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
