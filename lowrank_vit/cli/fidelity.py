"""How closely a compressed model follows its dense original, output for output, on the evaluation images: what
``evaluate`` (and ``compress`` and ``finetune`` where there is no top-1 to measure) report for a model whose output
is not a class, or for data without labels.

The metrics are small pure functions of the two models' outputs on the same images, dense first (each is tested
against a hand computation): for every output

* :func:`mean_cosine`: the mean over images of the cosine similarity of the two outputs, each flattened per image;
* :func:`relative_l2_error`: ``||f - f_dense|| / ||f_dense||`` over all images and entries (pooled);

for sigmoid maps (likelihood "bernoulli": logits, "bernoulli-probabilities": probabilities; :func:`probabilities`)

* :func:`mask_iou`: the mean over images of the IoU of the two masks ``p > 0.5`` (1 where both are empty);
* :func:`pearson_r`: Pearson's correlation of the two probability maps, all entries pooled;

for (B, D) embeddings (a two-dimensional output that is not class logits)

* :func:`retrieval_agreement`: for each image, the fraction of its k nearest neighbours (cosine similarity, among
  the other evaluation images) under the dense model that stay among its k nearest under the compressed model,
  averaged over the images (k = 10, or half the other images where there are fewer than 21: with k the number of
  other images every neighbour would trivially stay; :func:`retrieval_k`);

and for class logits (likelihood "categorical")

* :func:`top1_agreement`: the fraction of images whose predicted class is the dense model's.

:class:`FidelityMeter` accumulates them batch by batch (keeping only the embeddings, which the neighbours need);
:func:`measure_fidelity` runs both models over a loader.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from lowrank_vit.core.common import batch_images
from lowrank_vit.core.likelihood import (
    AUTO,
    OutputKey,
    build_likelihood,
    check_declares_classes,
    resolve_name,
    select_output,
)
from lowrank_vit.core.progress import progress_bar

RETRIEVAL_K = 10
"""Neighbours compared per image by the retrieval agreement."""
MASK_THRESHOLD = 0.5
"""The probability above which a sigmoid map's entry is in its mask."""
SIGMOID_LIKELIHOODS = ("bernoulli", "bernoulli-probabilities")
"""The likelihoods of sigmoid outputs: masks and their correlation are measured for them."""


def _flat(output: torch.Tensor) -> torch.Tensor:
    """(B, ...) as (B, entries) in float64."""
    return output.detach().reshape(output.shape[0], -1).double()


def _same_shape(dense: torch.Tensor, other: torch.Tensor) -> None:
    if dense.shape != other.shape:
        raise ValueError(f"the dense model's output {tuple(dense.shape)} and the compressed one's "
                         f"{tuple(other.shape)} differ in shape")


