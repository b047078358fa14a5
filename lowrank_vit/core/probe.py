"""Measuring the model with some layers truncated: what the allocations of FLAR-SVD and LEMS ask (docs/peers.md).

Both decide ranks from the model's own outputs rather than from the spectra alone: FLAR-SVD from the error of the
features its classifier head sees, LEMS from the KL divergence of the predictions, each with one layer (or one set of
layers) replaced by a truncation of its decomposition. A :class:`Probe` runs those forwards on a fixed set of
calibration images: the layers' weights are overwritten in place by ``W_hat(r)`` for the forward and restored right
after, so nothing is copied but the dense outputs, computed once.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

Reconstruct = Callable[[str, int], torch.Tensor]
"""(layer name, rank) -> W_hat (in, out) of that layer at that rank."""


class Probe:
    """Forward passes of ``model`` over ``images`` with chosen layers truncated.

    Args:
        model: the dense model (left as it was after every call).
        layers: name -> ``nn.Linear`` that may be truncated.
        reconstruct: the truncation of a layer at a rank (from its decomposition).
        images: the probe images (a list of batches, already on any device).
        features_of: the module whose input is the "feature" (the classifier head).
        device: where to run.
    """

    def __init__(self, model: nn.Module, layers: dict[str, nn.Linear], reconstruct: Reconstruct,
                 images: list[torch.Tensor], features_of: nn.Module, device: torch.device) -> None:
        if not images:
            raise ValueError("the probe needs at least one calibration image")
        self.model, self.layers, self.reconstruct = model, layers, reconstruct
        self.images, self.feature_module, self.device = images, features_of, device
        self.calls = 0
        self.dense_features, self.dense_logits = self._run({})

    @torch.no_grad()
    def _run(self, ranks: dict[str, int | None]) -> tuple[torch.Tensor, torch.Tensor]:
        saved: dict[str, torch.Tensor] = {}
        features: list[torch.Tensor] = []
        handle = self.feature_module.register_forward_pre_hook(
            lambda _, args: features.append(args[0].detach().float()))
        was_training = self.model.training
        self.model.eval()
        try:
            for name, rank in ranks.items():
                if rank is None:
                    continue
                weight = self.layers[name].weight
                saved[name] = weight.detach().clone()
                weight.data.copy_(self.reconstruct(name, rank).T.to(weight.dtype))
            logits = []
            for batch in self.images:
                output = self.model(batch.to(self.device))
                logits.append((output[0] if isinstance(output, (tuple, list)) else output).detach().float())
        finally:
            handle.remove()
            for name, weight in saved.items():
                self.layers[name].weight.data.copy_(weight)
            self.model.train(was_training)
        self.calls += 1
        return torch.cat([f.reshape(f.shape[0], -1) for f in features]), torch.cat(logits)

    def feature_error(self, ranks: dict[str, int | None]) -> float:
        """FLAR-SVD's search metric: ||F - F_hat||^2 / ||F_hat||^2 of the head's input features F (dense) and F_hat
        (with ``ranks`` truncated), pooled over the probe images."""
        features, _ = self._run(ranks)
        denominator = float(features.double().pow(2).sum())
        numerator = float((features.double() - self.dense_features.double()).pow(2).sum())
        return numerator / denominator if denominator > 0 else float("inf")

    def kl(self, ranks: dict[str, int | None], temperature: float = 1.0) -> float:
        """LEMS's layer sensitivity: the mean over the probe images of KL(p_dense || p_truncated), both predictions
        at ``temperature``."""
        _, logits = self._run(ranks)
        log_p = F.log_softmax(self.dense_logits.double() / temperature, dim=1)
        log_q = F.log_softmax(logits.double() / temperature, dim=1)
        return float(F.kl_div(log_q, log_p, log_target=True, reduction="batchmean"))
