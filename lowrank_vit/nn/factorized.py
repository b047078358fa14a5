"""The factorized linear layer ``y = (x U) V^T + Z(x) + b`` and the modules of the correction Z (Table 1).

Conventions follow the paper: a dense layer computes ``x W`` with W of shape (k, m) = (in, out), i.e.
``W = linear.weight.T``. U is (k, r), V is (m, r). U V^T is never materialized in ``forward`` (Appendix A): the
input is multiplied by U first, then by V^T, which costs n(k+m)r multiplications instead of nkm.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn


class ZModule(nn.Module):
    """What every stored form of a correction Z tells the rest of the library, so that saving, loading, quantizing,
    size accounting, folding and export need no table of their own: the spec kinds it computes, the size fields of
    its spec, which parameters 8-bit PTQ quantizes along which channel axis (eq. 16), and how it folds and exports.
    Buffers hold indices (counted as 32-bit in Table 4's accounting). A new form subclasses this and is registered
    by :func:`register_z_module`; :class:`lowrank_vit.methods.compensate.ZKind` pairs a kind with how it is fitted."""

    kinds: ClassVar[tuple[str, ...]] = ()
    """The ``kind`` strings of the specs this module rebuilds (``spec()["kind"]``)."""
    spec_fields: ClassVar[tuple[str, ...]] = ()
    """The sizes its ``spec()`` writes beside "kind", each a positive integer (a fitted Z is never empty)."""
    quantize_axes: ClassVar[dict[str, int | None]] = {}
    """Parameter name -> the channel axis ``quantize_`` scales along (None: one scale for the tensor)."""

    @classmethod
    def from_spec(cls, in_features: int, out_features: int, spec: dict[str, Any]) -> ZModule:
        """An empty module of the spec's sizes (its values come from the checkpoint)."""
        raise NotImplementedError

    def spec(self) -> dict[str, Any]:
        raise NotImplementedError

    def dense(self) -> torch.Tensor:
        """Z as its (in, out) matrix, for analysis and export."""
        raise NotImplementedError

    def lowrank_factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(G, Y) when Z = G Y^T, which :func:`lowrank_vit.io.surgery.fold_lowrank_z_` appends to U and V; else None."""
        return None

    def export_form(self) -> nn.Module:
        """The module the ONNX exporter writes in its place: itself, or an exact equivalent in ONNX's operators."""
        return self


Z_MODULES: dict[str, type[ZModule]] = {}
"""Spec kind -> the module that computes it (each rebuilds itself, empty, with ``from_spec``)."""


def register_z_module(cls: type[ZModule]) -> type[ZModule]:
    """Class decorator: ``cls`` rebuilds the specs of each of its ``kinds``."""
    for kind in cls.kinds:
        if Z_MODULES.get(kind, cls) is not cls:
            raise ValueError(f"Z kind {kind!r} already has a module: {Z_MODULES[kind].__name__}")
        Z_MODULES[kind] = cls
    return cls


@register_z_module
class LowRankZ(ZModule):
    """Z = G Y^T with G (k, q) and Y (m, q): the paper's choice (Section 3.3)."""

    kind = "lowrank"
    kinds = ("lowrank",)
    spec_fields = ("rank",)
    quantize_axes = {"G": 1, "Y": 0}  # G (k, q): channel = output of x G = column; Y (m, q): output row

    def __init__(self, in_features: int, out_features: int, rank: int) -> None:
        super().__init__()
        self.G = nn.Parameter(torch.zeros(in_features, rank))
        self.Y = nn.Parameter(torch.zeros(out_features, rank))

    @classmethod
    def from_factors(cls, G: torch.Tensor, Y: torch.Tensor) -> LowRankZ:
        """Z = G Y^T from given factors (copied, in the module's float32)."""
        z = cls(G.shape[0], Y.shape[0], G.shape[1])
        with torch.no_grad():
            z.G.copy_(G)
            z.Y.copy_(Y)
        return z

    @classmethod
    def from_spec(cls, in_features: int, out_features: int, spec: dict[str, Any]) -> LowRankZ:
        return cls(in_features, out_features, int(spec["rank"]))

    @property
    def rank(self) -> int:
        return self.G.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.G) @ self.Y.T

    def dense(self) -> torch.Tensor:
        return self.G @ self.Y.T

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "rank": self.rank}

    def lowrank_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.G, self.Y

    def extra_repr(self) -> str:
        return f"rank={self.rank}"


