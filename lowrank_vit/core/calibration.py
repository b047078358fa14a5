"""Calibration: one forward pass over the proxy dataset, streaming per-layer statistics through forward hooks.

For layer l with dense weight W (k, m) and image i with input tokens X_i (t, k), eq. (5) weighs image i by
w_i = 1 / ||X_i W||_F^2. Everything the closed-form solvers need is the weighted Gram matrix
H = sum_i w_i X_i^T X_i (k, k), accumulated in float64, so memory does not grow with the number of images.
Optional extras: the mean input X_rep (eq. 7, the paper's literal recipe) and, for the SGD solver, a few randomly
chosen tokens of every image with their own weights (the mini-batches of eq. 10).

Cost. The Gram products are the calibration's price beyond the forward itself: per block of a ViT they take about
1.6x the multiplications of the block's four linears, most of it the fc2 input's (4x wider than the others). Two
exact reductions are available:

* always: only the upper block triangle of each symmetric product is computed (:func:`upper_gram_`), the per-image
  weights come from a float32 per-token norm of the output (no float64 copy), scratch buffers are reused, and the
  NaN/inf check reads the product's diagonal instead of every activation;
* ``gram_space="auto"`` (the default where it is exact, see ``pipeline.statistics_space``): a layer with fewer
  outputs than inputs (fc2: 1536 -> 384) accumulates the m x m Gram of its bias-free *outputs*,
  M = sum_i w_i (X_i W)^T (X_i W) = W^T H W, 1/16 of the work for fc2. Every quantity that depends on H only
  through W^T H W is then unchanged: the whitened decomposition ``H^-1/2 SVD_r(H^1/2 W) = W Q_r Q_r^T`` (Q: the
  eigenvectors of W^T H_d W, ``decompose.output_whitened_svd``), its energy losses, the closed-form low-rank Z (the
  same SVD's tail), and eq. (5)'s error of any W_hat whose columns lie in the range of W (:func:`output_error`). None
  of these forms a k x k matrix; a reader that needs one gets :func:`range_gram`, equal to H wherever W is involved.
  Quantities that need H elsewhere (the mean-input decomposition, sparse, diagonal and structured Z, errors of an
  SGD-fitted Z) use ``gram_space="input"``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from lowrank_vit.core.common import IMAGE_KEYS, batch_images
from lowrank_vit.core.decompose import weighted_error
from lowrank_vit.core.progress import progress_bar

# Images whose output energy is below this are treated as carrying no signal (weight 0), not as infinitely important.
_MIN_ENERGY = 1e-30


@dataclass
class LayerStats:
    """Calibration statistics of one linear layer (all tensors on the calibration device)."""

    gram: torch.Tensor | None
    """H = sum_i w_i X_i^T X_i, float64, (k, k). For a layer collected on the output side (``output_gram`` set) pass
    None: reading it then builds, once, the matrix of :func:`range_gram` (equal to H on the range of W), which costs
    a k x k product that planning, needing only the spectrum (``decompose.output_whitened_singular_values``), never
    pays. Read it before the layer's weight changes (``range_weight`` is a view of it)."""
    num_images: int
    """Images that contributed (the N of eq. 10's 1/|D|)."""
    mean_input: torch.Tensor | None = None
    """X_rep = mean_i X_i, float64, (t, k); only when requested."""
    samples: torch.Tensor | None = None
    """(N, s, k) float32: s random tokens of each image, for the SGD solver; only when requested."""
    sample_weights: torch.Tensor | None = None
    """(N,) float32: 1 / ||X_i^s W||^2 of the sampled tokens."""
    output_gram: torch.Tensor | None = None
    """M = sum_i w_i (X_i W)^T (X_i W) = W^T H W, float64, (m, m); only for layers collected on the output side."""
    input_trace: float | None = None
    """tr(H) = sum_i w_i ||X_i||_F^2; only for layers collected on the output side (``gram`` keeps this trace)."""
    range_weight: torch.Tensor | None = None
    """W (k, m) of a layer collected on the output side: the range on which ``gram`` is built."""
    grad_gram: torch.Tensor | None = None
    """Loss-aware statistics only (:mod:`lowrank_vit.core.loss_aware`): G = 1/(N T) sum_{i,t} g g^T, float64, (m, m),
    the Gram of the loss gradients at the layer's output."""
    loss_scale: float = 1.0
    """Loss-aware and token-weighted statistics: the method's own Gram (the K-FAC input factor; SVD-LLM's sum of
    x x^T over all calibration tokens) is ``loss_scale * gram``; ``gram`` itself is scaled so that :func:`output_error`
    reports the pooled relative output error (see ``loss_aware.collect_loss_statistics``, ``pooled_token_stats``)."""
    tokens: float | None = None
    """Loss-aware statistics only: T, the layer's input rows per image."""
    grad_range_gram: torch.Tensor | None = None
    """Loss-aware statistics of a layer with more outputs than inputs under ``gram_space="auto"``: W G W^T (in x in,
    the Gram of g W^T) instead of ``grad_gram``; all the decomposition needs of G besides tr(G)."""
    grad_trace: float | None = None
    """tr(G), with ``grad_range_gram``."""
    fourth_moment: float | None = None
    """sum_t ||x_t||^4 over every calibration token, when asked for (Ledoit-Wolf shrinkage, FLAR-SVD)."""
    rows: int | None = None
    """Input rows (tokens) the layer saw over the whole calibration set."""
    token_mean: torch.Tensor | None = None
    """Centred statistics only (``collect_loss_statistics(center=True)``): mu, the mean input token (k,), float64.
    The Grams are then those of x - mu, and the compressed layer's bias must absorb mu^T (W - W_hat)."""


