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
from collections.abc import Iterable, Iterator

import torch
from torch import nn
from torch.nn import functional as F

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
from lowrank_vit.core.decompose import Decomposition, Whitening, live_inverse, psd_eigh, whitening
from lowrank_vit.core.fisher import _check_labels, labels_from_batch
from lowrank_vit.core.progress import progress_bar

FISHER_LABELS = ("sampled", "given")
"""Where the loss gradients' labels come from: drawn from the model's own prediction, or the batches' labels."""
COMPUTE_DTYPES = ("float32", "bfloat16")
"""Precisions the pass can run in (``compute_dtype``; ``CompressionConfig.loss_pass_dtype``)."""
_NO_LOGITS = ("decomposition='loss_aware' weighs each layer by the gradient of the classification loss, so the model "
              "must return class logits (B, num_classes)")
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


def _logits(output: object) -> torch.Tensor:
    if isinstance(output, (tuple, list)):  # a distilled DeiT in train mode: the class head comes first
        output = output[0]
    if not isinstance(output, torch.Tensor) or output.ndim != 2:
        raise ValueError(f"{_NO_LOGITS}; got {type(output).__name__} of shape {getattr(output, 'shape', None)}")
    return output


def _check_classifier(model: nn.Module) -> None:
    num_classes = getattr(model, "num_classes", None)
    if num_classes is not None and int(num_classes) < 2:
        raise ValueError(f"{_NO_LOGITS}; this model has num_classes={num_classes} (a feature extractor): give it a "
                         "classification head, or use the paper's recipe (decomposition='whitened')")


