"""FWSVD's Fisher information per input row (Hsu et al. ICLR 2022, "Language model compression with weighted low-rank
factorization", Sec. 3).

The (empirical, diagonal) Fisher information of a weight is the squared gradient of the task loss, summed over the
labelled calibration batches: ``F_jo = sum_b (dL_b / dW_jo)^2``. FWSVD assumes the weights of one row share an
importance and sums them, ``I_j = sum_o F_jo``. With W = weight^T of shape (in, out) as everywhere in this package,
a row is one *input* channel, i.e. a column of ``nn.Linear.weight``. The loss is the cross entropy of the model's
logits against the batch's labels (integer classes, or class probabilities); one gradient per calibration batch,
as the paper's mini-batch estimate.

The pass leaves the model as it found it: parameters' ``requires_grad`` flags, train/eval mode and ``.grad``
fields (gradients are taken with ``torch.autograd.grad``, never accumulated into ``.grad``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn
from torch.nn import functional as F

from lowrank_vit.core.calibration import images_from_batch
from lowrank_vit.core.common import batch_labels
from lowrank_vit.core.progress import progress_bar

_NEEDS_LABELS = ("decomposition='fwsvd' weighs rows by Fisher information, the squared gradients of the loss on "
                 "labelled calibration batches: give (images, labels) tuples or dicts with a 'label' tensor")


def labels_from_batch(batch: object, index: int) -> torch.Tensor:
    """The label tensor of one calibration batch; a clear ValueError when the batch carries none."""
    labels = batch_labels(batch)
    if labels is not None:
        return labels
    kind = "a bare image tensor" if isinstance(batch, torch.Tensor) else f"a {type(batch).__name__} without labels"
    raise ValueError(f"{_NEEDS_LABELS}; calibration batch {index} is {kind}")


def check_labels(labels: torch.Tensor, batch_size: int, index: int) -> None:
    """Integer classes (B,) or class probabilities (B, C) for a batch of ``batch_size`` images, else a ValueError."""
    integer = not labels.is_floating_point() and labels.dtype != torch.bool
    if integer and labels.shape == (batch_size,):
        return
    if labels.is_floating_point() and labels.ndim == 2 and labels.shape[0] == batch_size:
        return
    raise ValueError(f"calibration batch {index}: labels of shape {tuple(labels.shape)} and dtype {labels.dtype} for "
                     f"{batch_size} images; expected integer classes ({batch_size},) or class probabilities "
                     f"({batch_size}, num_classes)")


def iter_labelled_batches(batches: Iterable, num_images: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (images, labels) until ``num_images`` images were produced; validate each batch."""
    if isinstance(batches, torch.Tensor):
        raise ValueError(f"{_NEEDS_LABELS}; got a bare image tensor")
    if iter(batches) is batches:
        raise ValueError("decomposition='fwsvd' reads the calibration data twice (a gradient pass for the Fisher "
                         "information, then the statistics pass): pass a list or a DataLoader, not a one-shot "
                         "iterator or generator")
    produced = 0
    for index, batch in enumerate(batches):
        images = images_from_batch(batch)
        labels = labels_from_batch(batch, index)
        if images.ndim != 4 or not images.is_floating_point():
            raise ValueError(f"calibration batch {index} has images of shape {tuple(images.shape)} and dtype "
                             f"{images.dtype}; expected floating-point (B, C, H, W)")
        check_labels(labels, images.shape[0], index)
        take = min(images.shape[0], num_images - produced)
        if take <= 0:
            break
        produced += take
        yield images[:take], labels[:take]
        if produced >= num_images:
            return
    if produced == 0:
        raise ValueError("the calibration data is empty: no labelled batch was produced by the iterable")


def _logits(output: object) -> torch.Tensor:
    if isinstance(output, (tuple, list)):  # e.g. a distilled DeiT in train mode: (class head, distillation head)
        output = output[0]
    if not isinstance(output, torch.Tensor) or output.ndim != 2:
        raise ValueError("decomposition='fwsvd' needs a classifier whose forward returns (B, num_classes) logits")
    return output


def row_fisher(model: nn.Module, layers: dict[str, nn.Linear], batches: Iterable, num_images: int, *,
               device: torch.device | None = None, progress: bool = True) -> dict[str, torch.Tensor]:
    """FWSVD's row importance ``I_j = sum_b sum_o (dL_b/dW_jo)^2`` of every layer, (in_features,) float64.

    Args:
        model: the dense classifier; run in eval mode (no dropout) and restored afterwards.
        layers: name -> ``nn.Linear`` whose weights' Fisher information is measured.
        batches: re-iterable labelled calibration batches ((images, labels) or dicts with a 'label').
        num_images: how many images to use.
        device: where to run; default, where the model's parameters are.
        progress: show a progress bar.
    """
    device = device or next(model.parameters()).device
    names = list(layers)
    weights = [layers[name].weight for name in names]
    flags = [w.requires_grad for w in weights]
    sums = {name: torch.zeros(layers[name].in_features, dtype=torch.float64, device=device) for name in names}
    was_training = model.training
    try:
        model.eval()
        for w in weights:
            w.requires_grad_(True)
        with torch.enable_grad(), progress_bar(total=num_images, desc="fisher", unit="img", enabled=progress) as bar:
            for index, (images, labels) in enumerate(iter_labelled_batches(batches, num_images)):
                logits = _logits(model(images.to(device)))
                labels = labels.to(device)
                if not labels.is_floating_point() and labels.numel() and (
                        int(labels.min()) < 0 or int(labels.max()) >= logits.shape[1]):
                    raise ValueError(f"calibration batch {index}: labels must lie in [0, {logits.shape[1]}), got "
                                     f"[{int(labels.min())}, {int(labels.max())}]")
                loss = F.cross_entropy(logits.float(), labels.float() if labels.is_floating_point() else labels)
                grads = torch.autograd.grad(loss, weights, allow_unused=True)
                for name, grad in zip(names, grads, strict=True):
                    if grad is not None:  # weight is (out, in): summing over outputs gives one value per row of W
                        sums[name] += grad.detach().double().pow(2).sum(dim=0)
                bar.update(images.shape[0])
    finally:
        for w, flag in zip(weights, flags, strict=True):
            w.requires_grad_(flag)
        model.train(was_training)
    for name, total in sums.items():
        if not torch.isfinite(total).all():
            raise ValueError(f"the Fisher information of layer {name} is not finite (NaN or inf gradients)")
    return sums