def _get_gram(stats: LayerStats) -> torch.Tensor:
    gram = stats.__dict__.get("_gram")
    if gram is None:
        if stats.output_gram is None or stats.range_weight is None or stats.input_trace is None:
            raise ValueError("LayerStats without a gram needs output_gram, input_trace and range_weight")
        gram = stats.__dict__["_gram"] = range_gram(stats.range_weight, stats.output_gram, stats.input_trace)
    return gram


def _set_gram(stats: LayerStats, gram: torch.Tensor | None) -> None:
    stats.__dict__["_gram"] = gram


def output_error(stats: LayerStats, delta: torch.Tensor) -> float:
    """Eq. (5)'s mean normalized output error tr(delta^T H delta) / N of a weight change ``delta`` (k, m). For an
    output-side layer whose (k x k) matrix was never built, from the factored :class:`RangeBasis` (built once per
    layer): exact for every delta in the range of W, which every W_hat of the output-side configurations is."""
    if stats.output_gram is None or stats.__dict__.get("_gram") is not None:
        return weighted_error(delta, stats.gram, stats.num_images)
    basis = stats.__dict__.get("_range_basis")
    if basis is None:
        basis = stats.__dict__["_range_basis"] = range_basis(stats.range_weight, stats.output_gram,
                                                             stats.input_trace)
    return basis.quadratic(delta) / max(stats.num_images, 1)


# ``gram`` stays a dataclass field (constructor, fields(), repr) but reads through a property, so that the k x k
# matrix of an output-side layer is only formed by the code that needs it.
LayerStats.gram = property(_get_gram, _set_gram, doc="H, float64, (k, k) (built on first read for output-side layers)")


def images_from_batch(batch: object) -> torch.Tensor:
    """The image tensor of one batch: a tensor, an (images, labels) pair, or a dict with an image key."""
    images = batch_images(batch)
    if images is None:
        raise TypeError(f"a calibration batch must be an image tensor, an (images, labels) tuple or a dict with an "
                        f"image tensor under one of {IMAGE_KEYS}, got {type(batch).__name__}")
    return images


def iter_calibration_images(batches: Iterable, num_images: int) -> Iterator[torch.Tensor]:
    """Yield image batches until ``num_images`` images were produced; validate each batch."""
    for images, _ in iter_calibration_batches(batches, num_images):
        yield images


