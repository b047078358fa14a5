"""The partial fine-tune's settings, importable without Lightning (the registry, the CLI's ``list``/``show``/``plan``
and the experiment rows read them; only :mod:`lowrank_vit.stages.finetune` runs them)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from lowrank_vit.core.common import from_fields

PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")
"""Lightning precisions the fine-tune accepts: the weights, the optimizer and the saved model stay float32 in all
three (``*-true`` half precisions would store the weights in 16 bits, which the compressed model's accounting and
quantization do not expect)."""


def check_precision_on(precision: str, device_type: str) -> None:
    """Refuse float16 autocast off a GPU before any work: Lightning's ``16-mixed`` is CUDA's alone."""
    if precision == "16-mixed" and device_type != "cuda":
        raise ValueError("finetune precision 16-mixed needs a GPU (float16 autocast is CUDA's); use bf16-mixed or "
                         "32-true on a CPU")


@dataclass
class FinetuneConfig:
    """Settings of the partial fine-tuning; defaults follow Section 4.1 where the paper gives a value."""

    epochs: int = 20
    """Training epochs (paper: 20)."""
    lr: float = 1e-4
    """Peak learning rate of AdamW (paper: 1e-4)."""
    min_lr: float = 0.0
    """Floor of the cosine schedule."""
    warmup_steps: int = 0
    """Linear warm-up steps before the cosine decay (the paper names none)."""
    weight_decay: float = 0.0
    """AdamW weight decay (the paper gives none); applied only to matrices (head, patch embedding), never to norms,
    biases or tokens, as timm does."""
    batch_size: int = 128
    """Images per step per process, for whoever builds the data loaders (the paper gives none)."""
    label_smoothing: float = 0.0
    """Cross-entropy label smoothing."""
    distill: float = 0.0
    """Weight of distillation from the dense model, in [0, 1]: the loss is ``(1 - distill)`` times the cross-entropy
    on the labels plus ``distill`` times ``T² KL(teacher || student)`` of the predictions softened at temperature
    ``T = distill_temperature`` (:func:`lowrank_vit.stages.finetune.soft_distillation_loss`). 0 (the default): the
    paper's cross-entropy alone; above 0 the fine-tune needs a teacher, the model before compression. Measured in
    ``docs/loss_aware_study.md`` (Distillation in the fine-tune)."""
    distill_temperature: float = 1.0
    """Temperature T of the distillation term (1: the plain KL between the two predictive distributions)."""
    train_tokens: bool = False
    """Also train the positional embedding and class/distillation tokens (not in the paper's list)."""
    train_factors: bool = False
    """Also train the factorized layers' U, V and Z and every linear layer left dense: a full fine-tune of the
    compressed model's weights instead of the paper's ~2% (gradients and AdamW state for every parameter). Beyond the
    paper; measured in ``docs/loss_aware_study.md`` (Distillation in the fine-tune)."""
    seed: int = 0
    """Seed passed to ``lightning.seed_everything`` by :func:`finetune`."""
    max_steps: int | None = None
    """Stop after this many optimizer steps even before ``epochs`` are done (the schedule spans them); None: run
    every epoch. For quick checks (``--set finetune.max_steps=20``)."""
    precision: str = "32-true"
    """Lightning's ``Trainer(precision=...)``: ``"32-true"`` (the default; the paper gives none), or on a GPU
    ``"bf16-mixed"`` (forward and backward under bfloat16 autocast, float32 weights and optimizer; measured 1.5x per
    step for DeiT-B at -50% on an H100) or ``"16-mixed"`` (float16 with loss scaling; GPU only).
    ``--set finetune.precision=bf16-mixed`` for a registry row."""
    checkpoint_every_n_steps: int | None = None
    """Checkpoint every n optimizer steps as well as at every epoch end (None: epoch ends only). A mid-epoch
    checkpoint resumes the step count, optimizer and schedule but not the position in the data (see
    :func:`finetune`)."""

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be a non-negative integer, got {self.warmup_steps!r}")
        if self.max_steps is not None and (isinstance(self.max_steps, bool) or not isinstance(self.max_steps, int)
                                           or self.max_steps < 1):
            raise ValueError(f"max_steps must be a positive integer or None, got {self.max_steps!r}")
        if self.checkpoint_every_n_steps is not None and (
                isinstance(self.checkpoint_every_n_steps, bool) or not isinstance(self.checkpoint_every_n_steps, int)
                or self.checkpoint_every_n_steps < 1):
            raise ValueError(f"checkpoint_every_n_steps must be a positive integer or None, "
                             f"got {self.checkpoint_every_n_steps!r}")
        for name in ("train_tokens", "train_factors"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if not (isinstance(self.min_lr, (int, float)) and 0 <= self.min_lr <= self.lr):
            raise ValueError(f"min_lr must lie in [0, lr], got {self.min_lr!r}")
        if not (isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if not (isinstance(self.label_smoothing, (int, float)) and 0 <= self.label_smoothing < 1):
            raise ValueError(f"label_smoothing must lie in [0, 1), got {self.label_smoothing!r}")
        if isinstance(self.distill, bool) or not (isinstance(self.distill, (int, float)) and 0 <= self.distill <= 1):
            raise ValueError(f"distill must lie in [0, 1] (the weight of distillation from the dense model; 0: "
                             f"cross-entropy only), got {self.distill!r}")
        if isinstance(self.distill_temperature, bool) or not (
                isinstance(self.distill_temperature, (int, float)) and math.isfinite(self.distill_temperature)
                and self.distill_temperature > 0):
            raise ValueError(f"distill_temperature must be a positive number, got {self.distill_temperature!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FinetuneConfig:
        return from_fields(cls, data)

