"""Compressing models that are not classifiers: the loss-aware default against the paper's recipe, vanilla SVD,
whitened-uniform and the activation-only peers, each judged by what the model is for (docs/any_output.md).

    python -m experiments.any_output_study --cifar10 PATH/TO/cifar10 [--tasks headless:cifar_vit6_long,embed,seg]
        [--ratios 0.3,0.5,0.7] [--finetune-steps 100] [--output experiments/results/any_output_study.json]

Three kinds of model, all trained here on CIFAR-10 (weights committed under experiments/models):

* ``headless:NAME``: one of the study's classifiers (:mod:`experiments.study_models`) with its head taken off
  (``reset_classifier(0)``: the model returns its pooled features, as a frozen backbone does). Compressed on its
  features alone, then the original head is put back; judged by top-1 on held-out test images. The reference is
  the default compressing the whole classifier (its categorical likelihood sees the head).
* ``embed``: a ViT trained contrastively (:mod:`experiments.noncls_models`, ``cifar_embed_vit``); judged by the kNN
  top-1 of its embeddings (the model's bank of 10,000 training images embedded by the compressed model itself; the
  calibration images are drawn from the bank, unlabelled).
* ``seg``: a ViT with a transposed-convolution head that outputs a digit's mask over a CIFAR-10 image
  (``cifar_seg_vit``); judged by each test image's IoU against the ground truth.

Every method sees the same calibration images (no labels). "Short fine-tune": the paper's partial fine-tune (norms,
biases, the task head, patch embedding) by distillation from the dense model under the output's likelihood (squared
error of features or embeddings, binary cross-entropy to the dense mask's probabilities): the usable fine-tune when
there are no labels. Paired tests per image: exact McNemar on correct/incorrect (top-1, kNN top-1), Wilcoxon
signed-rank on the IoUs.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from lowrank_vit.config import RECIPES as LIBRARY_RECIPES

from .loss_aware_study import load_model, mcnemar_p, optimize, pack_correct, unpack_correct

RECIPES: dict[str, dict[str, Any]] = {
    "loss-aware": LIBRARY_RECIPES["loss-aware"],  # the default: its likelihood decided by "auto"
    "paper": LIBRARY_RECIPES["paper"],
    "vanilla": LIBRARY_RECIPES["vanilla"],
    "whitened-uniform": dict(decomposition="whitened", allocation="uniform", compensation="none"),
    "flar-svd": LIBRARY_RECIPES["flar-svd"],
    "svd-llm-update": LIBRARY_RECIPES["svd-llm-update"],  # SVD-LLM with its sequential update (docs/peers.md)
}
"""The methods of every task; each task adds its own variants of the default (another likelihood)."""

NO_FINETUNE_RECIPES: dict[str, dict[str, Any]] = {
    "loss-aware-refit": LIBRARY_RECIPES["loss-aware-refit"],
    "loss-aware-distill": LIBRARY_RECIPES["loss-aware-distill"],  # mixed images (distill_augment="mix")
    "la-distill-plain": {**LIBRARY_RECIPES["loss-aware-distill"], "distill_augment": "none"},
}
"""The recipes for a model that ships without fine-tune (docs/loss_aware.md), run only where ``--recipes`` names
them."""
DEFAULT = "loss-aware"


@dataclass
class Task:
    """One model and how it is judged."""

    name: str
    model: torch.nn.Module
    calib: torch.Tensor
    """The calibration images (no labels)."""
    train: torch.Tensor
    """Images for the short fine-tune (the calibration images' split)."""
    judge: Callable[[torch.nn.Module], dict[str, Any]]
    """The downstream scores of a model: ``score`` (the headline, higher is better), ``per_image`` (packed correct
    bits for McNemar, or a list of floats for Wilcoxon) and anything else worth recording."""
    paired: str
    """"mcnemar" or "wilcoxon"."""
    variants: dict[str, dict[str, Any]]
    """Recipes of this task beyond :data:`RECIPES` (compress settings)."""
    distill: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    """The fine-tune's loss: (student output, dense output) -> scalar."""
    output_of: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]
    """The output the fine-tune distils (the model's own output, or a classifier's features)."""
    reference: Callable[[float, int], dict[str, Any]] | None = None
    """An extra cell computed its own way (headless: the default on the whole classifier)."""


