"""Layer-wise error compensation, Section 3.3: fit Z to the residual R = W - U V^T on calibration inputs (eq. 10).

Eq. (10) is a weighted least-squares problem: sum_i w_i ||X_i (Z - R)||_F^2 = tr((Z - R)^T H (Z - R)) with the same
weighted Gram matrix H as eq. (5). So:
  * low-rank Z = G Y^T: the best rank-q fit is ``A^-1 SVD_q(A R)`` with A^T A = H (exact);
  * Z on a fixed support (sparse, diagonal band, whole rows): for every output column j the optimal values on its
    support S_j are ``H[S_j, S_j]^{-1} (H R)[S_j, j]`` (exact for that support; the support itself is chosen by the
    single-entry error reduction ``(H R)_ij^2 / H_ii``, a greedy heuristic).
The paper's solver, mini-batch gradient descent on eq. (10) with every layer independent, is :func:`fit_sgd`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from lowrank_vit.core.common import Registry, check_count, check_number
from lowrank_vit.core.decompose import Decomposition, Whitening, truncated_svd
from lowrank_vit.core.progress import progress_bar
from lowrank_vit.nn.factorized import Z_MODULES, LowRankZ, RowSparseZ, SparseZ, ZModule


def z_param_count(kind: str, in_features: int, out_features: int, z_fraction: float, rank_multiple: int = 1) -> int:
    """Parameters a Z of ``kind`` holds for a (k, m) layer given its budget fraction; 0 for "none"."""
    return get_z_kind(kind).param_count(in_features, out_features, z_fraction * in_features * out_features,
                                        rank_multiple)


def z_spec(kind: str, in_features: int, out_features: int, z_params: int) -> dict[str, Any] | None:
    """The spec (as :func:`lowrank_vit.nn.factorized.build_z` reads it) of a Z of ``kind`` holding ``z_params``
    parameters; ``None`` for "none"."""
    return get_z_kind(kind).spec(in_features, out_features, z_params)


def diagonal_support(in_features: int, out_features: int, num_diagonals: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows and columns of a band of ``num_diagonals`` diagonals of a (k, m) matrix, wrapped modulo k:
    column j holds rows (j + o) mod k for o = 0..b-1 (the main diagonal is o = 0)."""
    cols = torch.arange(out_features).repeat(num_diagonals)
    offsets = torch.arange(num_diagonals).repeat_interleave(out_features)
    return (cols + offsets) % in_features, cols


