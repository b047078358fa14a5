"""Sequential refit with error feedback: the loss-aware factors recomputed layer by layer, in forward order, for the
inputs the *compressed* model actually gives each layer.

Why. The loss-aware decomposition fits every layer on the dense model's inputs X. In the compressed model a layer
sees X_c instead, which carries the errors of every layer before it; at high ratios (-70% and beyond) those add up.
The refit keeps the ranks the allocation chose and asks, one layer at a time, for the rank-r weight whose outputs on
X_c are closest to the dense layer's outputs on X, in the same loss-aware metric (G: the Gram of the loss gradients
at the dense layer's output):
    min_{rank(W_hat) <= r}  tr((X_c W_hat - X W) G (X_c W_hat - X W)^T).

With H_c = X_c^T X_c, K = X_c^T X (centred when the bias absorbs the mean, as the decomposition's own bias
correction does) and W* = H_c^-1 K W, the least-squares weight for the new inputs, the objective is
||A (W_hat - W*) B^T||_F^2 + const (A^T A = H_c, B^T B = G): exactly the loss-aware two-sided SVD of W* on H_c. So
the refit is the same decomposition (:func:`lowrank_vit.core.loss_aware_svd.loss_aware_svd`) applied to W*; where the
compressed inputs equal the dense ones (the first layer), K = H_c and W* = W: nothing changes. W* is a ridge
regression toward W (``CompressionConfig.refit_damping``, :func:`feedback_transform`): with few calibration tokens per
input feature the plain least squares fits their noise.

Anchored to the dense block's output (``refit_target="block"``). The target above is each layer's own dense output,
so the drift that the residual stream carries from block to block is never aimed at: every layer passes it on. The
layer that writes a block's output through at most a per-channel gain g (fc2; g is LayerScale's gamma, or 1), found
by probing the block (:func:`residual_gain`), aims instead at the dense block's output: its target becomes X W + E,
with E the change of its output that would make the compressed block's output the dense one (:func:`anchor_change`),
and W* the least squares for that target (:func:`anchored_weight`), decomposed alike.

Cost. The calibration images are kept, and two block-input caches (dense and compressed stream) are advanced block by
block instead of running the whole model once per layer. The dense block does not change: it runs once per block,
which records every refitted layer's dense input and its own output (the next block's input) at once, at the memory
of those inputs for the calibration images (about 7 widths per token in a ViT block). The compressed block changes
layer by layer, so it runs up to each refitted layer in turn, and once more to advance: about three times per
block. The input of a block that does not directly follow the previous one in an ``nn.Sequential`` (Swin's first
block of a stage, after its patch merging) is recomputed from the images.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lowrank_vit.core.calibration import LayerStats, symmetrize_upper, upper_gram_
from lowrank_vit.core.decompose import Whitening, whitening
from lowrank_vit.core.progress import progress_bar


@dataclass
class PairGrams:
    """Statistics of one layer's inputs in the compressed (c) and the dense (d) model, over the same tokens."""

    gram: torch.Tensor
    """H_c = (1/N) sum X_c^T X_c (k, k) float64, centred when ``mean_c`` is set."""
    cross: torch.Tensor
    """K = (1/N) sum X_c^T X (k, k) float64, centred likewise."""
    mean_c: torch.Tensor | None
    """The mean input token of the compressed model (k,), when centred."""
    mean_d: torch.Tensor | None
    """The mean input token of the dense model (k,), when centred."""
    dense_gram: torch.Tensor | None = None
    """H_d = (1/N) sum X^T X (k, k) float64, not centred: only where asked for (the report's exact error)."""
    tokens: float = 0.0
    """T, the layer's input rows per image."""
    anchor_cross: torch.Tensor | None = None
    """With the anchor (:func:`residual_gain`): C = (1/N) sum X_c^T E (k, m) float64, centred like ``cross``, where E
    is the change of this layer's output that would carry the compressed block's output onto the dense block's (the
    drift the residual stream brings in from earlier blocks, and the errors of the block's other layers)."""
    anchor_mean: torch.Tensor | None = None
    """The mean of E over the tokens (m,), when centred: the refitted bias takes it up."""