class DenseZ(nn.Module):
    """A Z held as its dense (in, out) matrix: ``Z(x) = x Z``. The export form of :class:`SparseZ` (ONNX has no
    sparse product); never saved, so not a registered kind."""

    def __init__(self, z: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(z.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.to(self.weight.dtype) @ self.weight).to(x.dtype)


@register_z_module
class SparseZ(ZModule):
    """Z with a fixed support of (row, column) entries: "sparse" (unstructured) and "diagonal" (a band of diagonals).

    The support is stored as index buffers so that it is saved beside the values; the product is a sparse-dense
    matmul, so its cost is proportional to the number of stored entries.
    """

    kinds = ("sparse", "diagonal")
    spec_fields = ("nnz",)
    quantize_axes = {"values": None}  # entries of no common channel: one scale

    def __init__(self, in_features: int, out_features: int, nnz: int, kind: str = "sparse") -> None:
        super().__init__()
        self.kind = kind
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("rows", torch.zeros(nnz, dtype=torch.long))
        self.register_buffer("cols", torch.zeros(nnz, dtype=torch.long))
        self.values = nn.Parameter(torch.zeros(nnz))

    @classmethod
    def from_spec(cls, in_features: int, out_features: int, spec: dict[str, Any]) -> SparseZ:
        return cls(in_features, out_features, int(spec["nnz"]), kind=spec["kind"])

    @property
    def nnz(self) -> int:
        return self.values.numel()

    def _transposed(self) -> torch.Tensor:
        # Z^T as an (m, k) sparse matrix, so that y^T = Z^T x^T is a sparse @ dense product.
        indices = torch.stack([self.cols, self.rows])
        size = (self.out_features, self.in_features)
        return torch.sparse_coo_tensor(indices, self.values, size, is_coalesced=False,
                                       check_invariants=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        out = torch.sparse.mm(self._transposed(), flat.T.to(self.values.dtype)).T
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def dense(self) -> torch.Tensor:
        z = torch.zeros(self.in_features, self.out_features, dtype=self.values.dtype, device=self.values.device)
        return z.index_put((self.rows, self.cols), self.values, accumulate=True)

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "nnz": self.nnz}

    def export_form(self) -> nn.Module:
        return DenseZ(self.dense())

    def extra_repr(self) -> str:
        return f"kind={self.kind}, nnz={self.nnz}"


@register_z_module
class RowSparseZ(ZModule):
    """"structured": Z is non-zero only on a set of whole rows (input features), ``Z(x) = x[..., rows] @ values``."""

    kind = "structured"
    kinds = ("structured",)
    spec_fields = ("rows",)
    quantize_axes = {"values": 1}  # (rows, m): channel = output column

    def __init__(self, in_features: int, out_features: int, num_rows: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.register_buffer("rows", torch.zeros(num_rows, dtype=torch.long))
        self.values = nn.Parameter(torch.zeros(num_rows, out_features))

    @classmethod
    def from_spec(cls, in_features: int, out_features: int, spec: dict[str, Any]) -> RowSparseZ:
        return cls(in_features, out_features, int(spec["rows"]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.index_select(-1, self.rows) @ self.values

    def dense(self) -> torch.Tensor:
        z = torch.zeros(self.in_features, self.values.shape[1], dtype=self.values.dtype, device=self.values.device)
        return z.index_copy(0, self.rows, self.values)

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "rows": self.rows.numel()}

    def extra_repr(self) -> str:
        return f"rows={self.rows.numel()}"


def build_z(in_features: int, out_features: int, spec: dict[str, Any] | None) -> nn.Module | None:
    """An empty Z module from its spec (as written by ``spec()``); ``None`` for no compensation."""
    if spec is None:
        return None
    module = Z_MODULES.get(spec.get("kind"))
    if module is None:
        raise ValueError(f"unknown compensation kind {spec.get('kind')!r} in layer spec")
    return module.from_spec(in_features, out_features, spec)


class FactorizedLinear(nn.Module):
    """``y = (x U) V^T + Z(x) + b``: the drop-in replacement of a block's ``nn.Linear``."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 z: nn.Module | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.U = nn.Parameter(torch.zeros(in_features, rank))
        self.V = nn.Parameter(torch.zeros(out_features, rank))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.z = z

    @property
    def rank(self) -> int:
        return self.U.shape[1]

    @classmethod
    def from_factors(cls, U: torch.Tensor, V: torch.Tensor, bias: torch.Tensor | None,
                     z: nn.Module | None = None) -> FactorizedLinear:
        layer = cls(U.shape[0], V.shape[0], U.shape[1], bias=bias is not None, z=z)
        with torch.no_grad():
            layer.U.copy_(U)
            layer.V.copy_(V)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer.to(U.device)

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> FactorizedLinear:
        k, m = int(spec["in_features"]), int(spec["out_features"])
        return cls(k, m, int(spec["rank"]), bias=bool(spec["bias"]), z=build_z(k, m, spec.get("z")))

    def spec(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "rank": self.rank,
                "bias": self.bias is not None, "z": None if self.z is None else self.z.spec()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.linear(x @ self.U, self.V, self.bias)
        if self.z is not None:
            y = y + self.z(x)
        return y

    def dense_weight(self) -> torch.Tensor:
        """U V^T + Z as a (k, m) matrix, for analysis only (inference never builds it)."""
        w = self.U @ self.V.T
        return w if self.z is None else w + self.z.dense().to(w.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, " \
               f"bias={self.bias is not None}"