def iter_calibration_batches(batches: Iterable, num_images: int) -> Iterator[tuple[torch.Tensor, object]]:
    """Yield (images, the batch they came from) until ``num_images`` images were produced; validate each batch's
    images (the batch itself is passed on for readers of its labels)."""
    if isinstance(batches, torch.Tensor):  # a single tensor of images is one batch, not an iterable of images
        batches = [batches]
    produced = 0
    for index, batch in enumerate(batches):
        images = images_from_batch(batch)
        if images.ndim != 4:
            raise ValueError(f"calibration batch {index} has shape {tuple(images.shape)}; expected (B, C, H, W)")
        if not images.is_floating_point():
            raise ValueError(f"calibration batch {index} has dtype {images.dtype}; expected floating-point images")
        if not torch.isfinite(images).all():
            raise ValueError(f"calibration batch {index} contains NaN or inf values")
        images = images[: num_images - produced]
        if images.shape[0] == 0:
            continue
        produced += images.shape[0]
        yield images, batch
        if produced >= num_images:
            return
    if produced == 0:
        raise ValueError("the calibration data is empty: no image was produced by the iterable")


def first_calibration_images(batches: Iterable) -> tuple[torch.Tensor, Iterator]:
    """The images of the first calibration batch, checked as :func:`iter_calibration_batches` checks them, and the
    batches from the start again for one more reading: the first put back before the rest (each batch is read
    once, as a data loader's would be)."""
    if isinstance(batches, torch.Tensor):
        batches = [batches]
    iterator = iter(batches)
    try:
        first = next(iterator)
    except StopIteration:
        raise ValueError("the calibration data is empty: no image was produced by the iterable") from None
    images, _ = next(iter_calibration_batches([first], 2**62))  # the reader's checks; an empty batch refused
    return images, itertools.chain([first], iterator)


class Scratch:
    """Reusable work buffers: one flat tensor per (role, dtype, device), grown on demand and viewed to shape.

    The hooks' temporaries are as large as a layer's whole batch of activations (tens of MB); allocating them afresh
    for every layer and batch costs page faults and zero-filling of the order of the arithmetic itself on a CPU.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}

    def get(self, role: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (role, dtype, device)
        numel = math.prod(shape)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            buffer = self._buffers[key] = torch.empty(numel, dtype=dtype, device=device)
        return buffer[:numel].view(shape)


def output_energies(output: torch.Tensor, bias: torch.Tensor | None, batch: int,
                    scratch: Scratch | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """||X_i W||_F^2 of every image in a batch (float64, (batch,)) from the layer's output X_i W + b, and the
    bias-free output X W itself ((batch, tokens, out), in a scratch buffer when ``scratch`` is given).

    No float64 copy of the output: each token's squared norm is summed over the features in the output's own
    precision (a vectorised float32 reduction over at most a few thousand values) and only the per-token sums are
    accumulated in float64. The relative error (~1e-8) is far below the rounding of the float32 forward that
    produced the output. Outputs so large that their float32 squares overflow are redone in float64; squares that
    underflow (|values| < 1e-19) belong to images far below the zero-energy threshold.
    """
    y = output.reshape(batch, -1, output.shape[-1])
    if y.dtype not in (torch.float32, torch.float64):
        y = y.float()
    if bias is not None:
        out = None if scratch is None else scratch.get("output", tuple(y.shape), y.dtype, y.device)
        y = torch.sub(y, bias.to(y.dtype), out=out)
    return squared_norms(y), y


def squared_norms(rows: torch.Tensor) -> torch.Tensor:
    """||R_i||_F^2 of every image of a (batch, tokens, width) tensor, float64: per-token norms in the tensor's own
    precision, summed in float64; redone in float64 if a float32 square overflowed (|values| > 1e19)."""
    energy = torch.linalg.vector_norm(rows, dim=-1).double().square().sum(dim=1)
    if not bool(torch.isfinite(energy).all()):  # an overflow, or non-finite values (which stay non-finite)
        energy = rows.double().square().sum(dim=(1, 2))
    return energy


def image_weights(energy: torch.Tensor) -> torch.Tensor:
    """Eq. (5)'s per-image weights 1 / ||X_i W||^2; images with no output energy weigh 0."""
    return torch.where(energy > _MIN_ENERGY, 1.0 / energy.clamp_min(_MIN_ENERGY), torch.zeros_like(energy))


