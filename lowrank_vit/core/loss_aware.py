"""Loss-aware statistics: each layer's input Gram H beside the Gram G of the loss gradients at its output, from one
forward and backward pass over the calibration images.

Why. Eq. (5) weighs every layer's output error by that layer's own output energy, so errors of different layers are
not in one unit: the greedy allocation of Algorithm 1 then compares numbers that do not say how much the model's
prediction moves. A second-order expansion of the expected KL divergence between the dense and the compressed
model's predictions gives that unit. Its curvature is the Fisher information F of the predictive distribution; for a
linear layer y = x W (W: (k, m) = (in, out)) shared by the T tokens of an image, the Kronecker-factored form
(K-FAC, "expand" variant for weight sharing) is

    F ~= H (x) G,   H = (1/N) sum_{i,t} x x^T  (k, k),   G = 1/(N T) sum_{i,t} g g^T  (m, m),

with g = dL/dy the gradient of the image's log-likelihood at the layer's output for a label y ~ p(. | x) drawn from
the model's own prediction (the true Fisher: no labels needed). A weight change dW then costs

    KL(dense || compressed) ~= 1/2 tr(dW^T H dW G) = 1/2 || H^1/2 dW G^1/2 ||_F^2,

so the best rank-r W_hat is ``H^-1/2 SVD_r(H^1/2 W G^1/2) G^-1/2`` (:func:`lowrank_vit.core.decompose.two_sided_svd`),
the squares of those singular values are predicted loss increases (doubled) in the same unit for every layer, and the
allocation can remove, across all layers at once, the directions that cost the least per parameter freed
(:func:`lowrank_vit.core.allocate.allocate_marginal`). The 1/T of G makes layers with different token counts (Swin's
stages) comparable.

Memory. Both Grams are float64 running sums over batches (one k x k and one m x m matrix per layer), so memory does not
grow with the number of images; only one batch's activations are held for its backward.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from functools import partial

import torch
from torch import nn

from lowrank_vit.core.calibration import (
    LayerStats,
    Scratch,
    hooked_in_eval,
    iter_calibration_batches,
    squared_norms,
    symmetrize_upper,
    unreached,
    upper_gram_,
)
from lowrank_vit.core.common import LABEL_KEYS
from lowrank_vit.core.covariance import clipped_token_scale
from lowrank_vit.core.fisher import labels_from_batch
from lowrank_vit.core.likelihood import (
    AUTO,
    Likelihood,
    OutputKey,
    build_likelihood,
    check_declares_classes,
    model_output,
    resolve_name,
    select_output,
)
from lowrank_vit.core.progress import progress_bar

FISHER_LABELS = ("sampled", "given")
"""Where the loss gradients' targets come from: drawn from the model's own output (its likelihood), or the batches'
labels."""
COMPUTE_DTYPES = ("float32", "bfloat16")
"""Precisions the pass can run in (``compute_dtype``; ``CompressionConfig.loss_pass_dtype``)."""
_OPTIONS = "use fisher_labels='sampled' or 'given', or the paper's recipe (decomposition='whitened')"


def _energy(values: torch.Tensor) -> torch.Tensor:
    """Sum of squares of every entry, a float64 scalar left on the values' device. On a CPU: per-row norms in the
    tensor's own precision, summed in float64 (``calibration.squared_norms``: a float64 copy of a whole batch cost
    ~10% of the pass there, and its overflow check is a free host read). On an accelerator: in float64 outright (a
    copy costs microseconds there, while a host read would stall the queue of kernels at every layer)."""
    flat = values.detach().reshape(1, -1, values.shape[-1])
    if flat.device.type != "cpu":
        return torch.linalg.vector_norm(flat, dtype=torch.float64).square()
    return squared_norms(flat if flat.dtype in (torch.float32, torch.float64) else flat.float()).sum()


def _given_targets(batch: object, index: int, output: torch.Tensor, likelihood: Likelihood, start: int = 0,
                   who: str | None = None) -> torch.Tensor:
    """The labels (targets) of the images ``start .. start + len(output)`` of calibration batch ``index``, checked
    against the output by the likelihood."""
    try:
        labels = labels_from_batch(batch, index)
    except ValueError:
        hint = ("use fisher_labels='sampled' (no labels needed)" if who is None else
                "give labels, or use the loss-aware default, whose labels are drawn from the model's own predictions")
        who = who or "fisher_labels='given'"
        raise ValueError(f"{who} needs labelled calibration batches "
                         f"((images, labels) or a dict with one of {LABEL_KEYS}); batch {index} has none: "
                         f"{hint}") from None
    labels = labels[start: start + output.shape[0]]
    likelihood.check_target(labels, output, index)  # checked where the loader left them (the host)
    return labels.to(output.device)


def _nonfinite_output(index: int, what: str) -> ValueError:
    """The error for a NaN or inf output (``what``: "logits" of a classifier, else "output") in calibration batch
    ``index``."""
    verb = "are" if what == "logits" else "is"
    return ValueError(f"calibration batch {index}: the model's {what} {verb} NaN or inf; {_OPTIONS}")


def _nonfinite_message(what: str, name: str) -> str:
    """The error for non-finite ``what`` (activations, loss gradients) first met at layer ``name``."""
    return (f"non-finite {what} (NaN or inf) reach layer {name} during the loss-aware calibration; check the model and "
            f"the data, or {_OPTIONS}")


def _check_options(labels: str, gram_precision: str, gram_space: str, micro_batch: int, grad_images: int | None,
                   compute_dtype: str) -> torch.dtype:
    """Refuse a bad option of :func:`collect_loss_statistics` before any image runs; returns the dtype of the Gram
    products (``gram_precision``)."""
    if labels not in FISHER_LABELS:
        raise ValueError(f"fisher_labels must be one of {FISHER_LABELS}, got {labels!r}")
    product_dtype = {"float64": torch.float64, "float32": torch.float32}.get(gram_precision)
    if product_dtype is None:
        raise ValueError(f"gram_precision must be 'float64' or 'float32', got {gram_precision!r}")
    if gram_space not in ("input", "auto"):
        raise ValueError(f"gram_space must be 'input' or 'auto', got {gram_space!r}")
    if isinstance(micro_batch, bool) or not isinstance(micro_batch, int) or micro_batch < 1:
        raise ValueError(f"micro_batch must be a positive integer, got {micro_batch!r}")
    if grad_images is not None and (isinstance(grad_images, bool) or not isinstance(grad_images, int)
                                    or grad_images < 1):
        raise ValueError(f"grad_images must be a positive integer or None, got {grad_images!r}")
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype must be one of {COMPUTE_DTYPES}, got {compute_dtype!r}")
    return product_dtype


@dataclass(frozen=True)
class _PassSettings:
    """The checked options of one pass (see :func:`collect_loss_statistics`'s Args)."""

    device: torch.device
    num_images: int
    labels: str
    seed: int
    micro_batch: int
    grad_images: int | None
    compute_dtype: str
    who: str | None
    progress: bool
    likelihood: Likelihood | None
    """The output's likelihood, decided and checked on the first images (None until then)."""
    output_key: OutputKey

    def autocast(self) -> torch.autocast:
        """The pass's precision: bfloat16 autocast on the device for ``compute_dtype="bfloat16"``, else none."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.compute_dtype == "bfloat16")


@dataclass
class _InputSums:
    """A layer's input side, summed over all images: N H (module docstring), or, kept on the output side
    (``gram_space="auto"``, more inputs than outputs: fc2), N W^T H W with N tr(H)."""

    gram: torch.Tensor
    """sum_{i,t} x x^T (k, k), or on the output side the same sum of the bias-free outputs x W (m, m); float64, upper
    block triangle only (``calibration.upper_gram_``)."""
    on_output: bool
    trace: torch.Tensor | None
    """On the output side, sum_{i,t} ||x||^2 = N tr(H), a float64 scalar on the device (``gram``'s diagonal holds
    tr(W^T H W) instead); None otherwise."""
    token_sum: torch.Tensor | None
    """With ``center``, for a layer with a bias: sum_{i,t} x (k,), float64, for the mean token mu; None otherwise."""
    rows: int = 0
    """Input rows met: N T."""


@dataclass
class _GradSums:
    """A layer's loss-gradient side, summed over the images with a backward: N T G (module docstring), or, kept on
    the input side (``gram_space="auto"``, more outputs than inputs: qkv, fc1), N T W G W^T with N T tr(G)."""

    gram: torch.Tensor
    """sum_{i,t} g g^T (m, m), or on the input side the same sum of g W^T (k, k); float64, upper block triangle."""
    on_input: bool
    trace: torch.Tensor | None
    """On the input side, sum_{i,t} ||g||^2 = N T tr(G), a float64 scalar on the device; None otherwise."""
    seen: bool = False
    """Whether any gradient reached the layer (none does where the layer does not influence the logits)."""


@dataclass
class _Accumulator:
    """What the pass's hooks write: every layer's two sides, the work buffers of their Gram products, and a finiteness
    flag of every micro-batch's output (read with the sums in one host transfer, :func:`_raise_if_nonfinite`)."""

    input_sides: dict[str, _InputSums]
    grad_sides: dict[str, _GradSums]
    product_dtype: torch.dtype
    """Of each batch's Gram products (``gram_precision``); the sums are float64."""
    clip: tuple[float, float] | None
    scratch: Scratch = field(default_factory=Scratch)
    products: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    """One product buffer per (width, role), shared by the layers of that width."""
    outputs_finite: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    """(batch index, flag on the device) of every micro-batch's output since the last check."""
    output_name: str = "output"
    """How the errors name the output: "logits" under a categorical likelihood."""


def _new_accumulator(layers: dict[str, nn.Linear], gram_space: str, center: bool, product_dtype: torch.dtype,
                     clip: tuple[float, float] | None, device: torch.device) -> _Accumulator:
    """Zero sums for every layer, each side kept where ``gram_space`` says: "input", H and G of every layer; "auto",
    the two Grams on a non-square layer's narrow side (see :func:`collect_loss_statistics`)."""
    zeros = partial(torch.zeros, dtype=torch.float64, device=device)
    input_sides, grad_sides = {}, {}
    for name, layer in layers.items():
        k, m = layer.in_features, layer.out_features
        on_output, on_input = gram_space == "auto" and k > m, gram_space == "auto" and m > k
        input_sides[name] = _InputSums(zeros(m, m) if on_output else zeros(k, k), on_output,
                                       zeros(()) if on_output else None,
                                       zeros(k) if center and layer.bias is not None else None)
        grad_sides[name] = _GradSums(zeros(k, k) if on_input else zeros(m, m), on_input,
                                     zeros(()) if on_input else None)
    return _Accumulator(input_sides, grad_sides, product_dtype, clip)


def _add_gram_(acc: _Accumulator, total: torch.Tensor, role: str, values: torch.Tensor) -> None:
    """Add the Gram of ``values``' rows, sum v v^T, to the float64 running sum ``total`` (its upper block triangle:
    ``calibration.upper_gram_``), the product formed in ``gram_precision`` in a buffer reused across layers."""
    flat = values.detach().reshape(-1, values.shape[-1])
    cast = flat if flat.dtype == acc.product_dtype else acc.scratch.get(role, tuple(flat.shape), acc.product_dtype,
                                                                          flat.device).copy_(flat)
    width = flat.shape[1]
    product = acc.products.get((width, role))
    if product is None:  # blocks below the diagonal stay zero (see upper_gram_)
        product = acc.products[(width, role)] = torch.zeros(width, width, dtype=acc.product_dtype, device=flat.device)
    upper_gram_(product, cast)
    total += product  # a NaN or inf stays in the sum's diagonal (sums of squares): see _raise_if_nonfinite


def _clipped(grad: torch.Tensor, clip: tuple[float, float] | None,
             reference: torch.Tensor | None = None) -> torch.Tensor:
    """``grad`` with KFAC-SVD's per-token clipping of ``reference`` (the output gradient; default ``grad``): each
    token rescaled so that its norm lies within ``clip`` times its image's mean (``covariance.clipped_token_scale``);
    ``grad`` itself without ``clip``."""
    if clip is None:
        return grad
    scale = clipped_token_scale(grad if reference is None else reference, *clip)
    shaped = grad.reshape(scale.shape[0], -1, grad.shape[-1])
    return (shaped * scale.to(grad.dtype)).reshape(grad.shape)


def _on_forward(acc: _Accumulator, backward_hooks: bool, name: str, module: nn.Linear,
                inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
    """Forward hook of layer ``name``: adds the batch's input tokens x to its input side (x x^T for H; on the output
    side, (x W)(x W)^T and ||x||^2 for W^T H W and tr(H); x for mu) and, where a backward follows, hooks the output's
    gradient g for its gradient side, unless a full backward hook takes it there (``backward_hooks``)."""
    x, sums, grads = inputs[0], acc.input_sides[name], acc.grad_sides[name]
    sums.rows += x.numel() // module.in_features
    if sums.token_sum is not None:  # in the products' precision (a float64 copy of every batch cost ~10% of the pass)
        sums.token_sum += x.detach().reshape(-1, x.shape[-1]).sum(0, dtype=acc.product_dtype).double()
    if sums.on_output:  # W^T H W from the bias-free outputs x W, and tr(H)
        y = output.detach()
        if module.bias is not None:
            y = torch.sub(y, module.bias.detach(), out=acc.scratch.get("output", tuple(y.shape), y.dtype, y.device))
        _add_gram_(acc, sums.gram, "input", y)
        sums.trace += _energy(x)
    else:
        _add_gram_(acc, sums.gram, "input", x)
    if output.requires_grad and not grads.on_input:
        output.register_hook(partial(_on_output_grad, acc, grads))
    elif output.requires_grad and not backward_hooks:
        output.register_hook(partial(_on_output_grad_times_weight, acc, grads, module))


def _on_output_grad(acc: _Accumulator, grads: _GradSums, grad: torch.Tensor) -> None:
    """Output-gradient hook: adds g g^T (g clipped where ``clip`` is set) to N T G."""
    grads.seen = True
    _add_gram_(acc, grads.gram, "grad", _clipped(grad, acc.clip))


def _on_output_grad_times_weight(acc: _Accumulator, grads: _GradSums, module: nn.Linear, grad: torch.Tensor) -> None:
    """Output-gradient hook of a layer kept on its input side in a model that refuses backward hooks: forms g W^T
    (``module.weight`` is W^T) itself, one matmul more than :func:`_on_backward`, for N T W G W^T, and ||g||^2 for
    N T tr(G)."""
    grads.seen = True
    grad = _clipped(grad, acc.clip)
    _add_gram_(acc, grads.gram, "grad", grad.to(module.weight.dtype) @ module.weight.detach())
    grads.trace += _energy(grad)


def _on_backward(acc: _Accumulator, grads: _GradSums, module: nn.Linear, grad_input: tuple,
                 grad_output: tuple) -> None:
    """Full backward hook of a layer kept on its input side: W G W^T is the Gram of g W^T, the gradient at the
    layer's own input, which the backward has just computed; reusing it saves a matmul as large as the layer's
    forward. Adds it to N T W G W^T, and ||g||^2 to N T tr(G)."""
    if grad_input[0] is None or grad_output[0] is None:
        return
    grads.seen = True
    _add_gram_(acc, grads.gram, "grad", _clipped(grad_input[0], acc.clip, grad_output[0]))
    grads.trace += _energy(_clipped(grad_output[0], acc.clip))


def _raise_if_nonfinite(acc: _Accumulator) -> None:
    """Raise on the first non-finite value the pass has met, in the order a forward and backward pass meets them: a
    layer's inputs, the logits, a layer's loss gradients. One host read for every layer and batch (checking each
    product as it is formed stalled a GPU's queue of kernels at every layer); a NaN or inf stays in a running sum's
    diagonal, a sum of squares."""
    checks = [(_nonfinite_message("activations", name), torch.isfinite(sums.gram.diagonal()).all())
              for name, sums in acc.input_sides.items()]
    checks += [(str(_nonfinite_output(index, acc.output_name)), finite) for index, finite in acc.outputs_finite]
    checks += [(_nonfinite_message("loss gradients", name), torch.isfinite(grads.gram.diagonal()).all())
               for name, grads in acc.grad_sides.items()]
    for (message, _), finite in zip(checks, torch.stack([flag for _, flag in checks]).tolist(), strict=True):
        if not finite:
            raise ValueError(message)
    acc.outputs_finite.clear()  # checked: later checks read the sums alone for the batches before this one


def _record_version(seen: list[tuple[torch.Tensor, int]], module: nn.Module, inputs: tuple,
                    output: torch.Tensor) -> None:
    """Forward hook of :func:`_changes_outputs_in_place`: the output as its layer returned it, and its version."""
    seen.append((output, output._version))


def _changes_outputs_in_place(model: nn.Module, layers: dict[str, nn.Linear], images: torch.Tensor,
                              settings: _PassSettings) -> bool:
    """Whether the model changes a layer's output in place after the layer returned it, as timm's BEiT, EVA and
    Swin V2 add the q and v biases to qkv's output. Such a layer cannot carry a full backward hook: autograd refuses
    an in-place change to an output the hook wraps. One forward of ``images`` (one image will do: the change is in
    the model's code, not in the data) in the pass's grad mode and precision; a tensor's version counter counts the
    in-place changes to it and to its views."""
    seen: list[tuple[torch.Tensor, int]] = []
    with hooked_in_eval(model, layers, lambda name: partial(_record_version, seen)), torch.enable_grad(), \
            settings.autocast():
        model(images.requires_grad_(True))
    return any(output._version != version for output, version in seen)


def _forward_only(model: nn.Module, images: torch.Tensor, index: int, acc: _Accumulator,
                  settings: _PassSettings) -> None:
    """The images past ``grad_images``: a forward without a graph, which feeds the input sides (H) alone."""
    with torch.no_grad():
        output = select_output(model(images), settings.output_key)
        acc.outputs_finite.append((index, torch.isfinite(output).all()))


def _forward_backward(model: nn.Module, images: torch.Tensor, batch: object, index: int, start: int,
                      acc: _Accumulator, settings: _PassSettings, generator: torch.Generator) -> None:
    """The forward of ``images`` (the images ``start ..`` of calibration batch ``index``) and the backward of the
    likelihood's summed loss (one gradient per image, whatever the micro-batch size), for targets drawn from the
    model's own output or the batch's own, down to the images only: the hooks see every layer's g, and the weights'
    gradients are never formed."""
    images = images.requires_grad_(True)  # the graph reaches every layer through the images
    output = select_output(model(images), settings.output_key)
    acc.outputs_finite.append((index, torch.isfinite(output).all()))
    likelihood = settings.likelihood
    if settings.labels == "sampled":
        loss = likelihood.sampled_loss(output, generator)
    else:
        loss = likelihood.loss(output, _given_targets(batch, index, output, likelihood, start, settings.who))
    if loss is None:  # targets drawn from a NaN output: say where the NaN came from
        _raise_if_nonfinite(acc)
        raise _nonfinite_output(index, acc.output_name)
    torch.autograd.grad(loss, images)


def _run_pass(model: nn.Module, layers: dict[str, nn.Linear], stream: Iterable, acc: _Accumulator,
              settings: _PassSettings, backward_hooks: bool) -> tuple[int, int]:
    """The forward and backward pass over the calibration batches, each split into micro-batches (the graph held for
    the backward stays small whatever the data loader's batch size); the hooks fill ``acc``. ``backward_hooks``: the
    layers kept on their input side take g W^T from full backward hooks, else from output-gradient hooks. Returns
    (N, the images with a backward)."""
    produced = with_grad = 0
    generator = torch.Generator().manual_seed(settings.seed)
    with contextlib.ExitStack() as cleanup, \
            hooked_in_eval(model, layers, lambda name: partial(_on_forward, acc, backward_hooks, name)), \
            torch.enable_grad(), settings.autocast(), \
            progress_bar(total=settings.num_images, desc="loss-aware calibration", unit="img",
                         enabled=settings.progress) as bar:
        for name, grads in acc.grad_sides.items():
            if backward_hooks and grads.on_input:
                cleanup.callback(layers[name].register_full_backward_hook(partial(_on_backward, acc, grads)).remove)
        for index, (images, batch) in enumerate(stream):
            for start in range(0, images.shape[0], settings.micro_batch):
                part = images[start: start + settings.micro_batch].to(settings.device)
                backward = part.shape[0] if settings.grad_images is None else max(
                    0, min(part.shape[0], settings.grad_images - with_grad))
                if backward < part.shape[0]:  # past grad_images: forward only, H alone
                    _forward_only(model, part[backward:], index, acc, settings)
                if backward:
                    _forward_backward(model, part[:backward], batch, index, start, acc, settings, generator)
                    with_grad += backward
                if not produced:
                    unreached(name for name, sums in acc.input_sides.items() if sums.rows == 0)
                    _raise_if_nonfinite(acc)  # bad data fails on its first micro-batch, not after the whole pass
                produced += part.shape[0]
                bar.update(part.shape[0])
    return produced, with_grad


def _first_output_likelihood(model: nn.Module, images: torch.Tensor, likelihood: str | Callable | Likelihood,
                             output_key: OutputKey, settings: _PassSettings) -> Likelihood:
    """The likelihood of the pass (``auto`` decided), checked against the output of the first calibration images
    and fitted to it (:meth:`Likelihood.fit`), before any hook is in place or any backward runs."""
    if not isinstance(likelihood, Likelihood):
        check_declares_classes(model, likelihood)
    with settings.autocast():
        output = model_output(model, images, output_key)
    if not isinstance(likelihood, Likelihood):
        likelihood = build_likelihood(resolve_name(model, output, likelihood))
    likelihood.check(output, images.shape[0])
    likelihood.fit(output.float())
    return likelihood


def _host_traces(acc: _Accumulator) -> dict[str, float]:
    """The traces kept on the device (N tr(H) of the output-side sums, N T tr(G) of the input-side gradient sums) as
    floats, in one host read for all layers."""
    kept = {name: sums.trace for sides in (acc.input_sides, acc.grad_sides) for name, sums in sides.items()
            if sums.trace is not None}
    return dict(zip(kept, torch.stack(list(kept.values())).tolist(), strict=True)) if kept else {}


def _layer_stats(name: str, layer: nn.Linear, sums: _InputSums, grads: _GradSums, trace: float | None,
                 produced: int, with_grad: int, device: torch.device) -> LayerStats:
    """One layer's :class:`LayerStats` from its sums: H = sum / N and G = sum / (N T) (N: the images with a backward
    for G), centred (H - T mu mu^T) where a token sum was kept, and H reported as ``gram`` = H N / tr(W^T H W) with
    ``loss_scale`` = tr(W^T H W) / N (see :func:`collect_loss_statistics`). ``trace``: the side's kept trace, N tr(H)
    or N T tr(G) (:func:`_host_traces`)."""
    G = symmetrize_upper(grads.gram)
    grad_energy = trace if grads.on_input else float(torch.diagonal(G).sum())
    if not grads.seen or grad_energy <= 0.0:
        raise ValueError(f"layer {name} received no loss gradient during the loss-aware calibration (it does not "
                         f"influence the logits, or every gradient was zero); {_OPTIONS}")
    tokens = sums.rows / produced
    H = symmetrize_upper(sums.gram).div_(produced)
    W = layer.weight.detach().to(device).double().T
    if sums.on_output:  # H holds W^T H W here
        energy = float(torch.diagonal(H).sum())
    else:
        energy = float(torch.sum(W * (H @ W)))  # tr(W^T H W): mean output energy per image
    scale = energy / produced if energy > 0 else 1.0
    mean = None
    if sums.token_sum is not None:  # (1/N) sum (x - mu)(x - mu)^T = H - T mu mu^T, on whichever side H is kept
        mean = sums.token_sum / sums.rows
        side_mean = mean @ W if sums.on_output else mean
        H.sub_(tokens * torch.outer(side_mean, side_mean))
        if sums.on_output:
            trace -= produced * tokens * float(mean @ mean)
    G.div_(with_grad * tokens)
    if sums.on_output:
        return LayerStats(gram=None, num_images=produced, output_gram=H.div_(scale),
                          input_trace=trace / produced / scale, range_weight=W, grad_gram=G, loss_scale=scale,
                          tokens=tokens, token_mean=mean)
    if grads.on_input:
        return LayerStats(gram=H.div_(scale), num_images=produced, grad_range_gram=G,
                          grad_trace=trace / (with_grad * tokens), loss_scale=scale, tokens=tokens, token_mean=mean)
    return LayerStats(gram=H.div_(scale), num_images=produced, grad_gram=G, loss_scale=scale, tokens=tokens,
                      token_mean=mean)


def collect_loss_statistics(
    model: nn.Module,
    layers: dict[str, nn.Linear],
    batches: Iterable,
    num_images: int,
    *,
    labels: str = "sampled",
    device: torch.device | None = None,
    progress: bool = True,
    seed: int = 0,
    gram_precision: str = "float64",
    gram_space: str = "input",
    micro_batch: int = 32,
    center: bool = False,
    grad_images: int | None = None,
    compute_dtype: str = "float32",
    clip: tuple[float, float] | None = None,
    who: str | None = None,
    likelihood: str | Callable | Likelihood = AUTO,
    output_key: OutputKey = None,
) -> dict[str, LayerStats]:
    """One forward and backward pass over the calibration images; each layer's H and G (see the module docstring).

    Each layer's :class:`LayerStats` carries ``grad_gram`` = G and ``tokens`` = T, and its ``gram`` is H rescaled,
    ``gram = H N / tr(W^T H W)``, with ``loss_scale`` = tr(W^T H W) / N so that ``loss_scale * gram`` is H: the
    rest of the pipeline (closed-form Z kinds, ``calibration.output_error``) reads the usual ``gram``, and the
    reported output error is the pooled relative error ``||X dW||^2 / ||X W||^2`` over all calibration tokens (eq. 5
    with one normalization for the whole calibration set instead of one per image).

    The backward runs from the likelihood's summed loss (:mod:`lowrank_vit.core.likelihood`: the cross-entropy of
    class logits, or the Gaussian or Bernoulli loss of any other output; one gradient per image, whatever the batch
    size) down to the images only: the weights' own gradients are never formed and the model's ``requires_grad``
    flags, ``.grad`` fields and train/eval mode are left as they were.

    Args:
        model: the dense model (a classifier, a backbone, an embedding or a dense-prediction model); run in eval
            mode.
        layers: name -> ``nn.Linear`` whose statistics are collected.
        batches: calibration batches (image tensors, (images, labels) pairs or dicts with an image key).
        num_images: how many images to use.
        labels: "sampled" (default; the true Fisher: targets drawn from the model's own output) or "given" (the
            batches' labels, checked against the output by the likelihood).
        device: where to run; default, where the model's parameters are.
        progress: show a progress bar.
        seed: seed of the sampled labels.
        gram_precision: dtype of each batch's Gram products ("float64" or "float32"); the sums are float64.
        gram_space: "input": H and G of every layer. "auto": only the two Grams on each layer's narrow side, all
            :func:`loss_aware_svd` needs: H and ``W G W^T`` with tr(G) where outputs are more (qkv, fc1), ``W^T H W``
            with tr(H) and G where inputs are (fc2). Same factors and energies, fewer products.
        micro_batch: images per forward and backward: a calibration batch is split so that the graph held for the
            backward stays small whatever the data loader's batch size (the statistics do not depend on it).
        center: for every biased layer, H becomes the centred inputs' Gram H - T mu mu^T and mu is recorded as
            ``token_mean`` (``CompressionConfig.bias_correction``: the bias absorbs b + mu^T (W - W_hat), leaving the
            error (x - mu)(W - W_hat)). The reported errors keep the uncentred output energy as denominator.
        grad_images: only the first ``grad_images`` images run the backward (G is their average); the others run
            forward only and feed H. The backward is most of this pass's cost (see docs/loss_aware_study.md, Cost);
            None: every image.
        compute_dtype: "float32", or "bfloat16": the forward and backward under ``torch.autocast`` (the Gram
            products and sums keep ``gram_precision``).
        clip: (low, high): every token's output gradient rescaled to a norm within [low m, high m], m the mean norm
            of its image's tokens (KFAC-SVD's clipping, :func:`~lowrank_vit.core.covariance.clipped_token_scale`);
            None: the gradients as they are.
        who: the method that asked for given labels, named when a batch has none (default: ``fisher_labels``).
        likelihood: the output's likelihood: "auto" (categorical for the logits of a model that declares its
            classes, else gaussian), a registered name, a callable or a :class:`Likelihood`
            (:mod:`lowrank_vit.core.likelihood`).
        output_key: which part of the model's output the likelihood sees
            (:func:`~lowrank_vit.core.likelihood.select_output`).

    Raises:
        ValueError: an output the likelihood cannot use (named with its shape, before any backward), missing labels
            for ``labels="given"``, NaN or inf activations or
            gradients, a layer the pass never reached, or a layer whose output gradient is zero on every image.
    """
    product_dtype = _check_options(labels, gram_precision, gram_space, micro_batch, grad_images, compute_dtype)
    settings = _PassSettings(device or next(model.parameters()).device, num_images, labels, seed, micro_batch,
                             grad_images, compute_dtype, who, progress, None, output_key)
    acc = _new_accumulator(layers, gram_space, center, product_dtype, clip, settings.device)
    stream = iter_calibration_batches(batches, num_images)
    first = next(stream)
    stream = itertools.chain([first], stream)
    settings = replace(settings, likelihood=_first_output_likelihood(
        model, first[0][:micro_batch].to(settings.device), likelihood, output_key, settings))
    acc.output_name = "logits" if settings.likelihood.categorical else "output"
    widening = {name: layers[name] for name, grads in acc.grad_sides.items() if grads.on_input}
    backward_hooks = False
    if widening:  # g W^T from the backward's own product, unless the model changes their outputs in place
        backward_hooks = not _changes_outputs_in_place(model, widening, first[0][:1].to(settings.device), settings)
    produced, with_grad = _run_pass(model, layers, stream, acc, settings, backward_hooks)
    _raise_if_nonfinite(acc)  # a NaN or inf that starts after the first micro-batch
    traces = _host_traces(acc)
    return {name: _layer_stats(name, layer, acc.input_sides[name], acc.grad_sides[name], traces.get(name), produced,
                               with_grad, settings.device) for name, layer in layers.items()}
