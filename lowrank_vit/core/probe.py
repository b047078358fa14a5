"""Measuring the model with some layers truncated: what the allocations of FLAR-SVD and LEMS ask (docs/peers.md).

Both decide ranks from the model's own outputs rather than from the spectra alone: FLAR-SVD from the error of the
features its classifier head sees (the model's output itself where it has no classifier head: a backbone, an
embedding or a dense-prediction model), LEMS from the KL divergence of the predictions (under the output's likelihood,
:mod:`lowrank_vit.core.likelihood`: the softmax's for class logits, half the squared distance for a Gaussian output),
each with one layer (or one set of layers) replaced by a truncation of its decomposition. A :class:`Probe` runs those
forwards on a fixed set of calibration images: the layers' weights are overwritten in place by ``W_hat(r)`` for the
forward and restored right after, so nothing is copied but the dense outputs, computed once.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lowrank_vit.core.likelihood import Categorical, Likelihood, OutputKey, select_output

Reconstruct = Callable[[str, int], torch.Tensor]
"""(layer name, rank) -> W_hat (in, out) of that layer at that rank."""


class Probe:
    """Forward passes of ``model`` over ``images`` with chosen layers truncated.

    Args:
        model: the dense model (left as it was after every call).
        layers: name -> ``nn.Linear`` that may be truncated.
        reconstruct: the truncation of a layer at a rank (from its decomposition).
        images: the probe images (a list of batches, already on any device).
        features_of: the module whose input is the "feature" (the classifier head); None: the features are the
            model's output (the part ``output_key`` selects).
        device: where to run.
        likelihood: the output's likelihood, whose divergence :meth:`kl` measures (default: categorical).
        output_key: which part of the model's output is "the output"
            (:func:`~lowrank_vit.core.likelihood.select_output`).
    """

    def __init__(self, model: nn.Module, layers: dict[str, nn.Linear], reconstruct: Reconstruct,
                 images: list[torch.Tensor], features_of: nn.Module | None, device: torch.device,
                 likelihood: Likelihood | None = None, output_key: OutputKey = None) -> None:
        if not images:
            raise ValueError("the probe needs at least one calibration image")
        self.model, self.layers, self.reconstruct = model, layers, reconstruct
        self.images, self.feature_module, self.device = images, features_of, device
        self.likelihood = likelihood or Categorical()
        self.output_key = output_key
        self.calls = 0
        self.dense_features, self.dense_logits = self._run({})

    @torch.no_grad()
    def _run(self, ranks: dict[str, int | None]) -> tuple[torch.Tensor, torch.Tensor]:
        saved: dict[str, torch.Tensor] = {}
        features: list[torch.Tensor] = []
        handle = None if self.feature_module is None else self.feature_module.register_forward_pre_hook(
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
            outputs = []
            for batch in self.images:
                outputs.append(select_output(self.model(batch.to(self.device)), self.output_key).detach().float())
                if handle is None:
                    features.append(outputs[-1])
        finally:
            if handle is not None:
                handle.remove()
            for name, weight in saved.items():
                self.layers[name].weight.data.copy_(weight)
            self.model.train(was_training)
        self.calls += 1
        return torch.cat([f.reshape(f.shape[0], -1) for f in features]), torch.cat(outputs)

    def feature_error(self, ranks: dict[str, int | None]) -> float:
        """FLAR-SVD's search metric: ||F - F_hat||^2 / ||F_hat||^2 of the head's input features F (dense) and F_hat
        (with ``ranks`` truncated), pooled over the probe images."""
        features, _ = self._run(ranks)
        denominator = float(features.double().pow(2).sum())
        numerator = float((features.double() - self.dense_features.double()).pow(2).sum())
        return numerator / denominator if denominator > 0 else float("inf")

    def kl(self, ranks: dict[str, int | None], temperature: float = 1.0) -> float:
        """LEMS's layer sensitivity: the mean over the probe images of KL(p_dense || p_truncated), both predictions
        at ``temperature``, under the output's likelihood."""
        _, outputs = self._run(ranks)
        return self.likelihood.divergence(self.dense_logits, outputs, temperature)