def dense_output_error(pair: PairGrams, weight: torch.Tensor, delta: torch.Tensor) -> float:
    """The report's error of a weight change on the dense inputs, pooled over the calibration set as the loss-aware
    report pools it: tr(delta^T H_d delta) / tr(W^T H_d W), with H_d centred in the numerator where the bias absorbs
    the mean (``pair.mean_d`` set). Exact for any delta, where an output-side layer's statistics (``gram_space=
    "auto"``) are exact only for deltas in the range of W, which a refitted weight need not be."""
    if pair.dense_gram is None:
        raise ValueError("dense_output_error needs PairGrams.dense_gram")
    H = pair.dense_gram
    energy = float(torch.sum(weight * (H @ weight)))
    if pair.mean_d is not None:
        H = H - pair.tokens * torch.outer(pair.mean_d, pair.mean_d)
    return float(torch.sum(delta * (H @ delta))) / energy if energy > 0 else 0.0


def feedback_transform(pair: PairGrams, damping: float) -> torch.Tensor:
    """S (k, k) with W* = S W, the least-squares weight for the compressed inputs:
        W* = argmin ||X_c W* - X W||^2 + d ||W* - W||^2 = (H_c + d I)^-1 (K + d I) W,

    with H_c + d I damped by :func:`~lowrank_vit.core.decompose.whitening` (d relative to H_c's mean diagonal). The
    damping pulls directions the calibration inputs barely reach toward the dense weight (not toward zero), so
    unchanged inputs (K = H_c) give S = I exactly; so does a layer that never saw a non-zero input (its whitening
    is the identity)."""
    white, ridge = _damped(pair, damping)
    return white.solve_gram(pair.cross.double().to(white.gram.device) + ridge)


def _damped(pair: PairGrams, damping: float) -> tuple[Whitening, torch.Tensor]:
    """The whitening of H_c + d I, and d I (the identity where H_c is zero)."""
    white = whitening(pair.gram, damping)
    return white, white.gram - pair.gram.double().to(white.gram.device)


def anchored_weight(pair: PairGrams, weight: torch.Tensor, damping: float) -> torch.Tensor:
    """W* (k, m) for a layer anchored to its block's output: the least squares of the layer's outputs on X_c against
    the dense outputs plus E (:attr:`PairGrams.anchor_cross`), with the ridge of :func:`feedback_transform` toward W:
        W* = argmin ||X_c W* - (X W + E)||^2 + d ||W* - W||^2 = (H_c + d I)^-1 ((K + d I) W + X_c^T E).
    Without an anchor it is S W."""
    white, ridge = _damped(pair, damping)
    right = (pair.cross.double().to(white.gram.device) + ridge) @ weight.double().to(white.gram.device)
    if pair.anchor_cross is not None:
        right = right + pair.anchor_cross.double().to(right.device)
    return white.solve_gram(right)


def feedback_stats(stats: LayerStats, pair: PairGrams, transform: torch.Tensor | None) -> LayerStats:
    """The loss-aware statistics of W* = S W on the compressed inputs: H_c for H, and G unchanged (it is the dense
    layer's, whose outputs the refit aims at). A layer whose G is kept on its input side as W G W^T (``gram_space=
    "auto"``) gets S (W G W^T) S^T, the same Gram for W*; tr(G) is unchanged. ``transform`` None: W* is not S W (an
    anchored layer), which needs G itself."""
    if stats.grad_range_gram is not None:
        if transform is None:
            raise ValueError("a layer whose G is kept on its input side (as W G W^T) cannot be refitted to a weight "
                             "that is not S W (refit_target='block')")
        S = transform.to(stats.grad_range_gram.device)
        return LayerStats(gram=pair.gram, num_images=stats.num_images, grad_range_gram=S @ stats.grad_range_gram @ S.T,
                          grad_trace=stats.grad_trace, tokens=stats.tokens)
    if stats.grad_gram is None:
        raise ValueError("the refit needs the layer's loss-aware gradient statistics (G), which were freed or never "
                         "collected: it runs with decomposition='loss_aware' only")
    return LayerStats(gram=pair.gram, num_images=stats.num_images, grad_gram=stats.grad_gram, tokens=stats.tokens)


