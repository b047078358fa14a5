"""Block-wise reconstruction: after the allocation (and the refit, if any), each transformer block's factors tuned by
a few Adam steps so that the *compressed* block, fed the compressed model's own inputs, reproduces the *dense*
block's output on the dense inputs.

Why. Every decomposition fits a layer on its own, to statistics of the dense model. In the compressed model a layer
receives inputs that the compression of the layers before it has already shifted, and the errors of the layers of
one block meet again at its nonlinearities (the attention's softmax, GELU, LayerScale, the scan's gates), which no
per-layer criterion sees. The sequential refit (:mod:`lowrank_vit.core.refit`) answers the first part in closed
form, one linear layer at a time; a block's output is the smallest unit in which the second part is visible, and
it is small enough to be fitted on the calibration images without labels and without the whole model's graph:

    min over the block's trainable parameters of  mean ||B_c(x_c) - B_d(x_d)||^2 / mean ||B_d(x_d)||^2,

x_d the dense block's inputs (the calibration images through the dense model), x_c the compressed block's (through
the blocks already reconstructed). The target is the dense output on the dense inputs, not on x_c: the block is
asked to undo the shift it receives as well as its own error.

Memory. Only the current block's activations are held: the two streams' inputs to the block and the dense block's
output, each one tensor over the calibration images (:class:`BlockCache`), advanced block by block with the
block's forward (a block that does not directly follow the previous one in an ``nn.Sequential``, such as Swin's
first block after a patch merging, gets its inputs again from the images). The Adam steps backpropagate through one
block on a sampled batch of those images.

Metric. ``metric="mse"`` weighs every entry of the block's output alike. ``metric="fisher"`` weighs each position
and channel by the dense model's diagonal Fisher there (:func:`output_fisher`): the mean over the calibration images
of g^2, g the gradient at the block's output of the loss of a target drawn from the model's own output (the
compression's likelihood; no labels). Squared error in this metric is the second-order change of the expected loss
when the block's output moves along the diagonal, so a direction the output does not depend on costs nothing: the
patch tokens of a class-token classifier's last block, say, which the plain error spends its steps on.

Safeguard. A block whose objective on all the calibration images ends higher than it started (a learning rate too
large for it) gets its parameters back: the reconstruction never makes the error it optimizes worse.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from lowrank_vit.core.progress import progress_bar
from lowrank_vit.core.refit import _capture, _follows, block_calls, replaying

TRAINABLE = ("factors", "factors_bias", "block")
"""What a block's reconstruction trains: "factors" (U and V of its factorized layers, and their Z), "factors_bias"
(those layers' biases too), "block" (every parameter of the block: norms, LayerScale, the scan's own parameters
and the layers the allocation left dense as well)."""


@dataclass
class BlockCache:
    """What the reconstruction holds for the current block: the dense stream's input, the compressed stream's input
    and the dense block's output (the target), each one tensor over all calibration images."""

    dense_in: torch.Tensor
    compressed_in: torch.Tensor
    target: torch.Tensor

    def tensors(self) -> list[torch.Tensor]:
        """The cached activation tensors (what bounds the memory: three, whatever the model's depth)."""
        return [self.dense_in, self.compressed_in, self.target]


@dataclass
class BlockResult:
    """One block's objective (relative squared error of its output, all calibration images) before and after."""

    before: float
    after: float
    reverted: bool = False


@dataclass
class BlockwiseResult:
    """Per block (``per_block``) its :class:`BlockResult`, and per factorized layer its output error on the dense
    inputs after the reconstruction (pooled: sum ||layer_c(x) - layer_d(x)||^2 / sum ||x W||^2 over the calibration
    tokens)."""

    per_block: dict[str, BlockResult] = field(default_factory=dict)
    layer_errors: dict[str, float] = field(default_factory=dict)


def trainable_parameters(block: nn.Module, trainable: str,
                         factorized: tuple[type[nn.Module], ...]) -> list[nn.Parameter]:
    """The parameters of ``block`` that the reconstruction trains (:data:`TRAINABLE`); ``factorized``: the module
    types whose parameters are the factors. Floating-point parameters only (index buffers are never parameters)."""
    if trainable not in TRAINABLE:
        raise ValueError(f"trainable={trainable!r} is not one of {', '.join(map(repr, TRAINABLE))}")
    if trainable == "block":
        chosen = list(block.parameters())
    else:
        chosen, seen = [], set()
        for module in block.modules():
            if not isinstance(module, factorized):
                continue
            for name, p in module.named_parameters():
                if id(p) in seen or (name.rpartition(".")[2] == "bias" and trainable == "factors"):
                    continue
                seen.add(id(p))
                chosen.append(p)
    return [p for p in chosen if p.is_floating_point()]


