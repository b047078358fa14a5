"""End-to-end distillation of the compressed model on augmented calibration images (``CompressionConfig.
distill_steps``; the recipe "loss-aware-distill").

Every stage before this one fits a layer or a block to the dense model's statistics on the calibration images; the
errors of all of them still meet in the model's output. This stage trains every parameter of the compressed model
for a few AdamW steps so that its output matches the dense model's output, under the compression's likelihood (the KL
divergence for class logits, the squared error for features and maps): no labels. 256 calibration images are few
for such a fit (on the images themselves, larger rates and more steps overfit them), so each step's batch is
augmented (:func:`mix_augment`: mirrored, shifted, mixed in pairs; or only mirrored and shifted) and the dense model
is run on the augmented batch for its targets; whatever the augmentation does to an image, the target is the dense
model's answer to that very image, so nothing about labels or the kind of output is assumed.

A model the earlier stages already left nearly exact gains nothing, and Adam's steps, whose size does not shrink
with the gradient, can then only add noise (measured: a DeiT whose KL to the dense model was 1e-5 lost 0.46 points).
So the loss is measured on the calibration images themselves (not augmented) before and after, and the trained
weights are kept only if it fell.

Optionally (``features``, ``feature_weight``) the loss of each step also matches named intermediate modules (the
blocks) of the two models, by their relative squared error (:func:`relative_feature_error`): the output alone is a
few numbers per image for a classifier, the blocks' outputs are many, so the same images carry more targets. The
check stays on the output's loss alone: the feature term only shapes the path, never decides what is kept.

Memory: the dense model, the compressed one, a copy of the latter's weights (for the check), and the activations of
``micro_batch`` images through the whole model for the backward (gradients are accumulated over a step's batch).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from torch import nn

from lowrank_vit.core.common import warmup_cosine
from lowrank_vit.core.progress import progress_bar


def shift_augment(x: torch.Tensor, generator: torch.Generator, shift: int = 4) -> torch.Tensor:
    """A label-free augmentation of a batch of images ``x`` (N, C, H, W): each image mirrored left-right with
    probability 1/2 and shifted by up to ``shift`` pixels each way (reflected borders, cropped back to its size; the
    shift is capped below the image's sides). All draws come from ``generator``."""
    if x.dim() != 4:
        raise ValueError(f"the distillation's augmentation takes a batch of images (N, C, H, W), got shape "
                         f"{tuple(x.shape)}")
    n, _, height, width = x.shape
    shift = max(0, min(shift, height - 1, width - 1))
    mirrored = torch.rand(n, generator=generator) < 0.5
    x = torch.where(mirrored[:, None, None, None].to(x.device), x.flip(-1), x)
    padded = nn.functional.pad(x, (shift, shift, shift, shift), mode="reflect") if shift else x
    dy, dx = (torch.randint(0, 2 * shift + 1, (n,), generator=generator).tolist() for _ in range(2))
    return torch.stack([padded[i, :, dy[i]: dy[i] + height, dx[i]: dx[i] + width] for i in range(n)])


def mix_augment(x: torch.Tensor, generator: torch.Generator, shift: int = 4) -> torch.Tensor:
    """:func:`shift_augment`, then each image mixed with another of the batch, ``lam x_i + (1 - lam) x_j`` with lam
    uniform in [0, 1] per image (mixup with Beta(1, 1)). All draws come from ``generator``."""
    x = shift_augment(x, generator, shift)
    n = len(x)
    lam = torch.rand(n, generator=generator)[:, None, None, None].to(x)
    return lam * x + (1 - lam) * x[torch.randperm(n, generator=generator).to(x.device)]


def eighth_shift_augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """:func:`shift_augment` by up to an eighth of the shorter side (4 pixels at 32, 28 at 224): the shift that
    ``mix_augment`` makes on CIFAR-sized images, in proportion on larger ones. No mixing, so that every image stays a
    natural one (on a real saliency model it raised the loss all the same: docs/loss_aware.md)."""
    return shift_augment(x, generator, shift=max(1, min(x.shape[-2:]) // 8))


AUGMENTATIONS: dict[str, Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None] = {
    "mix": mix_augment,
    "shift": eighth_shift_augment,
    "none": None,
}
"""``CompressionConfig.distill_augment`` -> the augmentation of each step's batch: "mix" (:func:`mix_augment`),
"shift" (:func:`eighth_shift_augment`: mirrored and shifted, not mixed) or "none" (the calibration images as
given)."""


def relative_feature_error(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor]) -> torch.Tensor:
    """The mean over the named modules and the images of ``||s_i - t_i||^2 / ||t_i||^2`` (each image's output of the
    module, every position and channel): each module's error relative to the size of the dense module's output, so
    that blocks whose residual stream has grown do not outweigh the first ones and the term does not depend on the
    features' scale. A mean over images (not a ratio of batch sums), so that gradients accumulated over micro-batches
    weighted by their size are those of the whole batch."""
    if not teacher or set(student) != set(teacher):
        raise ValueError(f"feature distillation: the modules captured differ: {sorted(student)} against "
                         f"{sorted(teacher)}")
    terms = [((student[name].float() - teacher[name].float()).flatten(1).pow(2).sum(1)
              / teacher[name].float().flatten(1).pow(2).sum(1).clamp_min(1e-12)).mean() for name in teacher]
    return torch.stack(terms).mean()


@contextmanager
def capturing_outputs(model: nn.Module, names: Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:
    """While open, the dict holds the last output of each named submodule of ``model`` (the first tensor of a tuple
    output); a name that is not a submodule is a ValueError. The hooks are removed on exit."""
    modules = dict(model.named_modules())
    missing = [name for name in names if name not in modules]
    if missing:
        raise ValueError(f"feature distillation: no submodule named {', '.join(map(repr, missing))} in the model")
    captured: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Callable:
        def keep(_module: nn.Module, _inputs: object, out: object) -> None:
            tensor = out[0] if isinstance(out, (tuple, list)) else out
            if not isinstance(tensor, torch.Tensor):
                raise ValueError(f"feature distillation: {name!r} returns {type(out).__name__}, not a tensor")
            captured[name] = tensor
        return keep

    handles = [modules[name].register_forward_hook(hook(name)) for name in names]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


@dataclass(frozen=True)
class DistillResult:
    """What the stage did: the loss on the calibration images (not augmented) before and after the steps, and
    whether the trained weights were kept (the loss fell) or the model was restored."""

    steps: int
    loss_before: float
    loss_after: float
    kept: bool

    def as_dict(self) -> dict[str, float | int | bool]:
        return asdict(self)


def _mean_loss(dense: nn.Module, model: nn.Module, images: torch.Tensor, output: Callable, loss: Callable,
               micro_batch: int, device: torch.device) -> float:
    """The loss over all ``images``, each micro-batch's mean weighted by its size (so the mean over all images)."""
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(images), micro_batch):
            batch = images[start: start + micro_batch].to(device)
            total += float(loss(output(model, batch), output(dense, batch))) * len(batch)
    return total / len(images)


def distill_on_calibration(dense: nn.Module, model: nn.Module, images: torch.Tensor,
                           output: Callable[[nn.Module, torch.Tensor], torch.Tensor],
                           loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], *, steps: int, lr: float,
                           batch_size: int, augment: str = "mix", seed: int = 0, device: torch.device | None = None,
                           micro_batch: int = 32, progress: bool = True, features: Sequence[str] = (),
                           feature_weight: float = 0.0) -> DistillResult:
    """Train every parameter of ``model`` by ``steps`` AdamW steps (no weight decay; linear warm-up over the first
    twentieth, then a cosine to 0) so that ``loss(output(model, x), output(dense, x))`` falls on batches of
    ``batch_size`` calibration ``images`` drawn with replacement (seeded by ``seed``), augmented as ``augment`` names
    (:data:`AUGMENTATIONS`); ``dense`` is never trained. Both models stay in eval mode (no dropout, no drop path), and
    every parameter's ``requires_grad`` and the model's mode are restored. With ``feature_weight > 0`` each step's
    loss adds ``feature_weight`` times :func:`relative_feature_error` of the submodules named in ``features`` (names
    valid in both models). The weights are kept only if the output's loss on the calibration images as given fell
    (see the module docstring); otherwise ``model`` is restored exactly."""
    if augment not in AUGMENTATIONS:
        raise ValueError(f"augment={augment!r}: one of {', '.join(AUGMENTATIONS)}")
    if steps < 1 or batch_size < 1 or micro_batch < 1 or not lr > 0:
        raise ValueError(f"distillation needs steps >= 1, batch_size >= 1, micro_batch >= 1 and lr > 0; got "
                         f"{steps}, {batch_size}, {micro_batch}, {lr}")
    if not (math.isfinite(feature_weight) and feature_weight >= 0) or (feature_weight > 0 and not features):
        raise ValueError(f"feature_weight must be a finite number >= 0, and > 0 only with modules named in features; "
                         f"got {feature_weight!r} with {len(features)} modules")
    names = list(features) if feature_weight > 0 else []
    device = device or next(model.parameters()).device
    was_training, flags = model.training, {p: p.requires_grad for p in model.parameters()}
    model.eval()
    dense.eval()
    before = _mean_loss(dense, model, images, output, loss, micro_batch, device)
    saved = {name: value.detach().clone() for name, value in model.state_dict().items()}
    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    draws, augmenter = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
    augmentation = AUGMENTATIONS[augment]
    warmup = max(1, steps // 20)
    try:
        with progress_bar(steps, "distillation", "step", progress) as bar, \
                capturing_outputs(dense, names) as dense_features, capturing_outputs(model, names) as own_features:
            for step in range(steps):
                for group in optimizer.param_groups:
                    group["lr"] = lr * warmup_cosine(step, steps, warmup)
                batch = images[torch.randint(0, len(images), (batch_size,), generator=draws)]
                if augmentation is not None:
                    batch = augmentation(batch, augmenter)
                optimizer.zero_grad(set_to_none=True)
                for start in range(0, batch_size, micro_batch):
                    part = batch[start: start + micro_batch].to(device)
                    with torch.no_grad():
                        target = output(dense, part)
                    value = loss(output(model, part), target)
                    if names:
                        value = value + feature_weight * relative_feature_error(own_features, dense_features)
                    (value * (len(part) / batch_size)).backward()
                optimizer.step()
                bar.update(1)
    finally:
        for p in params:
            p.requires_grad_(flags[p])
            p.grad = None
    after = _mean_loss(dense, model, images, output, loss, micro_batch, device)
    kept = math.isfinite(after) and after < before
    if not kept:
        model.load_state_dict(saved)
    model.train(was_training)
    return DistillResult(steps, before, after, kept)