def refit_bias(bias: torch.Tensor, weight: torch.Tensor, fitted: torch.Tensor, pair: PairGrams) -> torch.Tensor:
    """b' = b + mu_d W - mu_c W_hat (+ the mean of E, :attr:`PairGrams.anchor_mean`, for an anchored layer): the
    compressed layer is exact at the mean token (float64)."""
    if pair.mean_c is None or pair.mean_d is None:
        return bias.double()
    anchor = 0.0 if pair.anchor_mean is None else pair.anchor_mean.double().to(bias.device)
    return bias.double() + pair.mean_d @ weight - pair.mean_c @ fitted + anchor


class _Stop(Exception):
    """Raised by a capture hook: the rest of the forward pass is not needed."""


def _capture(module: nn.Module, run: Callable[[], object]) -> torch.Tensor:
    """The first positional input of ``module`` during ``run()`` (which stops there; the rest of a block's call is
    :func:`block_calls`' to record)."""
    box: dict[str, torch.Tensor] = {}

    def hook(_: nn.Module, args: tuple) -> None:
        box["x"] = args[0].detach()
        raise _Stop

    handle = module.register_forward_pre_hook(hook)
    try:
        run()
    except _Stop:
        pass
    finally:
        handle.remove()
    if "x" not in box:
        raise ValueError(f"the refit's forward pass never reached {type(module).__name__}")
    return box["x"]


