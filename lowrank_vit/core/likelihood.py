"""The output's likelihood: the one place the loss-aware pass learns what the model's output means.

Why. The loss-aware statistics (:mod:`lowrank_vit.core.loss_aware`) weigh a layer's output error by G, the Gram of
the loss gradients at its output. For a classifier the loss is the log-likelihood of a label drawn from the model's
own softmax, and G is a Kronecker factor of the Fisher information: the curvature of the KL divergence between the
dense and the compressed model's predictions. Nothing in that argument needs classes. Any output f(x) with a
likelihood p(y | f) has a Fisher information, and one backward per image of -log p(y | f) for a draw y ~ p(. | f)
estimates it without bias:

* ``categorical``: class logits (B, C); y ~ softmax(f). G is the classifier's true Fisher (the default before this
  module existed, unchanged: the same draws from the same seed).
* ``gaussian``: any real tensor (features, token maps, embeddings, regression maps); y = f + n with n ~ N(0, I), so
  the gradient is -n (a random output direction) and E[J^T n n^T J] = J^T J: the Gauss-Newton matrix of the output's
  squared error, exact in expectation. The KL divergence of two such Gaussians is half the squared distance of the
  outputs, so the compression preserves the output in the L2 sense.
* ``gaussian-direction``: the same on f / ||f|| (the last dimension): for embeddings compared by cosine similarity,
  the loss sees the direction and not the norm.
* ``bernoulli``: sigmoid outputs given as logits (masks, saliency, multi-label); y ~ Bernoulli(sigmoid(f)) for every
  entry, so G weighs every entry by p (1 - p), its Fisher information.
* ``bernoulli-probabilities``: the same for an output that already holds probabilities in [0, 1].

A user's own likelihood is either registered (:data:`LIKELIHOODS`, a :class:`Likelihood` subclass with a ``name``)
or given as a callable ``fn(output, generator) -> scalar`` whose gradient at the output is one draw per image, summed
over the batch (:class:`CallableLikelihood`).

Which part of the output the likelihood sees (:func:`select_output`): a tensor itself; a tuple's first tensor when
all its tensors have one shape (a distilled DeiT's two heads); a mapping's or model-output object's ``logits``, or its
only tensor; else the user names it (``CompressionConfig.output_key``: a key, an attribute, a tuple index or a
callable), and an ambiguous output is refused with its parts listed.

``auto`` (:func:`resolve_likelihood`) picks ``categorical`` for (B, C) outputs of a model that declares C classes
(``num_classes``, as every timm model does; else a top-level linear ``head``, ``fc`` or ``classifier`` of C outputs)
and ``gaussian`` for everything else: a backbone, an embedding model, a dense-prediction model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from lowrank_vit.core.common import Registry
from lowrank_vit.core.fisher import check_labels

OutputKey = str | int | Callable[[Any], torch.Tensor] | None
"""Which part of a model's output the loss sees: None (the rule of :func:`select_output`), a mapping key or an
attribute name, a tuple index, or a callable from the output to a tensor."""

AUTO = "auto"


def _describe(value: Any) -> str:
    return f"tensor {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__


def output_parts(output: Any) -> dict[str, Any]:
    """The named parts of a model's output: a mapping's items, a tuple's items by index, an object's public
    attributes (transformers' model outputs are mappings; others are dataclasses or plain objects)."""
    if isinstance(output, Mapping):
        return {str(key): value for key, value in output.items() if value is not None}
    if isinstance(output, (tuple, list)):
        return {str(index): value for index, value in enumerate(output)}
    attributes = getattr(output, "__dict__", None) or {}
    return {key: value for key, value in attributes.items() if not key.startswith("_") and value is not None}


def _ambiguous(output: Any, why: str) -> ValueError:
    if isinstance(output, torch.Tensor):  # a plain tensor has no parts to name
        return ValueError(f"the model returns one tensor {tuple(output.shape)}, which has no parts: {why}; leave "
                          "output_key unset (CLI --output-key)")
    parts = ", ".join(f"{key}: {_describe(value)}" for key, value in output_parts(output).items())
    return ValueError(f"the model returns a {type(output).__name__} ({parts or 'no tensor'}); {why}: say which part "
                      f"the loss sees with output_key (a key, an attribute, an index or a callable; CLI --output-key)")


def select_output(output: Any, key: OutputKey = None) -> torch.Tensor:
    """The tensor of ``output`` the likelihood sees (see the module docstring); a ValueError naming the parts where
    the choice is ambiguous or ``key`` names none of them."""
    if callable(key):
        chosen = key(output)
        if not isinstance(chosen, torch.Tensor):
            raise ValueError(f"output_key's callable returned a {type(chosen).__name__}, not a tensor")
        return chosen
    if key is not None:
        chosen = _part(output, key)
        if not isinstance(chosen, torch.Tensor):
            raise _ambiguous(output, f"output_key={key!r} names no tensor of it")
        return chosen
    if isinstance(output, torch.Tensor):
        return output
    tensors = {name: value for name, value in output_parts(output).items() if isinstance(value, torch.Tensor)}
    if isinstance(output, (tuple, list)) and tensors and isinstance(output[0], torch.Tensor) and \
            len({tuple(t.shape) for t in tensors.values()}) == 1:
        return output[0]  # a distilled DeiT in train mode: the class head first, its distillation twin second
    if "logits" in tensors:
        return tensors["logits"]
    if len(tensors) == 1:
        return next(iter(tensors.values()))
    raise _ambiguous(output, "more than one part could be meant" if tensors else "it holds no tensor")


def _part(output: Any, key: str | int) -> Any:
    if isinstance(key, int) and not isinstance(key, bool) and isinstance(output, (tuple, list)):
        return output[key] if -len(output) <= key < len(output) else None
    if isinstance(output, Mapping):
        return output.get(key)
    return getattr(output, key, None) if isinstance(key, str) else None


HEAD_NAMES = ("head", "fc", "classifier")
"""The usual names of a classifier head at a model's top level (torchvision's, timm's, transformers')."""


def declared_classes(model: nn.Module) -> int | None:
    """The number of classes the model says it predicts: its ``num_classes`` (every timm model has one: 0 for a
    backbone), else the width of a top-level linear head under a usual name (a classifier of one's own); else None."""
    value = getattr(model, "num_classes", None)
    if isinstance(value, int) and not isinstance(value, bool):
        return int(value)
    head = next((module for name, module in model.named_children() if name in HEAD_NAMES), None)
    return head.out_features if isinstance(head, nn.Linear) else None


def is_classifier(model: nn.Module) -> bool:
    """Whether the model says its output is class logits: it declares two classes or more (:func:`declared_classes`).
    The one rule behind "auto", the fine-tune's choice of loss and the command line's reading of labels."""
    classes = declared_classes(model)
    return classes is not None and classes >= 2


class Likelihood:
    """p(y | f) of a model's output f. Subclasses set ``name`` and override :meth:`draw`, :meth:`loss` and
    :meth:`divergence`; :meth:`check` refuses an output the likelihood does not fit."""

    name: ClassVar[str]
    categorical: ClassVar[bool] = False
    """Its targets are class labels (the batches' labels, for ``fisher_labels='given'``)."""

    def check(self, output: torch.Tensor, images: int) -> None:
        """Refuse an output this likelihood cannot use: not floating point, without the batch dimension of
        ``images`` images, or (the subclasses) of the wrong shape or range."""
        if not output.is_floating_point():
            raise ValueError(f"the model's output is {output.dtype} {tuple(output.shape)}: the {self.name!r} "
                             f"likelihood needs a floating-point tensor ({_CHOICES})")
        if output.ndim < 2 or output.shape[0] != images:
            raise ValueError(f"the model's output has shape {tuple(output.shape)} for a batch of {images} images: "
                             f"the {self.name!r} likelihood needs the batch as its first dimension and at least one "
                             f"more ({_CHOICES})")

    def fit(self, output: torch.Tensor) -> None:
        """Read what the likelihood needs of the dense outputs of the first calibration images (nothing, here)."""

    def draw(self, output: torch.Tensor, generator: torch.Generator) -> torch.Tensor | None:
        """A target y ~ p(. | output) for every image (drawn on the host, from ``generator``); None where the
        output is not finite."""
        raise NotImplementedError

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """-log p(target | output) summed over the images (up to a constant): one gradient per image."""
        raise NotImplementedError

    def sampled_loss(self, output: torch.Tensor, generator: torch.Generator) -> torch.Tensor | None:
        """:meth:`loss` of a target drawn from the output itself (the true Fisher); None where the output is not
        finite."""
        target = self.draw(output, generator)
        return None if target is None else self.loss(output, target)

    def check_target(self, target: torch.Tensor, output: torch.Tensor, index: int) -> None:
        """Refuse a given target (a batch's label) that does not fit the output."""
        if target.shape != output.shape:
            raise ValueError(f"calibration batch {index}: targets of shape {tuple(target.shape)} for an output of "
                             f"shape {tuple(output.shape)}; the {self.name!r} likelihood needs one target per "
                             f"output entry")

    def divergence(self, dense: torch.Tensor, other: torch.Tensor, temperature: float = 1.0) -> float:
        """The mean over images of KL(p(. | dense) || p(. | other)), both at ``temperature`` (LEMS's probe)."""
        raise NotImplementedError


LIKELIHOODS: Registry[Likelihood] = Registry("likelihood", also=(AUTO,))
register_likelihood = LIKELIHOODS.register
_CHOICES = "the likelihoods: " + ", ".join((AUTO, "categorical", "gaussian", "gaussian-direction", "bernoulli",
                                           "bernoulli-probabilities"))


def _noise(shape: torch.Size, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Standard normal noise drawn on the host from ``generator`` (the same draws on every device)."""
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32).to(device)


@register_likelihood
class Categorical(Likelihood):
    """Class logits (B, C): y ~ softmax(f); the cross-entropy."""

    name = "categorical"
    categorical = True

    def check(self, output, images):
        super().check(output, images)
        if output.ndim != 2 or output.shape[1] < 2:
            raise ValueError(f"the 'categorical' likelihood needs class logits (B, num_classes), got an output of "
                             f"shape {tuple(output.shape)}: use 'gaussian' for features, embeddings and maps, "
                             f"'bernoulli' for sigmoid maps ({_CHOICES})")

    def draw(self, output, generator):
        probs = torch.softmax(output.detach().double(), dim=1).cpu()  # on the host anyway: its check costs nothing
        if not bool(torch.isfinite(probs).all()):
            return None
        return torch.multinomial(probs, 1, generator=generator).squeeze(1).to(output.device)

    def loss(self, output, target):
        target = target.to(output.dtype) if target.is_floating_point() else target
        logits = output if output.dtype == torch.float64 else output.float()
        return F.cross_entropy(logits, target, reduction="sum")

    def check_target(self, target, output, index):
        check_labels(target, output.shape[0], index)
        if not target.is_floating_point() and target.numel() and (
                int(target.min()) < 0 or int(target.max()) >= output.shape[1]):
            raise ValueError(f"calibration batch {index}: labels must lie in [0, {output.shape[1]}), got "
                             f"[{int(target.min())}, {int(target.max())}]")

    def divergence(self, dense, other, temperature=1.0):
        log_p = F.log_softmax(dense.double() / temperature, dim=1)
        log_q = F.log_softmax(other.double() / temperature, dim=1)
        return float(F.kl_div(log_q, log_p, log_target=True, reduction="batchmean"))


@register_likelihood
class Gaussian(Likelihood):
    """Any real output: y = f + n, n ~ N(0, I); the half squared error (the Gauss-Newton matrix of the output)."""

    name = "gaussian"

    def transform(self, output: torch.Tensor) -> torch.Tensor:
        """The output as the likelihood sees it (itself here)."""
        return output

    def draw(self, output, generator):
        seen = self.transform(output.detach().float())
        if not bool(torch.isfinite(seen).all()):
            return None
        return seen + _noise(seen.shape, generator, seen.device)

    def loss(self, output, target):
        seen = self.transform(output if output.dtype == torch.float64 else output.float())
        return 0.5 * (target.to(seen.dtype) - seen).square().sum()

    def divergence(self, dense, other, temperature=1.0):
        diff = self.transform(other.double()) - self.transform(dense.double())
        return float(0.5 * diff.square().sum() / temperature / dense.shape[0])


@register_likelihood
class GaussianDirection(Gaussian):
    """The Gaussian likelihood of the output's direction f / ||f|| along its last dimension (cosine comparisons)."""

    name = "gaussian-direction"

    def transform(self, output):
        return F.normalize(output, dim=-1, eps=1e-12)


@register_likelihood
class Bernoulli(Likelihood):
    """Sigmoid outputs given as logits: y ~ Bernoulli(sigmoid(f)) per entry; the binary cross-entropy."""

    name = "bernoulli"

    def probabilities(self, output: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(output)

    def draw(self, output, generator):
        p = self.probabilities(output.detach().double()).cpu()
        if not bool(torch.isfinite(p).all()):
            return None
        return torch.bernoulli(p, generator=generator).float().to(output.device)

    def loss(self, output, target):
        logits = output if output.dtype == torch.float64 else output.float()
        return F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype), reduction="sum")

    def divergence(self, dense, other, temperature=1.0):
        p = self.probabilities(self._logits(dense.double()) / temperature).clamp(1e-12, 1 - 1e-12)
        q = self.probabilities(self._logits(other.double()) / temperature).clamp(1e-12, 1 - 1e-12)
        kl = p * (p.log() - q.log()) + (1 - p) * ((1 - p).log() - (1 - q).log())
        return float(kl.sum() / dense.shape[0])

    def _logits(self, output: torch.Tensor) -> torch.Tensor:
        return output


@register_likelihood
class BernoulliProbabilities(Bernoulli):
    """Sigmoid outputs given as probabilities in [0, 1]: the Bernoulli likelihood on their logits."""

    name = "bernoulli-probabilities"
    _EPS = 1e-6  # the probabilities are clamped away from 0 and 1, where their logits are infinite

    def check(self, output, images):
        super().check(output, images)
        finite = output.detach()[torch.isfinite(output.detach())]
        if finite.numel() and (float(finite.min()) < 0.0 or float(finite.max()) > 1.0):
            raise ValueError(f"the 'bernoulli-probabilities' likelihood needs probabilities in [0, 1], but the "
                             f"model's output {tuple(output.shape)} spans [{float(finite.min()):.4g}, "
                             f"{float(finite.max()):.4g}]: use 'bernoulli' for logits ({_CHOICES})")

    def probabilities(self, output):
        return output.clamp(self._EPS, 1 - self._EPS)

    def loss(self, output, target):
        return super().loss(self._logits(output if output.dtype == torch.float64 else output.float()), target)

    def _logits(self, output):
        return torch.logit(output, eps=self._EPS)


class CallableLikelihood(Likelihood):
    """A user's likelihood as a callable ``fn(output, generator) -> scalar``: the scalar's gradient at the output
    is one draw per image, summed over the batch (its targets are its own business: no given labels, no probe)."""

    name = "callable"

    def __init__(self, fn: Callable[[torch.Tensor, torch.Generator], torch.Tensor]) -> None:
        self.fn = fn

    def sampled_loss(self, output, generator):
        if not bool(torch.isfinite(output.detach()).all()):
            return None
        value = self.fn(output, generator)
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            raise ValueError(f"the likelihood callable {likelihood_label(self.fn)} must return a scalar tensor, got "
                             f"{_describe(value)}")
        return value.reshape(())

    def loss(self, output, target):
        raise ValueError(f"a likelihood given as a callable ({likelihood_label(self.fn)}) draws its own targets: "
                         "it cannot use the batches' labels (fisher_labels='given')")

    def divergence(self, dense, other, temperature=1.0):
        raise ValueError(f"a likelihood given as a callable ({likelihood_label(self.fn)}) has no divergence for a "
                         "probing allocation: register a Likelihood subclass with one (lowrank_vit.core.likelihood)")


def likelihood_label(likelihood: str | Callable) -> str:
    """How a config and a report name a likelihood: its registered name, or ``callable:module.qualname``."""
    if isinstance(likelihood, str):
        return likelihood
    return f"callable:{getattr(likelihood, '__module__', '?')}.{getattr(likelihood, '__qualname__', repr(likelihood))}"


def check_likelihood_choice(likelihood: Any) -> None:
    """Refuse a likelihood that is neither ``auto``, a registered name nor a callable (a config's validation)."""
    if callable(likelihood) and not isinstance(likelihood, str):
        return
    if isinstance(likelihood, str) and likelihood.startswith("callable:"):
        raise ValueError(f"likelihood {likelihood!r} was a callable, which a saved config cannot hold: give the "
                         "callable again")
    if not isinstance(likelihood, str) or (likelihood != AUTO and likelihood not in LIKELIHOODS):
        raise ValueError(f"unknown likelihood {likelihood!r}; registered: {', '.join((AUTO, *LIKELIHOODS))}, or a "
                         "callable fn(output, generator) -> scalar")


def check_output_key(key: Any) -> None:
    """Refuse an ``output_key`` that is not None, a string, an integer or a callable."""
    if isinstance(key, str) and key.startswith("callable:"):
        raise ValueError(f"output_key {key!r} was a callable, which a saved config cannot hold: give the callable "
                         "again")
    if key is None or callable(key) or isinstance(key, str) or (isinstance(key, int) and not isinstance(key, bool)):
        return
    raise ValueError(f"output_key must be a key or attribute name, a tuple index or a callable, got {key!r}")


def resolve_name(model: nn.Module, output: torch.Tensor, likelihood: str | Callable) -> str | Callable:
    """``likelihood`` with ``auto`` decided for this model and output: ``categorical`` for (B, C) outputs of a model
    that declares C >= 2 classes, else ``gaussian``."""
    if likelihood != AUTO:
        return likelihood
    if output.ndim == 2 and output.is_floating_point() and is_classifier(model) and \
            output.shape[1] == declared_classes(model):
        return "categorical"
    return "gaussian"


def build_likelihood(likelihood: str | Callable) -> Likelihood:
    """The likelihood object of a (resolved) name or callable; a fresh instance (it may fit state on the data)."""
    if callable(likelihood) and not isinstance(likelihood, str):
        return CallableLikelihood(likelihood)
    return type(LIKELIHOODS.lookup(likelihood))()


def check_declares_classes(model: nn.Module, likelihood: str | Callable) -> None:
    """Refuse ``categorical`` for a model that declares fewer than two classes (a feature extractor), before any
    image runs."""
    classes = declared_classes(model)
    if likelihood == "categorical" and classes is not None and classes < 2:
        raise ValueError(f"the 'categorical' likelihood weighs each layer by the gradient of the classification "
                         f"loss, but this model has num_classes={classes} (a feature extractor): use "
                         f"likelihood='gaussian' (or 'auto', which picks it) ({_CHOICES})")


@torch.no_grad()
def model_output(model: nn.Module, images: torch.Tensor, output_key: OutputKey = None) -> torch.Tensor:
    """The part ``output_key`` of the model's output on ``images``, in eval mode (the model's mode restored)."""
    was_training = model.training
    model.eval()
    try:
        return select_output(model(images), output_key)
    finally:
        model.train(was_training)


def resolve_likelihood(model: nn.Module, images: torch.Tensor, likelihood: str | Callable = AUTO,
                       output_key: OutputKey = None) -> str | Callable:
    """The likelihood a compression of ``model`` uses, decided and checked on a few calibration ``images`` before
    the pass: ``auto`` resolved, the output's part chosen, and an output the likelihood cannot use refused, naming
    its shape and the choices."""
    check_declares_classes(model, likelihood)
    output = model_output(model, images, output_key)
    resolved = resolve_name(model, output, likelihood)
    build_likelihood(resolved).check(output, images.shape[0])  # NaN or inf: the pass says which layer it starts at
    return resolved