def _solve_columns(H: torch.Tensor, HR: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Optimal values on a fixed support: for every column j, ``H[S_j, S_j] v = (H R)[S_j, j]``.

    Columns are solved in batches padded to the largest support; padding rows get an identity system.
    """
    order = torch.argsort(cols, stable=True)
    rows_sorted, cols_sorted = rows[order], cols[order]
    counts = torch.bincount(cols_sorted, minlength=HR.shape[1])
    starts = torch.cumsum(counts, 0) - counts
    values_sorted = torch.zeros(rows.numel(), dtype=torch.float64, device=H.device)
    active = torch.nonzero(counts).flatten()
    chunk = 256
    for begin in range(0, active.numel(), chunk):
        cols_chunk = active[begin: begin + chunk]
        width = int(counts[cols_chunk].max())
        slot = torch.arange(width, device=H.device)
        valid = slot[None, :] < counts[cols_chunk, None]
        position = (starts[cols_chunk, None] + slot[None, :]).clamp_max(rows.numel() - 1)
        idx = torch.where(valid, rows_sorted[position], torch.zeros_like(position))
        A = H[idx[:, :, None], idx[:, None, :]]
        mask2 = valid[:, :, None] & valid[:, None, :]
        eye = torch.eye(width, dtype=torch.float64, device=H.device).expand_as(A)
        A = torch.where(mask2, A, eye)
        b = torch.where(valid, HR[idx, cols_chunk[:, None]], torch.zeros_like(idx, dtype=torch.float64))
        sol = torch.linalg.solve(A, b[:, :, None])[:, :, 0]
        values_sorted[position[valid]] = sol[valid]
    values = torch.empty_like(values_sorted)
    values[order] = values_sorted
    return values


@dataclass
class CompensationProblem:
    """Everything eq. (10) needs for one layer."""

    residual: torch.Tensor
    """R = W - U V^T, (k, m) float64."""
    white: Whitening
    """The damped weighted Gram matrix H and its square root."""


def closed_form_z(kind: str, problem: CompensationProblem, z_params: int) -> nn.Module:
    """The exact (for low-rank) or support-optimal (for sparse kinds) Z of eq. (10) within ``z_params`` parameters."""
    return get_z_kind(kind).fit(problem, z_params)


class ZKind:
    """One kind of correction Z (Section 3.3, Table 1): how many parameters it takes from a layer's budget, the shape
    of its module, its closed-form fit to eq. (10) and the SGD solver's starting point. Subclasses set ``name`` and
    ``module`` (a :class:`lowrank_vit.nn.factorized.ZModule` registered for that name, which saves, loads, quantizes,
    folds and exports it) and are registered by :func:`register_z_kind`; ``CompressionConfig.compensation`` names
    one. "none" is one too (:class:`NoZ`): no module, no parameters, nothing to fit."""

    name: ClassVar[str]
    module: ClassVar[type[ZModule] | None]
    fitted: ClassVar[bool] = True
    """Whether the compression fits a Z of this kind (False only for "none")."""
    is_more_rank: ClassVar[bool] = False
    """Fitted after an exact SVD in the same metric, this Z is that SVD's next singular directions: exactly more
    rank (so it is read off the decomposition, :func:`svd_tail_z`, and needs H only through W)."""

    @property
    def folds(self) -> bool:
        """Whether a layer with this Z deploys as one factored product (no Z, or one whose module folds into U and V
        as more columns): what a latency table times."""
        return self.module is None or self.module.lowrank_factors is not ZModule.lowrank_factors

    def spec(self, k: int, m: int, z_params: int) -> dict[str, Any] | None:
        """The module's spec as :func:`lowrank_vit.nn.factorized.build_z` reads it."""
        return {"kind": self.name, **self.shape(k, m, z_params)}

    def param_count(self, k: int, m: int, budget: float, rank_multiple: int) -> int:
        """Parameters actually held given a budget of ``budget`` (= z_fraction k m)."""
        raise NotImplementedError

    def shape(self, k: int, m: int, z_params: int) -> dict[str, int]:
        """The size fields of the module's spec (beside "kind")."""
        raise NotImplementedError

    def fit(self, problem: CompensationProblem, z_params: int) -> nn.Module:
        """The Z of eq. (10) within ``z_params`` parameters."""
        raise NotImplementedError

    def sgd_start(self, problem: CompensationProblem, z_params: int, generator: torch.Generator) -> nn.Module:
        """Starting point of the SGD solver: by default the closed form's support with zero values."""
        z = self.fit(problem, z_params)
        with torch.no_grad():
            z.values.zero_()
        return z


Z_KINDS: Registry[ZKind] = Registry("compensation kind")
get_z_kind = Z_KINDS.lookup


def register_z_kind(cls: type[ZKind]) -> type[ZKind]:
    """Class decorator: ``CompressionConfig(compensation=cls.name)``. Its module must be the one registered for that
    name (:func:`lowrank_vit.nn.factorized.register_z_module`), or a saved model could not be loaded again."""
    module = getattr(cls, "module", None)
    if cls.name not in Z_KINDS and cls.fitted and Z_MODULES.get(cls.name) is not module:
        raise ValueError(f"compensation kind {cls.name!r}: register its module {getattr(module, '__name__', None)} "
                         f"with lowrank_vit.nn.factorized.register_z_module (kinds = ({cls.name!r},)) first")
    return Z_KINDS.register(cls)


@register_z_kind
class NoZ(ZKind):
    """No correction: W becomes U V^T alone (the default recipe's, vanilla SVD's and every peer's choice). As more
    rank it is trivially exact: it needs nothing of H beyond W either."""

    name = "none"
    module = None
    fitted = False
    is_more_rank = True

    def param_count(self, k, m, budget, rank_multiple):
        return 0

    def spec(self, k, m, z_params):
        return None

    def fit(self, problem, z_params):
        raise ValueError('compensation "none" fits no Z')

    def sgd_start(self, problem, z_params, generator):
        raise ValueError('compensation "none" fits no Z')


@register_z_kind
class LowRankKind(ZKind):
    """Z = G Y^T of rank q: the best rank-q fit of eq. (10) is ``A^-1 SVD_q(A R)`` with A^T A = H (exact)."""

    name = "lowrank"
    module = LowRankZ
    is_more_rank = True

    def param_count(self, k, m, budget, rank_multiple):
        rank = max(1, int(budget // (k + m)))
        if rank >= rank_multiple:  # nearest multiple (halves up), so that r + q stays aligned when Z is folded
            rank = rank_multiple * ((2 * rank + rank_multiple) // (2 * rank_multiple))
        return rank * (k + m)

    def shape(self, k, m, z_params):
        return {"rank": z_params // (k + m)}

    def fit(self, problem, z_params):
        k, m = problem.residual.shape
        q = z_params // (k + m)
        P, s, Rv = truncated_svd(problem.white.apply(problem.residual))
        root = s[:q].sqrt()
        return LowRankZ.from_factors(problem.white.solve(P[:, :q]) * root, Rv[:, :q] * root)

    def sgd_start(self, problem, z_params, generator):
        # a small random G and Y = 0: from G = Y = 0 both gradients (eqs. 11-12) vanish
        k, m = problem.residual.shape
        z = LowRankZ(k, m, z_params // (k + m))
        with torch.no_grad():
            z.G.copy_(torch.randn(k, z.rank, generator=generator, dtype=torch.float64) / math.sqrt(k))
        return z


def _gains(problem: CompensationProblem) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """H, H R and each single entry's error reduction ``(H R)_ij^2 / H_ii`` (how the sparse supports are chosen)."""
    H = problem.white.gram
    HR = H @ problem.residual
    return H, HR, HR.pow(2) / torch.diagonal(H).clamp_min(torch.finfo(torch.float64).tiny)[:, None]


class _EntrySupport(ZKind):
    """Z on a fixed set of (row, column) entries, each column's values the exact fit ``H[S_j, S_j]^-1 (H R)[S_j, j]``
    on its support S_j. Subclasses choose the support."""

    module = SparseZ

    def shape(self, k, m, z_params):
        return {"nnz": z_params}

    def support(self, gain: torch.Tensor, z_params: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def fit(self, problem, z_params):
        k, m = problem.residual.shape
        H, HR, gain = _gains(problem)
        rows, cols = self.support(gain, z_params)
        z = SparseZ(k, m, rows.numel(), kind=self.name)
        with torch.no_grad():
            z.rows.copy_(rows)
            z.cols.copy_(cols)
            z.values.copy_(_solve_columns(H, HR, rows, cols))
        return z


@register_z_kind
class DiagonalKind(_EntrySupport):
    """A band of b wrapped diagonals, one entry per output column each (:func:`diagonal_support`)."""

    name = "diagonal"

    def param_count(self, k, m, budget, rank_multiple):
        return max(1, int(budget // m)) * m

    def support(self, gain, z_params):
        k, m = gain.shape
        rows, cols = diagonal_support(k, m, z_params // m)
        return rows.to(gain.device), cols.to(gain.device)


@register_z_kind
class SparseKind(_EntrySupport):
    """Unstructured: the entries with the largest single-entry error reduction (a greedy heuristic)."""

    name = "sparse"

    def param_count(self, k, m, budget, rank_multiple):
        return max(1, int(budget))

    def support(self, gain, z_params):
        flat = torch.topk(gain.flatten(), z_params).indices
        return flat // gain.shape[1], flat % gain.shape[1]


@register_z_kind
class StructuredKind(ZKind):
    """Whole input rows of Z: the rows with the largest summed error reduction, fitted jointly."""

    name = "structured"
    module = RowSparseZ

    def param_count(self, k, m, budget, rank_multiple):
        return max(1, int(budget // m)) * m

    def shape(self, k, m, z_params):
        return {"rows": z_params // m}

    def fit(self, problem, z_params):
        k, m = problem.residual.shape
        H, HR, gain = _gains(problem)
        rows = torch.topk(gain.sum(dim=1), z_params // m).indices.sort().values
        z = RowSparseZ(k, m, rows.numel())
        with torch.no_grad():
            z.rows.copy_(rows)
            z.values.copy_(torch.linalg.solve(H[rows][:, rows], HR[rows]))
        return z


def svd_tail_z(decomposition: Decomposition, rank: int, z_params: int) -> LowRankZ:
    """``closed_form_z("lowrank", ...)`` without a second SVD, for a layer whose U V^T is the rank-``rank``
    truncation of ``decomposition`` = :func:`whitened_svd` under the same whitening A: then A R = A W - A U V^T is
    exactly that SVD's tail, so the best rank-q Z of eq. (10) is its next q singular triplets."""
    k, m = decomposition.left.shape[0], decomposition.right.shape[0]
    q = z_params // (k + m)
    return LowRankZ.from_factors(*decomposition.factors(q, start=rank))


def init_z_for_sgd(kind: str, problem: CompensationProblem, z_params: int, generator: torch.Generator) -> nn.Module:
    """Starting point of the SGD solver: the support of the closed form with zero values for the sparse kinds;
    for G Y^T a small random G and Y = 0, since from G = Y = 0 both gradients (eqs. 11-12) vanish."""
    return get_z_kind(kind).sgd_start(problem, z_params, generator)


@dataclass(frozen=True)
class SgdSettings:
    """The SGD solver's settings (``CompressionConfig.solver="sgd"``; Section 4.1's values)."""

    sgd_lr: float = 1e-3
    """Learning rate (Adam)."""
    sgd_iterations: int = 2000
    """Steps."""
    sgd_batch_size: int = 64
    """Images per mini-batch."""
    sgd_tokens_per_image: int = 16
    """Tokens kept per image (sampled at random) for the stored activations; bounds the solver's memory."""

    def __post_init__(self) -> None:
        check_number("sgd_lr", self.sgd_lr, "> 0")
        for name in ("sgd_iterations", "sgd_batch_size", "sgd_tokens_per_image"):
            check_count(name, getattr(self, name))


SOLVERS: dict[str, type | None] = {"closed_form": None, "sgd": SgdSettings}
"""How Z is fitted (``CompressionConfig.solver``), each with its own settings class (None: it has none)."""


@dataclass
class SGDTask:
    """One layer's share of the parallel SGD fit: Z, its inputs X_i (sampled tokens) and targets X_i R."""

    z: nn.Module
    inputs: torch.Tensor
    """(N, s, k) float32."""
    targets: torch.Tensor
    """(N, s, m) float32: X_i (W - U V^T)."""
    weights: torch.Tensor
    """(N,) float32: 1 / ||X_i W||^2 over the same tokens (eq. 10's normalization)."""


def eq10_loss(z: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Eq. (10) on a mini-batch: mean_i ||X_i Z - X_i R||_F^2 / ||X_i W||_F^2."""
    err = (z(inputs) - targets).pow(2).sum(dim=(1, 2))
    return (err * weights).mean()


class LayerIndexSampler:
    """The mini-batches of the SGD solver: every step, one draw of image indices (with replacement) per layer, in
    layer order, from one seeded generator.

    Shared by :func:`fit_sgd` and the Lightning solver (``lowrank_vit.stages.lightning_compensation``), so both see the
    same mini-batches. Every layer's indices are drawn even where a caller trains only some layers (one DDP rank's
    share), so the batches of a layer do not depend on how layers are split across processes.
    """

    def __init__(self, sizes: dict[str, int], batch_size: int, seed: int = 0) -> None:
        """Args:
            sizes: layer name -> number of stored calibration images of that layer (N of eq. 10).
            batch_size: images per mini-batch (the paper: 64); capped at each layer's N.
            seed: seed of the generator.
        """
        self.sizes = dict(sizes)
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self) -> dict[str, torch.Tensor]:
        """One step's indices: layer name -> (min(batch_size, N),) int64 CPU tensor."""
        return {name: torch.randint(n, (min(self.batch_size, n),), generator=self.generator)
                for name, n in self.sizes.items()}


def layer_optimizer(z: nn.Module, lr: float) -> torch.optim.Optimizer:
    """One layer's own optimizer (Adam at ``lr``, Section 4.1): no state is shared between layers."""
    return torch.optim.Adam(z.parameters(), lr=lr)


def sgd_layer_step(z: nn.Module, optimizer: Any, inputs: torch.Tensor, targets: torch.Tensor,
                   weights: torch.Tensor, backward: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """One layer's update of the SGD solver: eq. (10) on the mini-batch, its gradient (eqs. 11-12 by autograd),
    one step of the layer's own optimizer. Touches nothing but ``z`` and ``optimizer``.

    Args:
        z: the layer's Z module.
        optimizer: its optimizer (a torch optimizer or Lightning's wrapper of one).
        inputs, targets, weights: the mini-batch of the layer's :class:`SGDTask` tensors.
        backward: how to back-propagate the loss (Lightning passes ``manual_backward``); default ``loss.backward()``.

    Returns:
        The detached mini-batch loss (before the step).
    """
    loss = eq10_loss(z, inputs, targets, weights)
    optimizer.zero_grad(set_to_none=True)
    if backward is None:
        loss.backward()
    else:
        backward(loss)
    optimizer.step()
    return loss.detach()


def fit_sgd(tasks: dict[str, SGDTask], *, lr: float, iterations: int, batch_size: int, seed: int = 0,
            progress: bool = True) -> dict[str, list[float]]:
    """Mini-batch gradient descent on eq. (10) for every layer at once (Section 3.3, 4.1), in this process.

    Each layer has its own Adam optimizer and its own loss; no layer's update depends on another's, so the loop
    over layers inside a step is embarrassingly parallel. The mini-batches, optimizers and per-layer step are the
    ones of :class:`lowrank_vit.stages.lightning_compensation.LayerwiseCompensation` (the same functions), which runs
    this under a Lightning Trainer (logging, DDP with layers split across ranks). Returns each layer's loss history
    (one value a step).
    """
    sampler = LayerIndexSampler({name: task.inputs.shape[0] for name, task in tasks.items()}, batch_size, seed)
    optimizers = {name: layer_optimizer(task.z, lr) for name, task in tasks.items()}
    history: dict[str, list[float]] = {name: [] for name in tasks}
    with progress_bar(total=iterations, desc="compensation (sgd)", unit="step", enabled=progress) as bar:
        for _ in range(iterations):
            indices = sampler()
            for name, task in tasks.items():
                idx = indices[name].to(task.weights.device)
                loss = sgd_layer_step(task.z, optimizers[name], task.inputs[idx], task.targets[idx],
                                      task.weights[idx]).item()
                if not math.isfinite(loss):
                    raise FloatingPointError(f"the SGD solver diverged on layer {name} (loss {loss})")
                history[name].append(loss)
            bar.update(1)
    return history