@contextlib.contextmanager
def _hooked(modules: dict[str, nn.Module], make_hook: Callable[[str], Callable], *, pre: bool = True,
            with_kwargs: bool = False) -> Iterator[None]:
    """While inside: ``make_hook(name)`` as a forward pre-hook (``pre``) or forward hook on each of ``modules``,
    removed on exit whatever happened."""
    handles = [(module.register_forward_pre_hook if pre else module.register_forward_hook)(
        make_hook(name), with_kwargs=with_kwargs) for name, module in modules.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _run_recording(block: nn.Module, x: torch.Tensor, layers: dict[str, nn.Module],
                   outputs: Collection[str] = ()) -> tuple[object, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``block(x)`` run to the end, with the first positional input of each of ``layers`` (name -> module) on its
    first call: what :func:`_capture` gives one layer at a time, for all of them in one pass; and the output, on its
    first call, of each layer named in ``outputs`` (the anchored layer's, which its anchor needs beside its input)."""
    inputs: dict[str, torch.Tensor] = {}
    outs: dict[str, torch.Tensor] = {}

    def recorder(name: str) -> Callable[[nn.Module, tuple], None]:
        def hook(_: nn.Module, args: tuple) -> None:
            if name not in inputs:  # a copy: later in-place operations of the block must not change it
                inputs[name] = args[0].detach().clone()
        return hook

    def out_recorder(name: str) -> Callable[[nn.Module, tuple, torch.Tensor], None]:
        def hook(_: nn.Module, args: tuple, out: torch.Tensor) -> None:
            if name not in outs:
                outs[name] = out.detach().clone()
        return hook

    with _hooked(layers, recorder), _hooked({name: layers[name] for name in outputs}, out_recorder, pre=False):
        out = block(x)
    missing = [name for name in layers if name not in inputs] + [name for name in outputs if name not in outs]
    if missing:
        raise ValueError(f"the refit's forward pass never reached {', '.join(dict.fromkeys(missing))}")
    return out, inputs, outs


def _run_through(block: nn.Module, layer: nn.Module, x: torch.Tensor,
                 change: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor,
                                                                                      torch.Tensor]:
    """``block(x)`` run to the end: the layer's input and output (on its first call) and the block's output, with
    ``change(output)`` added to the layer's output on the way where given."""
    box: dict[str, torch.Tensor] = {}

    def hook(_: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
        if "out" in box:
            return None
        box["in"], box["out"] = args[0].detach().clone(), out.detach().clone()
        return None if change is None else out + change(out)

    handle = layer.register_forward_hook(hook)
    try:
        y = block(x)
    finally:
        handle.remove()
    if "out" not in box:
        raise ValueError(f"the refit's forward pass never reached {type(layer).__name__}")
    if not isinstance(y, torch.Tensor):
        raise ValueError(f"block {type(block).__name__} returns {type(y).__name__}, not a tensor")
    return box["in"], box["out"], y


@torch.no_grad()
def residual_gain(block: nn.Module, layer: nn.Module, x: torch.Tensor, rtol: float = 1e-3) -> torch.Tensor | None:
    """g (m,) where ``block(x) = base + g * layer_output`` token by token and channel by channel, with ``base``
    independent of the layer's output and not zero: the layer writes the block's output, into its residual stream,
    through at most a per-channel scale (a ViT's fc2, through DeiT-III's LayerScale gamma; 1 without it). None where
    it does not: qkv, proj and fc1, whose outputs the rest of the block reads through a softmax, a norm or an
    activation; a post-norm block's fc2 (Swin V2 "cr": its output is normalized before the residual sum). Found by
    probing, not by module names: the layer's output moved by a constant and by random values (a few times its own
    size, so that a nonlinearity would show), the block's output compared with g times the move (relative ``rtol``,
    well above float32 rounding). Only the first two images of ``x`` are used."""
    x = x[:2]
    _, out, y0 = _run_through(block, layer, x)
    width = out.shape[-1]
    if y0.numel() != out.numel() or y0.shape[-1] != width:
        return None
    size = 4 * float(out.float().pow(2).mean().sqrt()) + 1e-3
    flat = (_run_through(block, layer, x, lambda o: torch.full_like(o, size))[2] - y0).reshape(-1, width) / size
    gain = flat.mean(0)
    scale = float(gain.abs().max())
    if scale == 0 or float((flat - gain).abs().max()) > rtol * scale:
        return None
    if float((y0.reshape(-1, width) - out.reshape(-1, width) * gain).norm()) <= rtol * float(y0.norm()):
        return None  # the output is the layer's own, scaled: no residual stream to aim at
    generator = torch.Generator(device="cpu").manual_seed(0)
    noise = (torch.randn(out.shape, generator=generator) * size).to(out)
    moved = (_run_through(block, layer, x, lambda o: noise)[2] - y0).reshape(-1, width)
    expected = noise.reshape(-1, width) * gain
    if float((moved - expected).norm()) > rtol * float(expected.norm()):
        return None
    return gain


def anchor_change(gain: torch.Tensor, y_d: torch.Tensor, y_c: torch.Tensor, out_d: torch.Tensor,
                  out_c: torch.Tensor) -> torch.Tensor:
    """E (rows, m): with ``y = base + g * out`` (:func:`residual_gain`), the change of the compressed layer's
    output that makes the compressed block's output the dense one's, beside the dense layer's output:
        out_d + E = (y_d - base_c) / g,   so   E = (y_d - y_c) / g - out_d + out_c.
    A channel whose gain is zero (to float32 rounding of the largest) cannot move the output: its E is zero."""
    width = gain.shape[0]
    live = gain.abs() > 1e-6 * gain.abs().max()
    safe = torch.where(live, gain, torch.ones_like(gain))
    change = (y_d - y_c).reshape(-1, width) / safe - out_d.reshape(-1, width) + out_c.reshape(-1, width)
    return change * live


def _follows(model: nn.Module, previous: str | None, name: str) -> bool:
    """Whether block ``name`` is the next child after block ``previous`` in one ``nn.Sequential`` (so its input is
    ``previous``'s output)."""
    if previous is None:
        return False
    parent_a, _, index_a = previous.rpartition(".")
    parent_b, _, index_b = name.rpartition(".")
    if parent_a != parent_b or not (index_a.isdigit() and index_b.isdigit()):
        return False
    parent = model.get_submodule(parent_a) if parent_a else model
    return isinstance(parent, nn.Sequential) and int(index_b) == int(index_a) + 1


@dataclass(frozen=True)
class BlockCall:
    """What a block is called with besides its input: the same for every image (EVA's rotary position table passed
    as ``rope=``, say), so that ``block(x)`` on cached inputs can be replayed with it (:func:`replaying`)."""

    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def plain(self) -> bool:
        return not self.args and not self.kwargs


def _same(a: Any, b: Any) -> bool:
    """Whether two recorded call values are equal: tensors by shape and value, containers element by element."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and bool(
            torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    try:  # anything else by equality; a value that cannot say (an array, say) is taken as different
        return a is b or bool(a == b)
    except (TypeError, ValueError, RuntimeError):
        return False


def _two_images(images: list[torch.Tensor]) -> torch.Tensor:
    """The first two calibration images (one where there is only one), across batches."""
    first = images[0][:2]
    if first.shape[0] < 2 and len(images) > 1:
        first = torch.cat([first, images[1][:1].to(first.device)])
    return first


@torch.no_grad()
def block_calls(model: nn.Module, names: list[str], images: list[torch.Tensor], device: torch.device,
                stage: str = "the refit") -> dict[str, BlockCall]:
    """Each block of ``names``: what ``model``'s forward passes it besides its input, recorded on the first
    calibration image and on the first two (``images``: the batches). A value that differs between the two (an
    attention mask with a batch dimension, say) cannot be replayed on cached inputs of other batches: ValueError
    naming ``stage``."""
    images = _two_images(images)
    records: list[dict[str, BlockCall]] = []
    blocks = {name: model.get_submodule(name) for name in names}
    for count in (1, 2):
        seen: dict[str, BlockCall] = {}

        def recorder(name: str, seen: dict[str, BlockCall] = seen) -> Callable:
            def hook(_: nn.Module, args: tuple, kwargs: dict) -> None:  # (returns None: the call goes on unchanged)
                seen.setdefault(name, BlockCall(tuple(args[1:]), dict(kwargs)))
            return hook

        with _hooked(blocks, recorder, with_kwargs=True):
            model(images[:count].to(device))
        records.append(seen)
    calls = {}
    for name in names:
        if name not in records[0]:
            raise ValueError(f"{stage}'s forward pass never reached block {name}")
        one, two = records[0][name], records[1][name]
        if not (_same(one.args, two.args) and _same(one.kwargs, two.kwargs)):
            raise ValueError(f"block {name} is called with arguments that depend on the batch besides its input "
                             f"(a mask, say); {stage} re-runs each block on cached inputs and cannot follow it")
        calls[name] = one
    return calls


@contextlib.contextmanager
def replaying(model: nn.Module, calls: dict[str, BlockCall]) -> Iterator[None]:
    """Inside, a block of ``calls`` called with its input alone (``block(x)`` on a cache) gets the rest of its call
    too; a call with more (the model's own forward) is left as it is."""
    def replayer(name: str) -> Callable:
        call = calls[name]

        def hook(_: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            if len(args) == 1 and not kwargs:
                return (*args, *call.args), dict(call.kwargs)
            return None
        return hook

    with _hooked({name: model.get_submodule(name) for name, call in calls.items() if not call.plain}, replayer,
                     with_kwargs=True):
        yield


def _accumulate_pair(x_c: torch.Tensor, x_d: torch.Tensor, sums: dict[str, torch.Tensor], center: bool,
                     dtype: torch.dtype, dense: bool, anchor: torch.Tensor | None = None) -> None:
    c = x_c.reshape(-1, x_c.shape[-1])
    d = x_d.reshape(-1, x_d.shape[-1])
    if c.shape != d.shape:
        raise ValueError(f"the compressed and the dense layer see different token shapes ({tuple(c.shape)} vs "
                         f"{tuple(d.shape)})")
    product = sums.get("product")
    if product is None:  # blocks below the diagonal stay zero (upper_gram_): both Grams are symmetrized at the end
        product = sums["product"] = torch.zeros(c.shape[1], c.shape[1], dtype=dtype, device=c.device)
    if dense:
        sums["dense"] += upper_gram_(product, d.to(dtype)).double()
    if center:
        # Centred sums of tokens shifted by the first batch's mean: sum x x^T - N mu mu^T on the raw tokens cancels
        # catastrophically in float32 products where the mean dwarfs the spread (an attention output of nearly equal
        # tokens), which left H_c indefinite and the refit's least squares amplifying rounding errors by 1e9.
        if "shift_c" not in sums:  # rounded to the product's precision, so that adding it back is exact
            sums["shift_c"], sums["shift_d"] = (x.double().mean(0).to(dtype).double() for x in (c, d))
        c, d = c.to(dtype) - sums["shift_c"].to(dtype), d.to(dtype) - sums["shift_d"].to(dtype)  # no float64 copy
        sums["sum_c"] += c.sum(0, dtype=torch.float64)
        sums["sum_d"] += d.sum(0, dtype=torch.float64)
    cast_c, cast_d = c.to(dtype), d.to(dtype)
    sums["gram"] += upper_gram_(product, cast_c).double()
    sums["cross"] += (cast_c.T @ cast_d).double()
    if anchor is not None:  # E (rows, m): the change of the layer's output that carries its block onto the dense one
        sums["anchor"] = sums.get("anchor", 0) + (cast_c.T @ anchor.to(dtype)).double()
        sums["sum_e"] = sums.get("sum_e", 0) + anchor.sum(0, dtype=torch.float64)
    sums["rows"] += c.shape[0]


def _pair_grams(sums: dict[str, torch.Tensor], images: int, center: bool) -> PairGrams:
    gram, cross, rows = symmetrize_upper(sums["gram"]), sums["cross"], float(sums["rows"])
    mean_c = mean_d = mean_e = None
    anchor = sums.get("anchor")
    if center:  # the sums are of shifted tokens (_accumulate_pair): centring them gives the same Grams
        mean_c, mean_d = sums["sum_c"] / rows, sums["sum_d"] / rows
        gram = gram - rows * torch.outer(mean_c, mean_c)
        cross = cross - rows * torch.outer(mean_c, mean_d)
        if anchor is not None:  # E is not shifted: sum (c - mu_c)^T (E - mu_E) = sum c^T E - N mu_c mu_E^T
            mean_e = sums["sum_e"] / rows
            anchor = anchor - rows * torch.outer(mean_c, mean_e)
        if "shift_c" in sums:
            mean_c, mean_d = mean_c + sums["shift_c"], mean_d + sums["shift_d"]
    dense = sums.get("dense")
    return PairGrams(gram / images, cross / images, mean_c, mean_d,
                     None if dense is None else symmetrize_upper(dense) / images, rows / images,
                     None if anchor is None else anchor / images, mean_e)


@torch.no_grad()
def sequential_refit(dense: nn.Module, model: nn.Module, blocks: dict[str, list[str]], images: list[torch.Tensor],
                     fit: Callable[[str, PairGrams], None], *, centred: Callable[[str], bool],
                     dense_gram: Callable[[str], bool] = lambda name: False,
                     anchored: Callable[[str], bool] = lambda name: False, device: torch.device,
                     gram_precision: str = "float64", progress: bool = True) -> None:
    """Walk the blocks in forward order; for every layer of ``blocks`` (block name -> its refitted layers, in forward
    order) collect the :class:`PairGrams` of its inputs in ``model`` (compressed, being refitted) and ``dense`` over
    ``images`` (micro-batches, on any device) and call ``fit(name, pair)``, which must update the layer in ``model``
    before the next layer's statistics are taken.

    ``centred(name)``: whether that layer's statistics are centred (its bias absorbs the mean); ``dense_gram(name)``:
    whether its :class:`PairGrams` also carry the dense inputs' Gram (one more product per micro-batch);
    ``anchored(name)``: whether that layer aims at the dense block's output rather than its own dense outputs, where
    it writes the block's output (:func:`residual_gain`; elsewhere its own, as if not asked): its :class:`PairGrams`
    then carry the anchor's E (:func:`anchor_change`)."""
    dtype = {"float64": torch.float64, "float32": torch.float32}[gram_precision]
    was_training = (dense.training, model.training)
    dense.eval()
    model.eval()
    total = sum(len(names) for names in blocks.values())
    previous: str | None = None
    cache_d: list[torch.Tensor] = []
    cache_c: list[torch.Tensor] = []
    next_d: list = []
    try:
        calls_d, calls_c = (block_calls(m, list(blocks), images, device) for m in (dense, model))
        with progress_bar(total, "refit", "layer", progress) as bar, replaying(dense, calls_d), \
                replaying(model, calls_c):
            for block_name, names in blocks.items():
                block_d, block_c = dense.get_submodule(block_name), model.get_submodule(block_name)
                if _follows(model, previous, block_name):  # advance both streams by one block
                    prev_c = model.get_submodule(previous)
                    cache_d = next_d  # the dense block's outputs, from its one recorded pass
                    cache_c = [prev_c(x) for x in cache_c]
                else:  # from the images (the first block, or after modules between blocks)
                    cache_d, cache_c = [], []
                    for batch in images:
                        batch = batch.to(device)
                        x_d = _capture(block_d, lambda b=batch: dense(b))
                        x_c = _capture(block_c, lambda b=batch: model(b))
                        cache_d.append(x_d)
                        cache_c.append(x_c)
                # the dense block is not refitted: one pass records every layer's input and the block's output
                # (and the output of each layer its anchor will be asked of and that writes the block's output, the
                # anchor needing it beside its input: probed first, so that qkv's, fc1's and a post-norm fc2's
                # outputs, which the probe refuses, are not kept for nothing)
                aims = [name for name in names if anchored(name)
                        and residual_gain(block_c, model.get_submodule(name), cache_c[0]) is not None]
                recorded = [_run_recording(block_d, x, {name: dense.get_submodule(name) for name in names}, aims)
                            for x in cache_d]
                next_d = [out for out, _, _ in recorded]
                dense_inputs = {name: [inputs[name] for _, inputs, _ in recorded] for name in names}
                dense_outputs = {name: [outs[name] for _, _, outs in recorded] for name in aims}
                images_seen = sum(x.shape[0] for x in cache_c)
                del recorded
                cache_d = []  # (its outputs are next_d)
                for name in names:
                    layer_d, layer_c = dense.get_submodule(name), model.get_submodule(name)
                    width = layer_d.in_features
                    center = centred(name)
                    sums = {"gram": torch.zeros(width, width, dtype=torch.float64, device=device),
                            "cross": torch.zeros(width, width, dtype=torch.float64, device=device),
                            "sum_c": torch.zeros(width, dtype=torch.float64, device=device),
                            "sum_d": torch.zeros(width, dtype=torch.float64, device=device), "rows": 0}
                    with_dense = dense_gram(name)
                    if with_dense:
                        sums["dense"] = torch.zeros(width, width, dtype=torch.float64, device=device)
                    # (probed on the compressed block: LayerScale and the norms are not compressed, so its gain is
                    # the dense block's)
                    gain = residual_gain(block_c, layer_c, cache_c[0]) if anchored(name) else None
                    outs_d = dense_outputs.pop(name, None) or [None] * len(cache_c)
                    for in_d, out_d, x_c, y_d in zip(dense_inputs.pop(name), outs_d, cache_c, next_d, strict=True):
                        if gain is None:
                            in_c = _capture(layer_c, lambda b=x_c, f=block_c: f(b))
                            _accumulate_pair(in_c, in_d, sums, center, dtype, with_dense)
                            continue
                        if out_d is None:  # the probe before the recording refused it, this one not (its gain is
                            out_d = layer_d(in_d)  # read again after the block's earlier layers were refitted)
                        in_c, out_c, y_c = _run_through(block_c, layer_c, x_c)
                        change = anchor_change(gain, y_d, y_c, out_d, out_c)
                        _accumulate_pair(in_c, in_d, sums, center, dtype, with_dense, change)
                    fit(name, _pair_grams(sums, images_seen, center))
                    bar.update(1)
                previous = block_name
    finally:
        dense.train(was_training[0])
        model.train(was_training[1])


def micro_batches(images: list[torch.Tensor], size: int) -> Iterator[torch.Tensor]:
    """The images regrouped into batches of at most ``size``."""
    for batch in images:
        for start in range(0, batch.shape[0], size):
            yield batch[start: start + size]