def relative_error(output: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """mean ||output - target||^2 / mean ||target||^2: the objective in units that do not depend on the block's
    output scale (a Swin's late stage carries larger activations than its first), so one learning rate fits all.
    ``weight`` (one image's output shape, broadcast over the batch): both means weighted by it."""
    if weight is None:
        return (output - target).pow(2).mean() / target.pow(2).mean().clamp_min(1e-30)
    return (weight * (output - target).pow(2)).mean() / (weight * target.pow(2)).mean().clamp_min(1e-30)


@torch.no_grad()
def _run(block: nn.Module, x: torch.Tensor, batch: int) -> torch.Tensor:
    return torch.cat([block(x[i: i + batch]) for i in range(0, x.shape[0], batch)])


@torch.no_grad()
def _error(block: nn.Module, x: torch.Tensor, target: torch.Tensor, batch: int,
           weight: torch.Tensor | None = None) -> float:
    """:func:`relative_error` over all images, summed batch by batch (float64 sums)."""
    num = den = 0.0
    w = 1.0 if weight is None else weight.double()
    for i in range(0, x.shape[0], batch):
        t = target[i: i + batch].double()
        num += float((w * (block(x[i: i + batch]).double() - t).pow(2)).sum())
        den += float((w * t.pow(2)).sum())
    return num / den if den > 0 else 0.0


def output_fisher(dense: nn.Module, names: list[str], images: list[torch.Tensor],
                  sampled_loss: Callable[[object], torch.Tensor | None], device: torch.device,
                  micro_batch: int = 64, progress: bool = True) -> dict[str, torch.Tensor]:
    """The diagonal Fisher of each block's output (``names``), per position and channel: the mean over ``images``
    of g^2, g the gradient at that output of ``sampled_loss(dense(images))`` (the loss of a target drawn from the
    output itself, summed over the images: one gradient per image). Normalized to mean 1 per block (the objective
    is relative); a block whose output the loss does not reach at all gets None (the plain error). One forward and
    backward of the dense model over the images; what it keeps is one image's output shape per block."""
    sums: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}
    handles = []
    for name in names:
        def hook(module: nn.Module, args: tuple, output: object, name: str = name) -> None:
            if isinstance(output, torch.Tensor) and output.requires_grad:
                outputs[name] = output
        handles.append(dense.get_submodule(name).register_forward_hook(hook))
    was_training = dense.training
    dense.eval()
    try:
        with torch.enable_grad(), progress_bar(sum(b.shape[0] for b in images), "block metric (Fisher)", "img",
                                               progress) as bar:
            for batch in images:
                for i in range(0, batch.shape[0], micro_batch):
                    chunk = batch[i: i + micro_batch].to(device).requires_grad_(True)
                    outputs.clear()
                    loss = sampled_loss(dense(chunk))
                    if loss is None:
                        raise ValueError("the dense model's output is not finite on a calibration image: the block "
                                         "reconstruction's Fisher metric cannot draw targets from it")
                    reached = [n for n in names if n in outputs]
                    grads = torch.autograd.grad(loss, [outputs[n] for n in reached], allow_unused=True)
                    for n, g in zip(reached, grads, strict=True):
                        if g is not None:
                            sq = g.detach().double().pow(2).sum(0)
                            sums[n] = sq if n not in sums else sums[n] + sq
                    bar.update(chunk.shape[0])
    finally:
        for handle in handles:
            handle.remove()
        dense.train(was_training)
    weights = {}
    for name in names:
        fisher = sums.get(name)
        mean = float(fisher.mean()) if fisher is not None else 0.0
        weights[name] = (fisher / mean).float() if mean > 0 and math.isfinite(mean) else None
    return weights


METRICS: dict[str, Callable[..., dict[str, torch.Tensor | None]] | None] = {"mse": None, "fisher": output_fisher}
"""The block output's metric by name: the plain squared error (no weights), or weighted by the dense model's diagonal
Fisher (:func:`output_fisher`)."""


def metric_weights(metric: str, dense: nn.Module, names: list[str], images: list[torch.Tensor],
                   sampled_loss: Callable[[], Callable[[object], torch.Tensor | None]], device: torch.device,
                   progress: bool = True) -> dict[str, torch.Tensor | None] | None:
    """The per-block weights of ``metric`` (:data:`METRICS`; None for the plain error). ``sampled_loss()`` builds the
    likelihood's loss of a sampled target, called only by a metric that needs it."""
    weigh = METRICS[metric]
    return None if weigh is None else weigh(dense, names, images, sampled_loss(), device, progress=progress)