_GRAM_BLOCK = 192
"""Narrowest column block of the symmetric Gram product. An input at least twice as wide is split into 2 to 4 equal
blocks and only the upper block triangle of X^T X is computed: 3 of 4 block products at 384 wide (DeiT-S), 10 of 16
at 768 and wider. Measured on 6,304 tokens on this project's 2-core CPU: 0.83-0.88x the time of the full product at
384, 0.77x at 768, 0.68x at 1024 and 1536; bit-identical entries (each is the same dot product). Blocks of 384 gave
0.9x at 768 and no gain at 384."""


def upper_gram_(out: torch.Tensor, x: torch.Tensor, block: int = _GRAM_BLOCK) -> torch.Tensor:
    """Write X^T X into ``out`` (k, k): every block on or above the diagonal exactly, blocks below it left untouched
    (so only ``torch.triu(out)`` is meaningful). Exact: the same dot products as a full product, about half the
    multiplications for wide inputs (a blocked ``syrk``, which torch does not expose), one GEMM per block row.
    Inputs narrower than ``2 * block`` get one full product."""
    k = x.shape[1]
    parts = min(4, k // block)
    if parts < 2:
        return torch.mm(x.T, x, out=out)
    width = -(-k // parts)
    for start in range(0, k, width):
        stop = min(start + width, k)
        out[start:stop, start:].addmm_(x[:, start:stop].T, x[:, start:], beta=0)
    return out


def symmetrize_upper(matrix: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix whose upper triangle (diagonal included) is ``matrix``'s."""
    return torch.triu(matrix) + torch.triu(matrix, 1).T


@dataclass
class RangeBasis:
    """H as seen from the range of W: ``G = Q S Q^T + c (I - Q Q^T)`` (see :func:`range_gram`), kept factored."""

    Q: torch.Tensor
    """(k, rank) orthonormal basis of the range of W."""
    S: torch.Tensor
    """(rank, rank) Q^T H Q."""
    c: float
    """H's mean eigenvalue on the complement of the range (tr H - tr S) / (k - rank)."""

    def gram(self) -> torch.Tensor:
        """G, (k, k), float64."""
        rank = self.Q.shape[1]
        eye = torch.eye(rank, dtype=self.S.dtype, device=self.S.device)
        gram = self.Q @ (self.S - self.c * eye) @ self.Q.T
        gram.diagonal().add_(self.c)
        return (gram + gram.T) / 2

    def quadratic(self, delta: torch.Tensor) -> float:
        """tr(delta^T G delta) without forming G: with Y = Q^T delta, tr(Y^T S Y) + c (||delta||^2 - ||Y||^2)."""
        d = delta.double().to(self.Q.device)
        Y = self.Q.T @ d
        return float(torch.sum(Y * (self.S @ Y))) + self.c * (float(d.pow(2).sum()) - float(Y.pow(2).sum()))


def range_basis(weight: torch.Tensor, output_gram: torch.Tensor, trace: float) -> RangeBasis:
    """The factored form of :func:`range_gram` (Q, S and c), which also gives eq. (5)'s error of a W_hat in the
    range of W (:meth:`RangeBasis.quadratic`) without the (k x k) matrix."""
    W = weight.double()
    M = output_gram.double().to(W.device)
    k, m = W.shape
    Q, R = torch.linalg.qr(W)
    diag = torch.diagonal(R).abs()
    if m <= k and float(diag.min()) > 1e-10 * float(diag.max()):
        T = torch.linalg.solve_triangular(R.T, M, upper=False)  # R^-T M
        S = torch.linalg.solve_triangular(R.T, T.T, upper=False)  # R^-T (R^-T M)^T = R^-T M R^-1
    else:  # rank-deficient W: orthonormal basis of its range from W^T W = V diag(lam) V^T
        lam, V = torch.linalg.eigh(W.T @ W)
        keep = lam > lam.max().clamp_min(torch.finfo(torch.float64).tiny) * 1e-20
        inv_root = lam[keep].rsqrt()
        Q = (W @ V[:, keep]) * inv_root
        S = (V[:, keep].T @ M @ V[:, keep]) * inv_root[:, None] * inv_root[None, :]
    S = (S + S.T) / 2
    rank = Q.shape[1]
    c = max(trace - float(torch.diagonal(S).sum()), 0.0) / (k - rank) if rank < k else 0.0
    return RangeBasis(Q, S, c)


def range_gram(weight: torch.Tensor, output_gram: torch.Tensor, trace: float) -> torch.Tensor:
    """A k x k Gram matrix that agrees with H wherever W is concerned, from M = W^T H W and tr(H) alone.

    With Q an orthonormal basis of the range of W (k, m) (QR: W = Q R), ``G = Q S Q^T + c (I - Q Q^T)`` where
    ``S = Q^T H Q = R^-T M R^-1`` and ``c = (tr H - tr S) / (k - rank W) >= 0``. Then ``W^T G W = M`` exactly and
    ``tr G = tr H``, so the damped ``G + d I`` (d relative to the mean diagonal, as in the whitening) has the same
    ``W^T (G + d I) W`` as H: the whitened decomposition, its spectrum, the closed-form low-rank Z and eq. (5)'s
    error of every W_hat in the range of W are those of H. Float64; a rank-deficient W uses its eigen-basis.

    Args:
        weight: W, (k, m) = (in, out), any float dtype.
        output_gram: M, (m, m).
        trace: tr(H).
    """
    return range_basis(weight, output_gram, trace).gram()


def unreached(names: Iterable[str]) -> None:
    """Raise if any of ``names`` was not called by a forward pass that ran over at least one image. Checked after
    the first batch: a vision transformer sends every image through every block, so a layer missing then is missing
    for good, and the user learns it before a whole calibration pass instead of after it."""
    missing = list(names)
    if missing:
        raise ValueError(
            f"layer {missing[0]} was never called by the calibration forward pass"
            f"{f' (and {len(missing) - 1} other layer(s))' if len(missing) > 1 else ''}: the model does not use it, or "
            "computes its output from its weight directly (F.linear on layer.weight), which a factorized layer cannot "
            "replace; this library compresses the blocks of timm's ViT, DeiT, Swin, BEiT and EVA families")


@contextmanager
def hooked_in_eval(model: nn.Module, layers: dict[str, nn.Module], make_hook) -> Iterator[None]:
    """While the block runs: ``make_hook(name)`` as a forward hook on every layer and the model in eval mode; on
    exit, whatever happened, the hooks are removed and the model's train/eval mode is restored."""
    was_training = model.training
    handles = [layer.register_forward_hook(make_hook(name)) for name, layer in layers.items()]
    try:
        model.eval()
        yield
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)


def _check_options(gram_precision: str, gram_space: str, weighting: str) -> torch.dtype:
    """Refuse a bad option of :func:`collect_statistics` before any image runs; returns the dtype of the Gram
    products (``gram_precision``)."""
    product_dtype = getattr(torch, gram_precision, None)
    if product_dtype not in (torch.float64, torch.float32):
        raise ValueError(f"gram_precision must be 'float64' or 'float32', got {gram_precision!r}")
    if gram_space not in ("input", "auto"):
        raise ValueError(f"gram_space must be 'input' or 'auto', got {gram_space!r}")
    if weighting not in ("image", "token"):
        raise ValueError(f"weighting must be 'image' or 'token', got {weighting!r}")
    return product_dtype


@dataclass(frozen=True)
class _PassSettings:
    """The checked options of one pass (see :func:`collect_statistics`'s Args)."""

    product_dtype: torch.dtype
    """Of each batch's Gram products (``gram_precision``); the sums are float64."""
    gram_precision: str
    weighting: str
    want_mean: bool
    sample_tokens: int
    fourth_moment: bool


@dataclass
class _LayerSums:
    """One layer's statistics, summed over the images seen so far: H = sum_i w_i X_i^T X_i (module docstring), or,
    kept on the output side (``gram_space="auto"``, fewer outputs than inputs: fc2), W^T H W with tr(H); and the
    extras that were asked for."""

    gram: torch.Tensor
    """sum_i w_i X_i^T X_i (k, k), or on the output side the same sum of the bias-free outputs X_i W (m, m); float64,
    upper block triangle only (:func:`upper_gram_`)."""
    on_output: bool
    trace: float | None
    """On the output side, tr(H) = sum_i w_i ||X_i||_F^2 (``gram``'s diagonal holds tr(W^T H W) instead); None
    otherwise."""
    fourth: torch.Tensor | None
    """With ``fourth_moment``: sum_t ||x_t||^4, a float64 scalar on the device; None otherwise."""
    mean_sum: torch.Tensor | None = None
    """With ``want_mean``: sum_i X_i (t, k), float64, for X_rep (eq. 7); None before the first batch."""
    samples: list[torch.Tensor] = field(default_factory=list)
    """With ``sample_tokens``: every batch's (B, s, k) float32 sampled tokens (eq. 10's mini-batches), on the host."""
    sample_weights: list[torch.Tensor] = field(default_factory=list)
    """Their (B,) float32 weights 1 / ||X_i^s W||^2."""
    rows: int = 0
    """Input rows (tokens) met."""
    images: int = 0
    """Images met: N."""


@dataclass
class _Accumulator:
    """What the pass's hooks write: every layer's sums, and the work buffers of their Gram products."""

    sums: dict[str, _LayerSums]
    settings: _PassSettings
    generator: torch.Generator
    """Of the token sampling (``seed``)."""
    batch: int = 0
    """Images in the batch now running (the hooks split a layer's rows into images with it)."""
    scratch: Scratch = field(default_factory=Scratch)
    products: dict[tuple[int, torch.device], torch.Tensor] = field(default_factory=dict)
    """One batch's product, per (width, device), shared by the layers of that width."""


def _new_accumulator(layers: dict[str, nn.Linear], gram_space: str, settings: _PassSettings, device: torch.device,
                     seed: int) -> _Accumulator:
    """Zero sums for every layer, each Gram on the side ``gram_space`` says: "input", H (k x k) of every layer;
    "auto", W^T H W (m x m) with tr(H) for a layer with fewer outputs than inputs (see the module docstring)."""
    zeros = partial(torch.zeros, dtype=torch.float64, device=device)
    sums = {}
    for name, layer in layers.items():
        on_output = gram_space == "auto" and layer.out_features < layer.in_features
        width = layer.out_features if on_output else layer.in_features
        sums[name] = _LayerSums(zeros(width, width), on_output, 0.0 if on_output else None,
                                zeros(()) if settings.fourth_moment else None)
    return _Accumulator(sums, settings, torch.Generator().manual_seed(seed))


def _check_finite(name: str, sums: _LayerSums, gram_precision: str, x: torch.Tensor, rows: torch.Tensor,
                  product: torch.Tensor) -> None:
    """Raise where a batch's product is not finite: a NaN or inf among the rows makes the product's diagonal (sums of
    squares) non-finite, so the check reads k values instead of every activation; the element-wise test of the
    inputs ``x`` runs only then, to tell non-finite activations from a float32 product that overflowed."""
    if bool(torch.isfinite(product.diagonal()).all()):
        return
    if not torch.isfinite(x).all():
        raise ValueError(f"non-finite activations (NaN or inf) reach layer {name} during calibration")
    side = "outputs" if sums.on_output else "inputs"
    raise ValueError(f"the {gram_precision} Gram product of layer {name}'s {side} overflows (values up to "
                     f"{rows.abs().max().item():.3g}); use gram_precision='float64'")


def _add_weighted_gram_(acc: _Accumulator, name: str, sums: _LayerSums, x: torch.Tensor, rows: torch.Tensor,
                        weights: torch.Tensor) -> None:
    """Add one batch's sum_i w_i R_i^T R_i to the layer's running sum, R_i being image i's rows (its inputs X_i, for
    H; on the output side its bias-free outputs X_i W, for W^T H W): the rows scaled by sqrt(w_i) and cast to the
    product precision in one pass into a reused buffer, their symmetric product (:func:`upper_gram_`) formed in a
    matrix shared by the layers of that width, checked (:func:`_check_finite`) and added in float64."""
    product_dtype = acc.settings.product_dtype
    # One pass, into a reused buffer: the rows scaled by sqrt(w_i) come out in the product dtype.
    xs = torch.mul(rows, weights.sqrt().to(product_dtype)[:, None, None],
                   out=acc.scratch.get("rows", tuple(rows.shape), product_dtype, rows.device))
    width = xs.shape[-1]
    xs = xs.reshape(-1, width)
    product = acc.products.get((width, xs.device))
    if product is None:  # blocks below the diagonal stay zero (see upper_gram_)
        product = acc.products[(width, xs.device)] = torch.zeros(width, width, dtype=product_dtype, device=xs.device)
    upper_gram_(product, xs, _GRAM_BLOCK)
    _check_finite(name, sums, acc.settings.gram_precision, x, rows, product)
    sums.gram += product


def _add_mean_(name: str, sums: _LayerSums, x: torch.Tensor) -> None:
    """Add one batch's sum_i X_i (float64) to the sum behind the mean input X_rep (eq. 7), which needs every image
    to have the same tokens."""
    total = x.sum(dim=0, dtype=torch.float64)
    if sums.mean_sum is not None and sums.mean_sum.shape != total.shape:
        raise ValueError(f"layer {name} saw a varying number of tokens per image; "
                         "decomposition='mean' needs images of one size")
    sums.mean_sum = total if sums.mean_sum is None else sums.mean_sum + total


def _add_samples_(sums: _LayerSums, x: torch.Tensor, y: torch.Tensor, sample_tokens: int,
                  generator: torch.Generator) -> None:
    """Keep ``sample_tokens`` random tokens X_i^s of every image of the batch (all of them where it has fewer) and
    their eq. (5) weight 1 / ||X_i^s W||^2 from the same tokens' bias-free outputs ``y``: the SGD solver's
    mini-batches of eq. (10), on the host in float32."""
    batch, tokens = x.shape[0], x.shape[1]
    take = min(sample_tokens, tokens)
    idx = torch.rand(batch, tokens, generator=generator).argsort(dim=1)[:, :take].to(x.device)
    xs_sub = torch.gather(x, 1, idx[:, :, None].expand(-1, -1, x.shape[2])).float()
    ys_sub = torch.gather(y, 1, idx[:, :, None].expand(-1, -1, y.shape[2])).double()
    w_sub = image_weights(ys_sub.pow(2).sum(dim=(1, 2)))
    sums.samples.append(xs_sub.cpu())
    sums.sample_weights.append(w_sub.float().cpu())


def _on_forward(acc: _Accumulator, name: str, module: nn.Linear, inputs: tuple[torch.Tensor, ...],
                output: torch.Tensor) -> None:
    """Forward hook of layer ``name``: adds the batch's images X_i to its sums with eq. (5)'s weights
    w_i = 1 / ||X_i W||_F^2, taken from the output (:func:`output_energies`; 1 with ``weighting="token"``): H, or on
    the output side W^T H W and tr(H); and, where asked, sum_t ||x_t||^4, the mean input and the sampled tokens."""
    sums, settings, batch = acc.sums[name], acc.settings, acc.batch
    k = module.in_features
    x = inputs[0].detach().reshape(batch, -1, k)
    energy, y = output_energies(output.detach(), module.bias, batch, acc.scratch)
    weights = image_weights(energy) if settings.weighting == "image" else torch.ones_like(energy)
    sums.rows += x.shape[0] * x.shape[1]
    if sums.fourth is not None:
        sums.fourth += x.reshape(-1, k).double().pow(2).sum(1).pow(2).sum()
    if sums.on_output:  # tr(H) = sum_i w_i ||X_i||^2
        sums.trace += float(weights @ squared_norms(x))
    _add_weighted_gram_(acc, name, sums, x, y if sums.on_output else x, weights)
    sums.images += batch
    if settings.want_mean:
        _add_mean_(name, sums, x)
    if settings.sample_tokens:
        _add_samples_(sums, x, y, settings.sample_tokens, acc.generator)


def _run_pass(model: nn.Module, layers: dict[str, nn.Linear], batches: Iterable, num_images: int,
              acc: _Accumulator, device: torch.device, progress: bool) -> None:
    """The forward pass over the calibration images, in eval mode with :func:`_on_forward` on every layer; the hooks
    fill ``acc``. A layer still unreached after the first batch fails the pass then (:func:`unreached`)."""
    with hooked_in_eval(model, layers, lambda name: partial(_on_forward, acc, name)), \
            progress_bar(total=num_images, desc="calibration", unit="img", enabled=progress) as bar:
        for index, images in enumerate(iter_calibration_images(batches, num_images)):
            acc.batch = images.shape[0]
            model(images.to(device))
            if index == 0:
                unreached(name for name, sums in acc.sums.items() if sums.images == 0)
            bar.update(images.shape[0])


def _layer_stats(layer: nn.Linear, sums: _LayerSums, settings: _PassSettings) -> LayerStats:
    """One layer's :class:`LayerStats` from its sums: the symmetric H, or on the output side W^T H W with tr(H) and
    W (``gram`` None: built from them on first read, :func:`range_gram`); X_rep = sum_i X_i / N and the sampled
    tokens where asked."""
    n = sums.images
    gram = symmetrize_upper(sums.gram)
    output_gram = weight = None
    if sums.on_output:  # H is built from these on first use (LayerStats.gram)
        output_gram, weight, gram = gram, layer.weight.detach().T, None
    return LayerStats(
        gram=gram,
        num_images=n,
        mean_input=sums.mean_sum / n if settings.want_mean else None,
        samples=torch.cat(sums.samples) if settings.sample_tokens else None,
        sample_weights=torch.cat(sums.sample_weights) if settings.sample_tokens else None,
        output_gram=output_gram,
        input_trace=sums.trace,
        range_weight=weight,
        fourth_moment=float(sums.fourth) if sums.fourth is not None else None,
        rows=sums.rows,
    )


@torch.no_grad()
def collect_statistics(
    model: nn.Module,
    layers: dict[str, nn.Linear],
    batches: Iterable,
    num_images: int,
    *,
    want_mean: bool = False,
    sample_tokens: int = 0,
    device: torch.device | None = None,
    progress: bool = True,
    seed: int = 0,
    gram_precision: str = "float64",
    gram_space: str = "input",
    weighting: str = "image",
    fourth_moment: bool = False,
) -> dict[str, LayerStats]:
    """Run the model once over the calibration images and return each layer's statistics.

    Per batch and layer the hook (:func:`_on_forward`) takes the per-image weights w_i from the output and adds the
    batch's X^T diag(w) X to the layer's float64 running sum with one symmetric product, checked for NaN or inf
    through its diagonal at no per-element cost (:func:`_add_weighted_gram_`).

    Args:
        model: the dense model; put in eval mode for the pass and restored afterwards.
        layers: name -> ``nn.Linear`` whose inputs are recorded.
        batches: iterable of calibration batches.
        num_images: how many images to use.
        want_mean: also accumulate the mean input X_rep (for ``decomposition="mean"``).
        sample_tokens: keep this many random tokens of every image (for the SGD solver); 0 keeps none.
        device: where to run; default, where the model's parameters are.
        progress: show a progress bar.
        seed: seed of the token sampling.
        gram_precision: dtype name of each batch's X^T X product ("float64" or "float32"); the running sum is
            float64 regardless.
        gram_space: "input" (H from every layer's inputs) or "auto" (layers with fewer outputs than inputs
            accumulate the output Gram W^T H W and return :func:`range_gram`; see the module docstring for what
            that is exact for).
        weighting: "image" (eq. 5: image i weighs w_i = 1 / ||X_i W||^2) or "token" (every token weighs 1: the plain
            Gram sum_t x x^T that SVD-LLM and FLAR-SVD whiten with).
        fourth_moment: also sum ||x_t||^4 over the tokens (``LayerStats.fourth_moment``; Ledoit-Wolf shrinkage needs
            it) and count them (``LayerStats.rows``).

    Raises:
        ValueError: bad calibration data (see :func:`iter_calibration_images`), NaN or inf activations reaching a
            layer, a float32 product that overflows, or a layer the forward pass never reached.
    """
    product_dtype = _check_options(gram_precision, gram_space, weighting)
    settings = _PassSettings(product_dtype, gram_precision, weighting, want_mean, sample_tokens, fourth_moment)
    device = device or next(model.parameters()).device
    acc = _new_accumulator(layers, gram_space, settings, device, seed)
    _run_pass(model, layers, batches, num_images, acc, device, progress)
    return {name: _layer_stats(layer, acc.sums[name], settings) for name, layer in layers.items()}