def cosine_similarities(dense: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Per image, the cosine similarity of the two outputs flattened (float64, (B,)); 0 where either is zero."""
    _same_shape(dense, other)
    a, b = _flat(dense), _flat(other)
    norms = a.norm(dim=1) * b.norm(dim=1)
    dots = (a * b).sum(dim=1)
    return torch.where(norms > 0, dots / norms.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(dots))


def mean_cosine(dense: torch.Tensor, other: torch.Tensor) -> float:
    """The mean over images of :func:`cosine_similarities`."""
    return float(cosine_similarities(dense, other).mean())


def relative_l2_error(dense: torch.Tensor, other: torch.Tensor) -> float:
    """``||other - dense|| / ||dense||``, the norms over every image and entry (pooled); inf where the dense
    outputs are all zero and the other's are not, 0 where both are."""
    _same_shape(dense, other)
    diff, ref = float((_flat(other) - _flat(dense)).square().sum()), float(_flat(dense).square().sum())
    return _ratio(diff, ref)


def _ratio(diff_sq: float, ref_sq: float) -> float:
    if ref_sq == 0:
        return 0.0 if diff_sq == 0 else float("inf")
    return (diff_sq / ref_sq) ** 0.5


def probabilities(output: torch.Tensor, likelihood: str) -> torch.Tensor:
    """A sigmoid output as probabilities: ``sigmoid`` of logits ("bernoulli"), clamped to [0, 1] where it holds
    probabilities already ("bernoulli-probabilities")."""
    if likelihood == "bernoulli":
        return torch.sigmoid(output.detach().double())
    if likelihood == "bernoulli-probabilities":
        return output.detach().double().clamp(0.0, 1.0)
    raise ValueError(f"{likelihood!r} is not a likelihood of sigmoid outputs ({', '.join(SIGMOID_LIKELIHOODS)})")


def mask_ious(dense_probs: torch.Tensor, other_probs: torch.Tensor,
              threshold: float = MASK_THRESHOLD) -> torch.Tensor:
    """Per image, the IoU of the masks ``p > threshold`` of two probability maps (float64, (B,)): 1 where both
    masks are empty (they agree)."""
    _same_shape(dense_probs, other_probs)
    a, b = _flat(dense_probs) > threshold, _flat(other_probs) > threshold
    inter, union = (a & b).sum(dim=1).double(), (a | b).sum(dim=1).double()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def mask_iou(dense_probs: torch.Tensor, other_probs: torch.Tensor, threshold: float = MASK_THRESHOLD) -> float:
    """The mean over images of :func:`mask_ious`."""
    return float(mask_ious(dense_probs, other_probs, threshold).mean())


def pearson_r(dense: torch.Tensor, other: torch.Tensor) -> float:
    """Pearson's correlation coefficient of two maps, every entry of every image pooled; NaN where either is
    constant."""
    _same_shape(dense, other)
    return _PearsonSums().add(dense, other).value()


class _PearsonSums:
    """Pearson's r from running sums (float64), centred on the first batch's means for accuracy."""

    def __init__(self) -> None:
        self.n = 0
        self.shift: tuple[float, float] | None = None
        self.sx = self.sy = self.sxx = self.syy = self.sxy = 0.0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> _PearsonSums:
        x, y = x.detach().reshape(-1).double(), y.detach().reshape(-1).double()
        if self.shift is None:
            self.shift = (float(x.mean()), float(y.mean())) if x.numel() else (0.0, 0.0)
        x, y = x - self.shift[0], y - self.shift[1]
        self.n += x.numel()
        self.sx += float(x.sum())
        self.sy += float(y.sum())
        self.sxx += float((x * x).sum())
        self.syy += float((y * y).sum())
        self.sxy += float((x * y).sum())
        return self

    def value(self) -> float:
        if self.n == 0:
            return float("nan")
        cov = self.sxy - self.sx * self.sy / self.n
        vx, vy = self.sxx - self.sx ** 2 / self.n, self.syy - self.sy ** 2 / self.n
        if vx <= 0 or vy <= 0:
            return float("nan")
        return max(-1.0, min(1.0, cov / (vx * vy) ** 0.5))


def retrieval_k(images: int, k: int = RETRIEVAL_K) -> int:
    """The neighbours compared among ``images`` images: ``k``, or half the other images (rounded down) where that is
    fewer, so that the neighbours are a choice (among k of k others every neighbour stays, whatever the models do);
    0 below three images."""
    return max(0, min(k, (images - 1) // 2))


def _neighbours(embeddings: torch.Tensor, k: int, chunk: int = 1024) -> torch.Tensor:
    """Each image's k nearest other images by cosine similarity, (N, k) indices."""
    unit = F.normalize(embeddings.double(), dim=1)
    rows = []
    for start in range(0, unit.shape[0], chunk):
        sims = unit[start:start + chunk] @ unit.T
        index = torch.arange(start, start + sims.shape[0])
        sims[torch.arange(sims.shape[0]), index] = -float("inf")  # not its own neighbour
        rows.append(sims.topk(k, dim=1).indices)
    return torch.cat(rows)


def retrieval_agreement(dense: torch.Tensor, other: torch.Tensor, k: int | None = None) -> float:
    """For (N, D) embeddings: the mean over images of the fraction of an image's ``k`` nearest neighbours under the
    dense model (cosine similarity, among the other images) that are among its ``k`` nearest under the other model
    (``k``: default :func:`retrieval_k`; at most N - 1). NaN where k is 0."""
    _same_shape(dense, other)
    if dense.ndim != 2:
        raise ValueError(f"the retrieval agreement compares (N, D) embeddings, got {tuple(dense.shape)}")
    k = retrieval_k(dense.shape[0]) if k is None else max(0, min(k, dense.shape[0] - 1))
    if k == 0:
        return float("nan")
    a, b = _neighbours(dense, k), _neighbours(other, k)
    shared = (a[:, :, None] == b[:, None, :]).any(dim=2).sum(dim=1).double()
    return float((shared / k).mean())


def top1_agreement(dense: torch.Tensor, other: torch.Tensor) -> float:
    """For (B, C) class logits: the fraction of images whose argmax is the dense model's."""
    _same_shape(dense, other)
    return float((dense.argmax(dim=1) == other.argmax(dim=1)).double().mean())


class FidelityMeter:
    """The fidelity metrics of one evaluation, accumulated batch by batch (the dense outputs first, then the other
    model's on the same images): :meth:`update` per batch, :meth:`result` at the end."""

    def __init__(self, likelihood: str) -> None:
        self.likelihood = likelihood
        self.images = 0
        self.shape: tuple[int, ...] | None = None
        self._cosine = 0.0
        self._diff_sq = self._ref_sq = 0.0
        self._iou = 0.0
        self._pearson = _PearsonSums()
        self._agree = 0.0
        self._embeddings: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])

    @property
    def sigmoid(self) -> bool:
        return self.likelihood in SIGMOID_LIKELIHOODS

    @property
    def embedding(self) -> bool:
        """Two-dimensional outputs that are not class logits: an embedding, compared by its neighbours."""
        return self.shape is not None and len(self.shape) == 1 and self.likelihood != "categorical"

    def update(self, dense: torch.Tensor, other: torch.Tensor) -> None:
        _same_shape(dense, other)
        shape = tuple(dense.shape[1:])
        if self.shape is None:
            self.shape = shape
        elif shape != self.shape:
            raise ValueError(f"the model's output changed shape between batches: {self.shape} then {shape}")
        dense, other = dense.detach().cpu().double(), other.detach().cpu().double()
        self.images += dense.shape[0]
        self._cosine += float(cosine_similarities(dense, other).sum())
        self._diff_sq += float((other - dense).square().sum())
        self._ref_sq += float(dense.square().sum())
        if self.sigmoid:
            p, q = probabilities(dense, self.likelihood), probabilities(other, self.likelihood)
            self._iou += float(mask_ious(p, q).sum())
            self._pearson.add(p, q)
        if self.likelihood == "categorical" and dense.ndim == 2:
            self._agree += float((dense.argmax(dim=1) == other.argmax(dim=1)).sum())
        if self.embedding:
            self._embeddings[0].append(dense.float())
            self._embeddings[1].append(other.float())

    def result(self) -> dict[str, Any]:
        """``images``, ``likelihood``, ``output_shape`` (per image), ``cosine``, ``relative_l2``; for sigmoid maps
        ``mask_iou`` and ``pearson_r``; for embeddings ``retrieval_agreement`` and ``retrieval_k``; for class logits
        ``top1_agreement``. A figure that is not finite (constant maps, too few images, all-zero dense outputs) is
        written as None, as JSON has neither NaN nor infinity."""
        if self.images == 0:
            raise ValueError("the evaluation split is empty")
        out: dict[str, Any] = {"images": self.images, "likelihood": self.likelihood,
                               "output_shape": list(self.shape or ()), "cosine": self._cosine / self.images,
                               "relative_l2": _finite(_ratio(self._diff_sq, self._ref_sq))}
        if self.sigmoid:
            out["mask_iou"] = self._iou / self.images
            out["pearson_r"] = _finite(self._pearson.value())
        if self.likelihood == "categorical" and len(self.shape or ()) == 1:
            out["top1_agreement"] = self._agree / self.images
        if self.embedding:
            dense, other = torch.cat(self._embeddings[0]), torch.cat(self._embeddings[1])
            out["retrieval_k"] = retrieval_k(self.images)
            out["retrieval_agreement"] = _finite(retrieval_agreement(dense, other))
        return out


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _outputs(model: nn.Module, images: torch.Tensor, output_key: OutputKey) -> torch.Tensor:
    output = select_output(model(images), output_key)
    if not torch.isfinite(output).all():
        raise FloatingPointError("the model produced NaN or inf outputs")
    return output


@torch.no_grad()
def measure_fidelity(model: nn.Module, dense: nn.Module, loader: Iterable, device: torch.device, *,
                     likelihood: str = AUTO, output_key: OutputKey = None, progress: bool = True,
                     desc: str = "fidelity") -> dict[str, Any]:
    """Both models over ``loader``'s images (batches of images, with or without labels), in eval mode on
    ``device``: :meth:`FidelityMeter.result`. ``likelihood`` says what the output is ("auto": "categorical" for the
    class logits of a model that declares its classes, else "gaussian"; decided on the first batch and checked
    there, so that e.g. "categorical" for an embedding is refused naming its shape); ``output_key`` which part of
    the output is compared (:func:`~lowrank_vit.core.likelihood.select_output`)."""

    check_declares_classes(model, likelihood)
    model.eval().to(device)
    dense.eval().to(device)
    meter: FidelityMeter | None = None
    with progress_bar(len(loader) if hasattr(loader, "__len__") else 0, desc, "batch", progress) as bar:
        for batch in loader:
            images = batch_images(batch)
            if images is None:
                raise TypeError(f"a batch must be an image tensor, an (images, labels) pair or a dict with an image "
                                f"key, got {type(batch).__name__}")
            images = images.to(device)
            reference, output = _outputs(dense, images, output_key), _outputs(model, images, output_key)
            if meter is None:
                name = resolve_name(model, reference, likelihood)
                if not isinstance(name, str):
                    raise ValueError("a likelihood given as a callable says nothing of what the output is: give "
                                     "its name")
                build_likelihood(name).check(reference, images.shape[0])
                meter = FidelityMeter(name)
            meter.update(reference, output)
            bar.update(1)
    if meter is None:
        raise ValueError("the evaluation split is empty")
    return meter.result()


def fidelity_text(fidelity: dict[str, Any]) -> str:
    """The figures of :meth:`FidelityMeter.result` on one line, e.g. ``cosine 0.9981, relative L2 error 0.0613,
    10-NN retrieval agreement 0.930``."""
    error = fidelity["relative_l2"]
    parts = [f"cosine {fidelity['cosine']:.4f}",
             "relative L2 error " + ("n/a (all-zero dense outputs)" if error is None else f"{error:.4f}")]
    if "top1_agreement" in fidelity:
        parts.append(f"top-1 agreement {100 * fidelity['top1_agreement']:.2f}%")
    if "mask_iou" in fidelity:
        parts.append(f"mask IoU {fidelity['mask_iou']:.4f}")
        r = fidelity.get("pearson_r")
        parts.append("Pearson r " + ("n/a (a constant map)" if r is None else f"{r:.4f}"))
    if "retrieval_agreement" in fidelity:
        value = fidelity["retrieval_agreement"]
        parts.append(f"{fidelity['retrieval_k']}-NN retrieval agreement "
                     + ("n/a (fewer than 3 images)" if value is None else f"{value:.3f}"))
    return ", ".join(parts)


__all__ = ["FidelityMeter", "cosine_similarities", "fidelity_text", "mask_iou", "mask_ious", "mean_cosine",
           "measure_fidelity", "pearson_r", "probabilities", "relative_l2_error", "retrieval_agreement",
           "retrieval_k", "top1_agreement"]