def _adam_groups(params: list[nn.Parameter], lr: float) -> list[dict]:
    """One Adam group per tensor, its learning rate ``lr`` times the tensor's root mean square: Adam's steps are
    absolute, and the factors' scale depends on the decomposition's whitening (a loss-aware U can be far from unit
    scale), so a relative step fits every layer with one setting. A tensor of zeros (a bias never set) gets ``lr``."""
    groups = []
    for p in params:
        rms = float(p.detach().double().pow(2).mean().sqrt()) if p.numel() else 0.0
        groups.append({"params": [p], "lr": lr * rms if rms > 0 else lr})
    for group in groups:
        group["initial_lr"] = group["lr"]
    return groups


def reconstruct_block(block: nn.Module, cache: BlockCache, params: list[nn.Parameter], *, steps: int, lr: float,
                      batch_size: int, generator: torch.Generator, micro_batch: int = 64,
                      weight: torch.Tensor | None = None) -> BlockResult:
    """``steps`` Adam steps (cosine-decayed learning rate) on ``params`` of ``block`` so that ``block`` on
    ``cache.compressed_in`` matches ``cache.target`` (:func:`relative_error`), each step on ``batch_size`` images
    drawn by ``generator``. The block is in eval mode throughout (no dropout or stochastic depth). Restores the
    parameters where the objective over all images ends above where it started. ``weight``: the metric
    (:func:`relative_error`; None, the plain squared error).

    The step is ``lr`` relative to each tensor's scale (:func:`_adam_groups`) and to the block's relative output
    error e = sqrt(objective before): the weight change a block needs is of the order of its error, and a fixed
    step overshoots a block that is nearly right (measured: at -70% a fixed 1e-2 raised the KL to the dense model
    on the CIFAR-10 Swin, where scaling by e lowered it) while it suits one that is far off (-80%)."""
    if weight is not None:
        weight = weight.to(cache.target.device, cache.target.dtype)
    before = _error(block, cache.compressed_in, cache.target, micro_batch, weight)
    if not params or steps == 0:
        return BlockResult(before, before)
    saved = [p.detach().clone() for p in params]
    flags = {id(p): p.requires_grad for p in block.parameters()}
    for p in block.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(_adam_groups(params, lr * math.sqrt(before)))
    count = cache.compressed_in.shape[0]
    try:
        with torch.enable_grad():
            for step in range(steps):
                scale = 0.5 * (1.0 + math.cos(math.pi * step / steps))
                for group in optimizer.param_groups:
                    group["lr"] = group["initial_lr"] * scale
                index = torch.randperm(count, generator=generator)[:batch_size].to(cache.compressed_in.device)
                loss = relative_error(block(cache.compressed_in[index]), cache.target[index], weight)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    finally:
        for p in block.parameters():
            p.requires_grad_(flags[id(p)])
            p.grad = None
    after = _error(block, cache.compressed_in, cache.target, micro_batch, weight)
    if not math.isfinite(after) or after > before:
        with torch.no_grad():
            for p, value in zip(params, saved, strict=True):
                p.copy_(value)
        return BlockResult(before, before, reverted=True)
    return BlockResult(before, after)


@contextlib.contextmanager
def measuring_layer_errors(dense_root: nn.Module, root: nn.Module, layers: list[str],
                           prefix: str = "") -> Iterator[dict[str, float]]:
    """While open, every forward of ``dense_root`` measures each of ``layers`` (full names under the model; ``prefix``
    is ``dense_root``'s own name, "" for the whole model) as it is now in ``root`` against the dense layer, on the
    dense inputs; on closing, the dict it yielded holds sum ||layer_c(x) - layer_d(x)||^2 / sum ||x W||^2 over those
    tokens (the bias change included, so a bias that absorbs the mean error gives the centred error of the
    loss-aware report)."""
    sums = {name: [0.0, 0.0] for name in layers}
    handles = []
    for name in layers:
        local = name[len(prefix) + 1:] if prefix else name
        dense_layer, layer = dense_root.get_submodule(local), root.get_submodule(local)

        def hook(module: nn.Module, args: tuple, output: torch.Tensor, name=name, layer=layer) -> None:
            x = args[0]
            out = output.double()
            bias = 0.0 if module.bias is None else module.bias.double()
            sums[name][0] += float((layer(x).double() - out).pow(2).sum())
            sums[name][1] += float((out - bias).pow(2).sum())

        handles.append(dense_layer.register_forward_hook(hook))
    errors: dict[str, float] = {}
    try:
        yield errors
    finally:
        for handle in handles:
            handle.remove()
    errors.update({name: num / den if den > 0 else 0.0 for name, (num, den) in sums.items()})


