"""The factorized linear layer ``y = (x U) V^T + Z(x) + b`` and the four kinds of correction Z (Table 1).

Conventions follow the paper: a dense layer computes ``x W`` with W of shape (k, m) = (in, out), i.e.
``W = linear.weight.T``. U is (k, r), V is (m, r). U V^T is never materialized in ``forward`` (Appendix A): the
input is multiplied by U first, then by V^T, which costs n(k+m)r multiplications instead of nkm.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class LowRankZ(nn.Module):
    """Z = G Y^T with G (k, q) and Y (m, q): the paper's choice (Section 3.3)."""

    kind = "lowrank"

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

    def extra_repr(self) -> str:
        return f"rank={self.rank}"


class SparseZ(nn.Module):
    """Z with a fixed support of (row, column) entries: "sparse" (unstructured) and "diagonal" (a band of diagonals).

    The support is stored as index buffers so that it is saved beside the values; the product is a sparse-dense
    matmul, so its cost is proportional to the number of stored entries.
    """

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

    def extra_repr(self) -> str:
        return f"kind={self.kind}, nnz={self.nnz}"


class RowSparseZ(nn.Module):
    """"structured": Z is non-zero only on a set of whole rows (input features), ``Z(x) = x[..., rows] @ values``."""

    kind = "structured"

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


Z_MODULES: dict[str, type[nn.Module]] = {"lowrank": LowRankZ, "sparse": SparseZ, "diagonal": SparseZ,
                                          "structured": RowSparseZ}
"""Spec kind -> the module that computes it (each rebuilds itself, empty, with ``from_spec``)."""


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