@torch.no_grad()
def batched(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, size: int = 250) -> torch.Tensor:
    return torch.cat([fn(x[i: i + size]).float() for i in range(0, len(x), size)])


def knn_top1(train_emb: torch.Tensor, train_y: torch.Tensor, test_emb: torch.Tensor, test_y: torch.Tensor,
             k: int = 20, classes: int = 10) -> torch.Tensor:
    """Whether each test image's k nearest training images (cosine) vote its class, votes weighted by exp(sim/0.07)
    (the usual weighted kNN of self-supervised evaluation)."""
    a, b = F.normalize(test_emb, dim=1), F.normalize(train_emb, dim=1)
    sims, idx = (a @ b.T).topk(k, dim=1)
    votes = torch.zeros(len(a), classes).scatter_add_(1, train_y[idx], (sims / 0.07).exp())
    return votes.argmax(1) == test_y


def iou_per_image(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """IoU of the > 0.5 mask (sigmoid of the logits) against ``masks``, per image; 1 where both are empty."""
    pred = (torch.sigmoid(logits) > 0.5).flatten(1)
    truth = masks.flatten(1) > 0.5
    inter, union = (pred & truth).sum(1).float(), (pred | truth).sum(1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def fidelity(per_image: torch.Tensor) -> dict[str, Any]:
    """A per-image score against the dense model's own output (cosine of embeddings, IoU of masks), in percent:
    a continuous measure of what the compression kept, compared by Wilcoxon's test."""
    return {"fidelity": 100.0 * float(per_image.mean()), "fidelity_per_image": [round(float(v), 5) for v in per_image]}


def headless_task(name: str, cifar10: str, models_dir: Path, n_eval: int, n_train: int, seed: int) -> Task:
    dense, data = load_model(name, cifar10, models_dir, n_eval, n_train, seed)
    backbone = copy.deepcopy(dense)
    head = copy.deepcopy(backbone.get_classifier())
    backbone.reset_classifier(0)  # the pooled features, as a frozen backbone returns them
    eval_x, eval_y = data["eval_x"], data["eval_y"]

    def judge(model: torch.nn.Module) -> dict[str, Any]:
        right = batched(lambda x: head(model(x)), eval_x).argmax(1) == eval_y
        return {"score": 100.0 * float(right.float().mean()), "per_image": pack_correct(right)}

    def reference(ratio: float, calib: int) -> dict[str, Any]:
        from lowrank_vit import compress

        whole = copy.deepcopy(dense)
        report = compress(whole, [data["train_x"][:calib]], reduction=ratio, calib_samples=calib, progress=False,
                          seed=seed, **LIBRARY_RECIPES["loss-aware"])
        right = batched(whole, eval_x).argmax(1) == eval_y
        return {"score": 100.0 * float(right.float().mean()), "per_image": pack_correct(right),
                "likelihood": report.config["likelihood"], "params_after": report.params_after}

    return Task(f"headless:{name}", backbone, data["train_x"], data["train_x"], judge, "mcnemar", {},
                lambda out, target: F.mse_loss(out, target), lambda m, x: m(x), reference)


def embed_task(models_dir: Path, cifar10: str, n_eval: int, n_train: int, seed: int) -> Task:
    from . import noncls_models

    model = noncls_models.load("cifar_embed_vit", models_dir)
    ref_x, ref_y, test_x, test_y = noncls_models.embed_dataset(cifar10)  # the model's own kNN bank (training images)
    generator = torch.Generator().manual_seed(seed)
    calib_idx = torch.randperm(len(ref_y), generator=generator)[:n_train]  # unlabelled training images
    test_idx = torch.randperm(len(test_y), generator=generator)[:n_eval]
    eval_x, eval_y = test_x[test_idx], test_y[test_idx]
    dense = batched(model, eval_x)

    def judge(m: torch.nn.Module) -> dict[str, Any]:
        queries = batched(m, eval_x)
        right = knn_top1(batched(m, ref_x), ref_y, queries, eval_y)
        return {"score": 100.0 * float(right.float().mean()), "per_image": pack_correct(right),
                **fidelity(F.cosine_similarity(queries, dense, dim=1))}

    return Task("embed", model, ref_x[calib_idx], ref_x[calib_idx], judge, "mcnemar",
                {"la-direction": {**LIBRARY_RECIPES["loss-aware"], "likelihood": "gaussian-direction"}},
                lambda out, target: F.mse_loss(out, target), lambda m, x: m(x))


def seg_task(models_dir: Path, cifar10: str, n_eval: int, n_train: int, seed: int) -> Task:
    from . import noncls_models

    model = noncls_models.load("cifar_seg_vit", models_dir)
    calib_x, _ = noncls_models.seg_dataset("train", seed + 1000, n_train, cifar10)
    eval_x, eval_m = noncls_models.seg_dataset("test", 0, n_eval, cifar10)  # the first of the model's own test set
    dense_masks = torch.sigmoid(batched(model, eval_x)) > 0.5

    def judge(m: torch.nn.Module) -> dict[str, Any]:
        logits = batched(m, eval_x)
        ious = iou_per_image(logits, eval_m)
        return {"score": 100.0 * float(ious.mean()), "per_image": [round(float(v), 5) for v in ious],
                **fidelity(iou_per_image(logits, dense_masks))}

    def bce(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(out, torch.sigmoid(target))

    return Task("seg", model, calib_x, calib_x, judge, "wilcoxon",
                {"la-bernoulli": {**LIBRARY_RECIPES["loss-aware"], "likelihood": "bernoulli"}}, bce,
                lambda m, x: m(x))


def distill_finetune(model: torch.nn.Module, dense: torch.nn.Module, task: Task, steps: int, seed: int,
                     lr: float = 3e-4, batch_size: int = 64) -> None:
    """The partial fine-tune (norms, biases, heads, patch embedding; factors frozen) by distillation from the dense
    model, the same images and order for every recipe."""
    from lowrank_vit.stages.finetune import freeze_for_partial_finetune

    freeze_for_partial_finetune(model)
    for name in ("proj", "decoder"):  # a wrapper's task head trains, as a classifier's head does
        if hasattr(model, name):
            getattr(model, name).requires_grad_(True)

    def loss_of(idx: torch.Tensor) -> torch.Tensor:
        images = task.train[idx]
        with torch.no_grad():
            target = task.output_of(dense, images)
        return task.distill(task.output_of(model, images), target)

    optimize(model, loss_of, len(task.train), steps, seed, lr, batch_size)


def run_cell(task: Task, recipe: dict[str, Any], ratio: float, calib: int, finetune_steps: int,
             seed: int) -> dict[str, Any]:
    from lowrank_vit import compress

    model = copy.deepcopy(task.model)
    start = time.perf_counter()
    report = compress(model, [task.calib[i: i + 64] for i in range(0, calib, 64)], reduction=ratio,
                      calib_samples=calib, progress=False, seed=seed, **recipe)
    out = {"params_after": report.params_after, "target": report.target_params,
           "compress_s": time.perf_counter() - start, "likelihood": report.config["likelihood"], **task.judge(model)}
    if finetune_steps:
        distill_finetune(model, task.model, task, finetune_steps, seed)
        tuned = task.judge(model)
        out.update({f"{key}_ft": value for key, value in tuned.items()})
    return out


def paired_test(kind: str, a: Any, b: Any) -> dict[str, Any]:
    """Default ``a`` against ``b`` on the same images: exact McNemar on correct bits, or Wilcoxon signed-rank on
    per-image scores (two-sided)."""
    if kind == "mcnemar":
        right_a, right_b = unpack_correct(a), unpack_correct(b)
        only_a = sum(x and not y for x, y in zip(right_a, right_b, strict=True))
        only_b = sum(y and not x for x, y in zip(right_a, right_b, strict=True))
        return {"only_default": only_a, "only_other": only_b, "p": mcnemar_p(only_a, only_b)}
    from scipy.stats import wilcoxon

    diffs = [x - y for x, y in zip(a, b, strict=True)]
    if not any(diffs):
        return {"median_diff": 0.0, "p": 1.0}
    diffs_sorted = sorted(diffs)
    return {"median_diff": diffs_sorted[len(diffs) // 2], "p": float(wilcoxon(a, b, zero_method="wilcox").pvalue)}


def compare(task_cells: dict[str, Any], kind: str) -> None:
    """Add each cell's paired test against the default's cell of the same ratio (before and after fine-tune)."""
    for key, cell in task_cells.items():
        recipe, ratio = key.rsplit("@", 1)
        base = task_cells.get(f"{DEFAULT}@{ratio}")
        if recipe == DEFAULT or base is None:
            continue
        cell["vs_default"] = paired_test(kind, base["per_image"], cell["per_image"])
        if "per_image_ft" in cell and "per_image_ft" in base:
            cell["vs_default_ft"] = paired_test(kind, base["per_image_ft"], cell["per_image_ft"])
        for suffix in ("", "_ft"):
            if f"fidelity_per_image{suffix}" in cell and f"fidelity_per_image{suffix}" in base:
                cell[f"fidelity_vs_default{suffix}"] = paired_test("wilcoxon", base[f"fidelity_per_image{suffix}"],
                                                                   cell[f"fidelity_per_image{suffix}"])


FIDELITY = {"embed": "cosine % of each image's embedding to the dense one",
            "seg": "IoU % of each image's mask against the dense model's"}
"""What a task's fidelity measures (the second table), where its judge records one."""


def _table(cells: dict[str, Any], key: str, test: str, digits: int = 2) -> list[str]:
    """Rows of recipes, columns of ratios (then after the fine-tune); ``key`` the figure (``digits`` decimals),
    ``test`` the paired test against the default."""
    ratios = sorted({float(k.rsplit("@", 1)[1]) for k in cells})
    recipes = list(dict.fromkeys(k.rsplit("@", 1)[0] for k in cells))
    suffixes = ("", "_ft") if any(f"{key}_ft" in c for c in cells.values()) else ("",)
    header = [f"-{round(r * 100)}%" + (" +FT" if suffix else "") for suffix in suffixes for r in ratios]
    lines = ["| recipe | " + " | ".join(header) + " |", "|---" * (len(header) + 1) + "|"]
    for recipe in recipes:
        row = []
        for suffix in suffixes:
            for ratio in ratios:
                cell = cells.get(f"{recipe}@{ratio}")
                if cell is None or f"{key}{suffix}" not in cell:
                    row.append("")
                    continue
                text = f"{cell[key + suffix]:.{digits}f}"
                p = cell.get(test + suffix, {}).get("p")
                if p is not None:
                    text += f" (p={p:.2g})" if p >= 1e-4 else " (p<1e-4)"
                row.append(f"**{text}**" if recipe == DEFAULT else text)
        if any(row):
            lines.append(f"| {recipe} | " + " | ".join(row) + " |")
    return lines


def _p(p: float) -> str:
    return f"p = {p:.2g}" if p >= 1e-4 else "p < 1e-4"


def against(results: dict[str, Any], base: str = "loss-aware-refit",
            recipes: tuple[str, ...] = ("loss-aware-distill", "la-distill-plain")) -> str:
    """Markdown: each of ``recipes`` paired against ``base`` (not the default) per task and ratio: the score's
    difference and its test, and the fidelity's where the task records one."""
    lines = ["| task | ratio | " + base + " | " + " | ".join(recipes) + " |", "|---" * (len(recipes) + 3) + "|"]
    for task, entry in results["tasks"].items():
        cells, kind = entry["cells"], entry["paired"]
        ratios = sorted({key.rsplit("@", 1)[1] for key in cells if key.startswith(base + "@")}, key=float)
        for ratio in ratios:
            ref = cells[f"{base}@{ratio}"]
            row = [task, f"-{float(ratio):.0%}", f"{ref['score']:.2f}" + (
                f" ({ref['fidelity']:.3f})" if "fidelity" in ref else "")]
            for recipe in recipes:
                cell = cells.get(f"{recipe}@{ratio}")
                if cell is None:
                    row.append("-")
                    continue
                p = paired_test(kind, cell["per_image"], ref["per_image"])["p"]
                text = f"{cell['score'] - ref['score']:+.2f}, {_p(p)}"
                text = f"**{text}**" if p < 0.05 else text
                if "fidelity" in cell:
                    p = paired_test("wilcoxon", cell["fidelity_per_image"], ref["fidelity_per_image"])["p"]
                    fidelity = f"{cell['fidelity'] - ref['fidelity']:+.3f}, {_p(p)}"
                    text += f" ({f'**{fidelity}**' if p < 0.05 else fidelity})"
                row.append(text)
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def render(results: dict[str, Any]) -> str:
    """Markdown: per task, its downstream score and (where measured) its fidelity to the dense model, recipes as
    rows, ratios (and after the fine-tune) as columns; each recipe's paired test against the default beside it."""
    lines = []
    for task, entry in results["tasks"].items():
        cells = entry["cells"]
        lines += [f"### {task} ({entry['metric']}, dense {entry['dense']:.2f})", ""]
        lines += _table(cells, "score", "vs_default") + [""]
        if any("fidelity" in c for c in cells.values()):
            lines += [f"{task}: {FIDELITY.get(task, 'fidelity to the dense model')} (Wilcoxon signed-rank)", ""]
            lines += _table(cells, "fidelity", "fidelity_vs_default", digits=3) + [""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.any_output_study", description=__doc__.split("\n")[0])
    parser.add_argument("--cifar10", required=True, help="the CIFAR-10 parquet folder (train.parquet, test.parquet)")
    parser.add_argument("--tasks", default="headless:cifar_vit6_long,headless:cifar_deit3_ls,embed,seg")
    parser.add_argument("--ratios", default="0.3,0.5,0.7")
    parser.add_argument("--recipes", default=None, help="comma-separated subset of the recipes (default: all but the "
                        "no-fine-tune ones, which run where named: " + ", ".join(NO_FINETUNE_RECIPES) + ")")
    parser.add_argument("--calib", type=int, default=256)
    parser.add_argument("--eval", type=int, default=2000, help="held-out images per task")
    parser.add_argument("--finetune-steps", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models", default="experiments/models")
    parser.add_argument("--output", default="experiments/results/any_output_study.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = Path(args.output)
    results = json.loads(out.read_text()) if out.is_file() else {"tasks": {}}
    results["settings"] = {k: getattr(args, k) for k in ("calib", "eval", "finetune_steps", "seed")}
    models_dir = Path(args.models)
    for spec in args.tasks.split(","):
        if spec.startswith("headless:"):
            task = headless_task(spec.split(":", 1)[1], args.cifar10, models_dir, args.eval, args.calib, args.seed)
            metric = "top-1 % with the original head put back"
        elif spec == "embed":
            task = embed_task(models_dir, args.cifar10, args.eval, args.calib, args.seed)
            metric = "kNN top-1 %"
        elif spec == "seg":
            task = seg_task(models_dir, args.cifar10, args.eval, args.calib, args.seed)
            metric = "mean IoU % against the ground truth"
        else:
            raise SystemExit(f"unknown task {spec!r}")
        entry = results["tasks"].setdefault(task.name, {"cells": {}})
        entry.update({"metric": metric, "dense": task.judge(task.model)["score"], "paired": task.paired})
        recipes = {**RECIPES, **task.variants}
        if args.recipes:
            named = {**RECIPES, **NO_FINETUNE_RECIPES, **task.variants}
            recipes = {k: v for k, v in named.items() if k in args.recipes.split(",")}
        for ratio in (float(r) for r in args.ratios.split(",")):
            for name, recipe in recipes.items():
                key = f"{name}@{ratio}"
                if key in entry["cells"]:
                    continue
                entry["cells"][key] = run_cell(task, recipe, ratio, args.calib, args.finetune_steps, args.seed)
                cell = entry["cells"][key]
                print(f"{task.name} {key}: {cell['score']:.2f}" + (f" ft {cell['score_ft']:.2f}" if
                                                                    "score_ft" in cell else ""), flush=True)
                compare(entry["cells"], task.paired)
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(results, separators=(",", ":")))  # per-image lists: compact
            if task.reference is not None and f"reference@{ratio}" not in entry["cells"]:
                entry["cells"][f"reference@{ratio}"] = task.reference(ratio, args.calib)
                compare(entry["cells"], task.paired)
                out.write_text(json.dumps(results, separators=(",", ":")))  # per-image lists: compact
    out.with_suffix(".md").write_text(render(results))
    print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