@torch.no_grad()
def layer_errors(dense_block: nn.Module, block: nn.Module, layers: list[str], prefix: str, dense_in: torch.Tensor,
                 micro_batch: int = 64) -> dict[str, float]:
    """Each of ``layers`` in ``block`` against the dense layer, on the dense block's inputs ``dense_in``
    (:func:`measuring_layer_errors`)."""
    with measuring_layer_errors(dense_block, block, layers, prefix) as errors:
        _run(dense_block, dense_in, micro_batch)
    return errors


def block_reconstruction(dense: nn.Module, model: nn.Module, blocks: dict[str, list[str]], images: list[torch.Tensor],
                         *, trainable: str, factorized: tuple[type[nn.Module], ...], steps: int, lr: float,
                         batch_size: int, seed: int, device: torch.device, micro_batch: int = 64,
                         progress: bool = True, weights: dict[str, torch.Tensor | None] | None = None,
                         on_block: Callable[[str, BlockCache], None] | None = None) -> BlockwiseResult:
    """Walk the blocks of ``model`` (compressed) and ``dense`` in forward order (``blocks``: block name -> the
    factorized layers whose errors :func:`layer_errors` reports) and reconstruct each block that holds a module of
    a ``factorized`` type (:func:`reconstruct_block`; a block the allocation left dense is only advanced) before the
    compressed stream moves past it. ``images``: the
    calibration images (batches, on any device). ``on_block(name, cache)`` is called with each block's cache (what
    the tests count). ``weights``: block name -> its output metric (:func:`output_fisher`; missing or None: the
    plain squared error). Both models are left in the mode they were in."""
    was_training = (dense.training, model.training)
    dense.eval()
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    result = BlockwiseResult()
    previous: str | None = None
    x_d = x_c = target = None
    try:
        calls_d, calls_c = (block_calls(m, list(blocks), images, device, "the block reconstruction")
                            for m in (dense, model))
        with progress_bar(len(blocks), "block reconstruction", "block", progress) as bar, \
                replaying(dense, calls_d), replaying(model, calls_c):
            for name, layers in blocks.items():
                block_d, block_c = dense.get_submodule(name), model.get_submodule(name)
                if target is not None and _follows(model, previous, name):
                    x_d, target = target, None  # the dense stream's next input is the previous block's target
                    x_c = _run(model.get_submodule(previous), x_c, micro_batch)
                else:
                    x_d = x_c = target = None  # free the previous block's before capturing anew
                    x_d, x_c = _block_inputs(dense, model, block_d, block_c, name, images, device, micro_batch)
                target = _run(block_d, x_d, micro_batch)
                cache = BlockCache(x_d, x_c, target)
                if on_block is not None:
                    on_block(name, cache)
                if any(isinstance(m, factorized) for m in block_c.modules()):
                    params = trainable_parameters(block_c, trainable, factorized)
                    result.per_block[name] = reconstruct_block(block_c, cache, params, steps=steps, lr=lr,
                                                               batch_size=batch_size, generator=generator,
                                                               micro_batch=micro_batch,
                                                               weight=(weights or {}).get(name))
                    result.layer_errors.update(layer_errors(block_d, block_c, layers, name, x_d, micro_batch))
                del cache
                previous = name
                bar.update(1)
    finally:
        dense.train(was_training[0])
        model.train(was_training[1])
    return result


@torch.no_grad()
def _block_inputs(dense: nn.Module, model: nn.Module, block_d: nn.Module, block_c: nn.Module, name: str,
                  images: list[torch.Tensor], device: torch.device,
                  micro_batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The inputs of block ``name`` in both models over all ``images``, captured from their forward passes (which
    stop there)."""
    parts_d, parts_c = [], []
    for batch in images:
        for i in range(0, batch.shape[0], micro_batch):
            chunk = batch[i: i + micro_batch].to(device)
            x_d = _capture(block_d, lambda b=chunk: dense(b))
            x_c = _capture(block_c, lambda b=chunk: model(b))
            parts_d.append(x_d)
            parts_c.append(x_c)
    return torch.cat(parts_d), torch.cat(parts_c)
