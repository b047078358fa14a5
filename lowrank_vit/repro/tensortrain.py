"""Training and evaluating a small classifier from tensors held in memory: a map-style dataset decoded once into two
tensors, random shifts as the batch augmentation, AdamW with linear warmup and cosine decay, top-1 accuracy. The
stand-ins are pretrained with it, and ``experiments/cifar10.py`` trains its DeiT with it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowrank_vit.core.common import warmup_cosine
from lowrank_vit.core.progress import progress_bar


def stack_dataset(dataset: torch.utils.data.Dataset, progress: bool = False,
                  desc: str = "decoding") -> tuple[torch.Tensor, torch.Tensor]:
    """Every ``(image, label)`` of a map-style dataset decoded once into two tensors (images, int64 labels): training
    a small model from tensors in memory is much faster than through a per-item transform every epoch."""
    n = len(dataset)
    if n == 0:
        raise ValueError("the dataset is empty")
    images, labels = [], []
    with progress_bar(n, desc=desc, unit="img", enabled=progress) as bar:
        for i in range(n):
            image, label = dataset[i]
            images.append(image)
            labels.append(int(label))
            bar.update(1)
    return torch.stack(images), torch.as_tensor(labels, dtype=torch.long)


def random_shift(x: torch.Tensor, max_shift: int, background: float, generator: torch.Generator) -> torch.Tensor:
    """Translate every image of the batch by its own random (dy, dx) in ``[-max_shift, max_shift]``, filling with
    ``background``: the digits' cheapest useful augmentation (a ViT on 4,000 digits overfits without it)."""
    if max_shift <= 0:
        return x
    n, _, h, w = x.shape
    s = max_shift
    padded = F.pad(x, (s, s, s, s), value=background)
    dy, dx = torch.randint(0, 2 * s + 1, (2, n), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]  # (n, h, 1)
    cols = (dx[:, None] + torch.arange(w))[:, None, :]  # (n, 1, w)
    batch = torch.arange(n)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices only: decaying norms, biases, the class token and position embeddings hurts small ViTs."""
    decay, no_decay = [], []
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name in skip or name.endswith("relative_position_bias_table") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def evaluate_top1(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    """Top-1 accuracy in percent (the model is left in eval mode)."""
    model.eval()
    correct = sum(int((model(x[i: i + batch_size]).argmax(1) == y[i: i + batch_size]).sum())
                  for i in range(0, len(x), batch_size))
    return 100.0 * correct / max(1, len(x))


def train_classifier(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, lr: float, batch_size: int,
                     seed: int, weight_decay: float = 0.05, warmup_fraction: float = 0.1, label_smoothing: float = 0.1,
                     augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
                     desc: str = "training", progress: bool = True) -> dict[str, float]:
    """Train a classifier from tensors in memory: AdamW (matrices decayed only) with linear warmup and cosine decay,
    label smoothing, gradient clipping at 1, ``augment(batch, generator)`` applied per batch; no DataLoader, no
    per-item transform. Seeded by ``seed`` (batch order and augmentation; seed torch yourself for the init).

    Returns:
        The last epoch's mean training loss and training accuracy (percent, on augmented images).
    """
    generator = torch.Generator().manual_seed(seed)
    n = len(y)
    batch = min(batch_size, n)
    steps_per_epoch = n // batch
    total = epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(_param_groups(model, weight_decay), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, functools.partial(warmup_cosine, total=total, warmup=round(warmup_fraction * total)))
    loss_sum, correct, seen = 0.0, 0, 0
    model.train()
    with progress_bar(epochs * steps_per_epoch, desc=desc, unit="step", enabled=progress) as bar:
        for epoch in range(epochs):
            order = torch.randperm(n, generator=generator)
            loss_sum, correct, seen = 0.0, 0, 0
            for i in range(steps_per_epoch):
                idx = order[i * batch: (i + 1) * batch]
                inputs = x[idx] if augment is None else augment(x[idx], generator)
                logits = model(inputs)
                loss = F.cross_entropy(logits, y[idx], label_smoothing=label_smoothing)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"{desc}: the loss became {float(loss)} at epoch {epoch + 1}, step "
                                             f"{i + 1}; lower the learning rate")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                schedule.step()
                loss_sum += float(loss.detach()) * len(idx)
                correct += int((logits.argmax(1) == y[idx]).sum())
                seen += len(idx)
                bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss_sum / seen:.3f}", acc=f"{100.0 * correct / seen:.1f}")
    return {"train_loss": loss_sum / max(1, seen), "train_top1": 100.0 * correct / max(1, seen)}