def _labels(batch: object, index: int, logits: torch.Tensor, mode: str, generator: torch.Generator,
            start: int = 0, who: str | None = None) -> torch.Tensor | None:
    """The labels of the images ``start .. start + len(logits)`` of calibration batch ``index``; None where sampled
    labels meet non-finite logits (the caller says where they came from)."""
    if mode == "sampled":  # y ~ p(. | x): one draw per image from the model's own prediction
        probs = torch.softmax(logits.detach().double(), dim=1).cpu()  # on the host anyway: its check costs nothing
        if not bool(torch.isfinite(probs).all()):
            return None
        return torch.multinomial(probs, 1, generator=generator).squeeze(1).to(logits.device)
    try:
        labels = labels_from_batch(batch, index)
    except ValueError:
        hint = ("use fisher_labels='sampled' (no labels needed)" if who is None else
                "give labels, or use the loss-aware default, whose labels are drawn from the model's own predictions")
        who = who or "fisher_labels='given'"
        raise ValueError(f"{who} needs labelled calibration batches "
                         f"((images, labels) or a dict with one of {LABEL_KEYS}); batch {index} has none: "
                         f"{hint}") from None
    labels = labels[start: start + logits.shape[0]]
    _check_labels(labels, logits.shape[0], index)
    if not labels.is_floating_point() and labels.numel() and (  # checked where the loader left them (the host)
            int(labels.min()) < 0 or int(labels.max()) >= logits.shape[1]):
        raise ValueError(f"calibration batch {index}: labels must lie in [0, {logits.shape[1]}), got "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    return labels.to(logits.device)


def _nonfinite_logits(index: int) -> ValueError:
    return ValueError(f"calibration batch {index}: the model's logits are NaN or inf; {_OPTIONS}")


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
) -> dict[str, LayerStats]:
    """One forward and backward pass over the calibration images; each layer's H and G (see the module docstring).

    Each layer's :class:`LayerStats` carries ``grad_gram`` = G and ``tokens`` = T, and its ``gram`` is H rescaled,
    ``gram = H N / tr(W^T H W)``, with ``loss_scale`` = tr(W^T H W) / N so that ``loss_scale * gram`` is H: the
    rest of the pipeline (closed-form Z kinds, ``calibration.output_error``) reads the usual ``gram``, and the
    reported output error is the pooled relative error ``||X dW||^2 / ||X W||^2`` over all calibration tokens (eq. 5
    with one normalization for the whole calibration set instead of one per image).

    The backward runs from the summed cross-entropy (one gradient per image, whatever the batch size) down to the
    images only: the weights' own gradients are never formed and the model's ``requires_grad`` flags, ``.grad``
    fields and train/eval mode are left as they were.

    Args:
        model: the dense classifier (returns (B, num_classes) logits); run in eval mode.
        layers: name -> ``nn.Linear`` whose statistics are collected.
        batches: calibration batches (image tensors, (images, labels) pairs or dicts with an image key).
        num_images: how many images to use.
        labels: "sampled" (default; the true Fisher) or "given" (the batches' labels).
        device: where to run; default, where the model's parameters are.
        progress: show a progress bar.
        seed: seed of the sampled labels.
        gram_precision: dtype of each batch's Gram products ("float64" or "float32"); the sums are float64.
        gram_space: "input": H (in x in) and G (out x out) of every layer. "auto": each layer keeps only the two
            Grams on its narrow side, which is all the decomposition needs (:func:`loss_aware_svd`): a layer with
            more outputs than inputs (qkv, fc1) keeps H and ``W G W^T`` (the Gram of ``g W^T``, in x in) with tr(G);
            one with more inputs than outputs (fc2) keeps ``W^T H W`` (the Gram of its bias-free outputs, out x out)
            with tr(H), and G. Same factors and energies; a fraction of the products for the wide side.
        micro_batch: images per forward and backward: a calibration batch is split so that the graph held for the
            backward stays small whatever the data loader's batch size (the statistics do not depend on it).
        center: for every layer with a bias, replace H by the Gram of the centred inputs, H - T mu mu^T (mu: the
            mean input token), and record mu as ``token_mean``: a compressed layer whose bias absorbs the mean's
            output change, b + mu^T (W - W_hat), has output error (x - mu)(W - W_hat), so the centred Gram is the
            right metric for it (see ``CompressionConfig.bias_correction``). The reported errors keep the
            uncentred output energy as their denominator.
        grad_images: only the first ``grad_images`` images run the backward (G is their average); the others run
            forward only and feed H. The backward is most of this pass's cost (see docs/loss_aware_study.md, Cost);
            None: every image.
        compute_dtype: "float32", or "bfloat16" to run the forward and backward under ``torch.autocast`` on the
            device (activations and gradients reach the hooks in bfloat16; the Gram products and sums keep
            ``gram_precision``).
        clip: (low, high): every token's output gradient rescaled to a norm within [low m, high m], m the mean norm
            of its image's tokens (KFAC-SVD's clipping, :func:`~lowrank_vit.core.covariance.clipped_token_scale`);
            None: the gradients as they are.
        who: the method that asked for given labels, named in the error when a batch has none (default: the
            ``fisher_labels='given'`` setting).

    Raises:
        ValueError: a model without class logits, missing labels for ``labels="given"``, NaN or inf activations or
            gradients, a layer the pass never reached, or a layer whose output gradient is zero on every image.
    """
    if labels not in FISHER_LABELS:
        raise ValueError(f"fisher_labels must be one of {FISHER_LABELS}, got {labels!r}")
    product_dtype = {"float64": torch.float64, "float32": torch.float32}.get(gram_precision)
    if product_dtype is None:
        raise ValueError(f"gram_precision must be 'float64' or 'float32', got {gram_precision!r}")
    _check_classifier(model)
    device = device or next(model.parameters()).device
    if gram_space not in ("input", "auto"):
        raise ValueError(f"gram_space must be 'input' or 'auto', got {gram_space!r}")
    if isinstance(micro_batch, bool) or not isinstance(micro_batch, int) or micro_batch < 1:
        raise ValueError(f"micro_batch must be a positive integer, got {micro_batch!r}")
    if grad_images is not None and (isinstance(grad_images, bool) or not isinstance(grad_images, int)
                                    or grad_images < 1):
        raise ValueError(f"grad_images must be a positive integer or None, got {grad_images!r}")
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype must be one of {COMPUTE_DTYPES}, got {compute_dtype!r}")
    generator = torch.Generator().manual_seed(seed)
    # "output": the input side is kept as W^T H W; "grad_input": the gradient side as W G W^T (see gram_space)
    output_side = {n for n, lin in layers.items() if gram_space == "auto" and lin.in_features > lin.out_features}
    grad_input_side = {n for n, lin in layers.items() if gram_space == "auto" and lin.out_features > lin.in_features}

    def zeros(width: int) -> torch.Tensor:
        return torch.zeros(width, width, dtype=torch.float64, device=device)

    h_sums = {n: zeros(lin.out_features if n in output_side else lin.in_features) for n, lin in layers.items()}
    g_sums = {n: zeros(lin.in_features if n in grad_input_side else lin.out_features) for n, lin in layers.items()}
    # tr(H) of output-side layers, tr(G) of grad-input-side layers: float64 sums on the device, read once at the end
    traces = {n: torch.zeros((), dtype=torch.float64, device=device) for n in layers}
    centred = {n for n, lin in layers.items() if center and lin.bias is not None}
    token_sums = {n: torch.zeros(layers[n].in_features, dtype=torch.float64, device=device) for n in centred}
    rows = dict.fromkeys(layers, 0)
    seen_grad = dict.fromkeys(layers, False)
    scratch = Scratch()
    products: dict[tuple[int, str], torch.Tensor] = {}
    mode = {"backward_hooks": True}  # False: g W from output-gradient hooks (see the retry below)
    logits_finite: list[tuple[int, torch.Tensor]] = []  # (batch index, flag on the device) of every micro-batch

    def accumulate(name: str, sums: dict[str, torch.Tensor], side: str, values: torch.Tensor) -> None:
        flat = values.detach().reshape(-1, values.shape[-1])
        cast = flat if flat.dtype == product_dtype else scratch.get(side, tuple(flat.shape), product_dtype,
                                                                      flat.device).copy_(flat)
        width = flat.shape[1]
        product = products.get((width, side))
        if product is None:  # blocks below the diagonal stay zero (see upper_gram_)
            product = products[(width, side)] = torch.zeros(width, width, dtype=product_dtype, device=flat.device)
        upper_gram_(product, cast)
        sums[name] += product  # a NaN or inf stays in the sum's diagonal (sums of squares): see check_finite

    def check_finite() -> None:
        """Raise on the first non-finite value the pass has met, in the order a forward and backward pass meets
        them: a layer's inputs, the logits, a layer's loss gradients. One host read for every layer and batch
        (checking each product as it is formed stalled a GPU's queue of kernels at every layer)."""
        def layer(what: str, name: str) -> str:
            return (f"non-finite {what} (NaN or inf) reach layer {name} during the loss-aware calibration; check the "
                    f"model and the data, or {_OPTIONS}")

        checks = [(layer("activations", name), torch.isfinite(sums.diagonal()).all()) for name, sums in h_sums.items()]
        checks += [(str(_nonfinite_logits(index)), finite) for index, finite in logits_finite]
        checks += [(layer("loss gradients", name), torch.isfinite(sums.diagonal()).all())
                   for name, sums in g_sums.items()]
        for (message, _), finite in zip(checks, torch.stack([flag for _, flag in checks]).tolist(), strict=True):
            if not finite:
                raise ValueError(message)
        logits_finite.clear()  # checked: later checks read the sums alone for the batches before this one

    def clipped(grad: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
        """``grad`` with KFAC-SVD's per-token clipping of ``reference`` (the output gradient; default ``grad``)."""
        if clip is None:
            return grad
        scale = clipped_token_scale(grad if reference is None else reference, *clip)
        shaped = grad.reshape(scale.shape[0], -1, grad.shape[-1])
        return (shaped * scale.to(grad.dtype)).reshape(grad.shape)

    def make_hook(name: str):
        def hook(module: nn.Linear, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            x = inputs[0]
            rows[name] += x.numel() // module.in_features
            if name in token_sums:  # in the products' precision (a float64 copy of every batch cost ~10% of the pass)
                token_sums[name] += x.detach().reshape(-1, x.shape[-1]).sum(0, dtype=product_dtype).double()
            if name in output_side:  # W^T H W from the bias-free outputs x W, and tr(H)
                y = output.detach()
                if module.bias is not None:
                    y = torch.sub(y, module.bias.detach(), out=scratch.get("output", tuple(y.shape), y.dtype,
                                                                             y.device))
                accumulate(name, h_sums, "input", y)
                traces[name] += _energy(x)
            else:
                accumulate(name, h_sums, "input", x)
            if output.requires_grad and name not in grad_input_side:
                def grad_hook(grad: torch.Tensor) -> None:
                    seen_grad[name] = True
                    accumulate(name, g_sums, "grad", clipped(grad))
                output.register_hook(grad_hook)
            elif output.requires_grad and not mode["backward_hooks"]:
                def input_grad_hook(grad: torch.Tensor) -> None:  # the backward hook's g W, one matmul more
                    seen_grad[name] = True
                    grad = clipped(grad)
                    accumulate(name, g_sums, "grad", grad.to(module.weight.dtype) @ module.weight.detach())
                    traces[name] += _energy(grad)
                output.register_hook(input_grad_hook)
        return hook

    def make_backward_hook(name: str):
        def hook(module: nn.Linear, grad_input: tuple, grad_output: tuple) -> None:
            # W G W^T is the Gram of g W^T, the gradient at this layer's own input, which the backward has just
            # computed: reusing it saves a matmul as large as the layer's forward
            if grad_input[0] is None or grad_output[0] is None:
                return
            seen_grad[name] = True
            accumulate(name, g_sums, "grad", clipped(grad_input[0], grad_output[0]))
            traces[name] += _energy(clipped(grad_output[0]))
        return hook

    def one_pass(stream: Iterable) -> tuple[int, int]:
        """Run the forward and backward pass; returns (images, images with a backward)."""
        produced = with_grad = 0
        generator.manual_seed(seed)
        with contextlib.ExitStack() as cleanup, hooked_in_eval(model, layers, make_hook), torch.enable_grad(), \
                torch.autocast(device.type, dtype=torch.bfloat16, enabled=compute_dtype == "bfloat16"), \
                progress_bar(total=num_images, desc="loss-aware calibration", unit="img", enabled=progress) as bar:
            if mode["backward_hooks"]:
                for name in grad_input_side:
                    cleanup.callback(layers[name].register_full_backward_hook(make_backward_hook(name)).remove)
            for index, (images, batch) in enumerate(stream):
                for start in range(0, images.shape[0], micro_batch):
                    # the graph reaches every layer through the images; the weights' gradients are never formed
                    part = images[start: start + micro_batch].to(device)
                    backward = part.shape[0] if grad_images is None else max(0, min(part.shape[0],
                                                                                     grad_images - with_grad))
                    if backward < part.shape[0]:  # past grad_images: forward only, H alone
                        with torch.no_grad():
                            logits = _logits(model(part[backward:]))
                            logits_finite.append((index, torch.isfinite(logits).all()))
                    if backward:
                        part = part[:backward].requires_grad_(True)
                        logits = _logits(model(part))
                        logits_finite.append((index, torch.isfinite(logits).all()))
                        target = _labels(batch, index, logits, labels, generator, start, who)
                        if target is None:  # sampled labels from NaN logits: say where the NaN came from
                            check_finite()
                            raise _nonfinite_logits(index)
                        target = target.to(logits.dtype) if target.is_floating_point() else target
                        logits = logits if logits.dtype == torch.float64 else logits.float()
                        loss = F.cross_entropy(logits, target, reduction="sum")  # one gradient per image
                        torch.autograd.grad(loss, part)
                        with_grad += backward
                    if not produced:
                        unreached(name for name, n in rows.items() if n == 0)
                        check_finite()  # bad data fails on its first micro-batch, not after the whole pass
                        first.clear()  # the first micro-batch went through: no retry needs it again
                    produced += images[start: start + micro_batch].shape[0]
                    bar.update(images[start: start + micro_batch].shape[0])
        return produced, with_grad

    source = iter(iter_calibration_batches(batches, num_images))
    first: list = []

    def remembered() -> Iterator:  # keeps the first batch until its first micro-batch went through
        for count, item in enumerate(source):
            if count == 0:
                first.append(item)
            yield item

    try:
        produced, with_grad = one_pass(remembered())
    except RuntimeError as exc:
        # A module whose output its parent changes in place (timm's BEiT, EVA and Swin V2 add the q and v biases to
        # qkv's output) cannot carry a full backward hook: autograd refuses the in-place change on the output the
        # hook wraps. Such a model fails on its first micro-batch; it then runs again with output-gradient hooks,
        # which form g W themselves (the same statistics, one more matmul per widening layer).
        if not first or "BackwardHookFunction" not in str(exc):
            raise
        mode["backward_hooks"] = False
        for sums in (h_sums, g_sums, token_sums):
            for tensor in sums.values():
                tensor.zero_()
        for tensor in traces.values():
            tensor.zero_()
        rows.update(dict.fromkeys(layers, 0))
        seen_grad.update(dict.fromkeys(layers, False))
        logits_finite.clear()
        produced, with_grad = one_pass(itertools.chain(list(first), source))
    check_finite()
    traces = dict(zip(traces, torch.stack(list(traces.values())).tolist(), strict=True))  # one host read for all

    stats: dict[str, LayerStats] = {}
    for name, layer in layers.items():
        G = symmetrize_upper(g_sums[name])
        grad_energy = traces[name] if name in grad_input_side else float(torch.diagonal(G).sum())
        if not seen_grad[name] or grad_energy <= 0.0:
            raise ValueError(f"layer {name} received no loss gradient during the loss-aware calibration (it does not "
                             f"influence the logits, or every gradient was zero); {_OPTIONS}")
        tokens = rows[name] / produced
        H = symmetrize_upper(h_sums[name]).div_(produced)
        W = layer.weight.detach().to(device).double().T
        if name in output_side:  # H holds W^T H W here
            energy = float(torch.diagonal(H).sum())
        else:
            energy = float(torch.sum(W * (H @ W)))  # tr(W^T H W): mean output energy per image
        scale = energy / produced if energy > 0 else 1.0
        mean = None
        if name in centred:  # (1/N) sum (x - mu)(x - mu)^T = H - T mu mu^T, on whichever side H is kept
            mean = token_sums[name] / rows[name]
            side_mean = mean @ W if name in output_side else mean
            H.sub_(tokens * torch.outer(side_mean, side_mean))
            if name in output_side:
                traces[name] -= produced * tokens * float(mean @ mean)
        G.div_(with_grad * tokens)
        if name in output_side:
            stats[name] = LayerStats(gram=None, num_images=produced, output_gram=H.div_(scale),
                                     input_trace=traces[name] / produced / scale, range_weight=W, grad_gram=G,
                                     loss_scale=scale, tokens=tokens, token_mean=mean)
        elif name in grad_input_side:
            stats[name] = LayerStats(gram=H.div_(scale), num_images=produced, grad_range_gram=G,
                                     grad_trace=traces[name] / (with_grad * tokens), loss_scale=scale, tokens=tokens,
                                     token_mean=mean)
        else:
            stats[name] = LayerStats(gram=H.div_(scale), num_images=produced, grad_gram=G, loss_scale=scale,
                                     tokens=tokens, token_mean=mean)
    return stats


def _narrow_side(W: torch.Tensor, stats: LayerStats) -> tuple[str, torch.Tensor, float]:
    """The smaller of the two Gram matrices the decomposition can work from, with the trace its damping needs:
    ("input", W G W^T, tr G) (in x in) or ("output", W^T H W, tr H) (out x out), in the rescaled units of ``gram``
    (see :func:`collect_loss_statistics`). Narrow-side statistics give one directly; full ones are reduced here."""
    if stats.grad_range_gram is not None:
        return "input", stats.grad_range_gram.double().to(W.device), float(stats.grad_trace)
    if stats.output_gram is not None:
        return "output", stats.output_gram.double().to(W.device), float(stats.input_trace)
    if stats.grad_gram is None or stats.gram is None:
        raise ValueError("the loss-aware decomposition needs loss-aware statistics (collect_loss_statistics)")
    if W.shape[0] <= W.shape[1]:
        G = stats.grad_gram.double().to(W.device)
        return "input", W @ G @ W.T, float(torch.diagonal(G).sum())
    H = stats.gram.double().to(W.device)
    return "output", W.T @ H @ W, float(torch.diagonal(H).sum())


def _two_sided_from_narrow_side(W: torch.Tensor, stats: LayerStats, damping: float, values_only: bool = False,
                                grad_damping: float | None = None,
                                ) -> tuple[Decomposition | torch.Tensor, Whitening | None]:
    """The SVD ``A W B^T = P diag(s) R^T`` (A^T A = H_d, B^T B = G_d) from one eigendecomposition on the layer's
    narrow side, without the other side's Gram or whitening:

    * input side (in <= out): ``A W G_d W^T A^T = P diag(s^2) P^T`` and W_hat(r) = A^-1 P_r P_r^T A W, i.e.
      left = A^-1 P, right = W^T A^T P / s;
    * output side (in > out): ``B W^T H_d W B^T = R diag(s^2) R^T`` and W_hat(r) = W B^T R_r R_r^T B^-T, i.e.
      left = W B^T R / s, right = B^-1 R.

    The damping of the missing side enters as ``d tr(G)/out W W^T`` (or ``d tr(H)/in W^T W``), exactly as
    :func:`~lowrank_vit.core.decompose.whitening` damps a full Gram. ``grad_damping`` damps G (default: ``damping``,
    which then damps H only). Returns the decomposition (or only s) and the input whitening when one was computed."""
    side, narrow, trace = _narrow_side(W, stats)
    k, m = W.shape
    grad_damping = damping if grad_damping is None else grad_damping
    if side == "input":
        A = whitening(stats.gram, damping)
        AW = A.apply(W)
        N = A.apply(A.apply((narrow + (grad_damping * trace / m) * (W @ W.T)).T).T)  # A (W G_d W^T) A^T
        P, s = psd_eigh(N, vectors=not values_only)
        if values_only:
            return s, A
        return Decomposition(A.solve(P), (AW.T @ P) * live_inverse(s), s), A
    B = whitening(stats.grad_gram, grad_damping)
    N = B.apply(B.apply((narrow + (damping * trace / k) * (W.T @ W)).T).T)  # B (W^T H_d W) B^T
    R, s = psd_eigh(N, vectors=not values_only)
    if values_only:
        return s, None
    return Decomposition((W @ (B.root.T @ R)) * live_inverse(s), B.solve(R), s), None


def loss_aware_svd(weight: torch.Tensor, stats: LayerStats, damping: float,
                   grad_damping: float | None = None) -> tuple[Decomposition, Whitening | None]:
    """:func:`~lowrank_vit.core.decompose.two_sided_svd` of one layer from its loss-aware statistics, computed on the
    layer's narrow side (:func:`_two_sided_from_narrow_side`: one eigendecomposition of the smaller dimension instead
    of two whitenings and an SVD), in the loss's units (singular values squared = tr(dW^T H dW G) of dropping each
    direction), and the input whitening when it was computed (of the rescaled ``gram``: the one the closed-form Z
    kinds need). Both Grams are damped as :func:`~lowrank_vit.core.decompose.whitening` does, G by ``grad_damping``
    where it is given."""
    d, white = _two_sided_from_narrow_side(weight.double(), stats, damping, grad_damping=grad_damping)
    root = stats.loss_scale ** 0.5  # the whitening of gram = H / loss_scale: undo the scale on s (and on left)
    return Decomposition(d.left / root, d.right, d.singular_values * root), white


def loss_aware_singular_values(weight: torch.Tensor, stats: LayerStats, damping: float,
                               grad_damping: float | None = None) -> torch.Tensor:
    """The spectrum of :func:`loss_aware_svd` alone (for planning)."""
    s, _ = _two_sided_from_narrow_side(weight.double(), stats, damping, values_only=True, grad_damping=grad_damping)
    return s * stats.loss_scale ** 0.5
