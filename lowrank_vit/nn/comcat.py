"""COMCAT (Xiao et al. ICML 2023, "COMCAT: Towards Efficient Compression and Customization of Attention-Based Vision
Models", arXiv 2305.17235): head-level low-rank factorization of multi-head attention.

The insight (their Sec. 3): head h's scores and output depend on its four projections only through two products,

    scores_h = softmax(x W_Q^h (W_K^h)^T x^T * scale),     out = sum_h scores_h x (W_V^h W_O^h),

each a d x d matrix of rank <= head_dim. Factorizing the *products* (instead of W_Q, W_K, W_V, W_O one by one)
keeps what attention computes and reaches lower ranks for the same error. This module replaces a timm attention
module by :class:`FactorizedAttention`, which computes every head from rank-r factors of its two products:

    q~_h = x A_h + a_h,  k~_h = x B_h         (scale * [W_Q^h; b_Q^h] (W_K^h)^T = [A_h; a_h] B_h^T)
    v~_h = x C_h,        out = sum_h softmax(q~_h k~_h^T + bias) v~_h D_h^T + b_O'   (W_V^h W_O^h = C_h D_h^T)

Biases are handled exactly (at full rank the module reproduces the dense attention to rounding error):

* q and k biases: ``(x_i W_Q + b_Q)(x_j W_K + b_K)^T`` has four terms; ``x_i W_Q b_K^T`` and ``b_Q b_K^T`` are
  constant along the key axis j and cancel in the softmax, so b_K is dropped; ``b_Q W_K^T x_j`` is not constant and
  is kept by factorizing the *augmented* product ``[W_Q; b_Q] W_K^T`` ((d+1) x d): its last factor row a_h acts as a
  bias of the query-side projection (r extra parameters per head instead of d).
* v bias: softmax rows sum to 1, so ``softmax(.) (x W_V + 1 b_V) W_O = softmax(.) x W_V W_O + 1 b_V W_O``; b_V folds
  into the output bias, ``b_O' = b_O + W_O^T b_V``.
* Swin's relative position bias and shifted-window mask are added to the scores exactly as timm does.

Ranks: allocated per head and per product (``<attn>.qk.<h>`` and ``<attn>.vo.<h>`` units), by this package's
uniform or greedy allocation on each product's normalized singular-value spectrum (plain SVD, as COMCAT: the
factorization is data-free; their differentiable rank search is not implemented). A unit at full rank (the
allocator's "dense") is factorized at rank head_dim, which is exact and never costs more than the dense head.
Per unit, rank r costs ``r * (d + [qkv bias] + d_out)`` parameters (QK: ``r (2d + 1)`` with a q bias); every
attention module also keeps one output bias of d_out (when the dense module had a proj or qkv bias) and Swin's
relative position table, and drops qkv's 3 * d bias. The compensation Z of ``CompressionConfig.compensation`` applies
to the (plain-SVD) MLP layers only; head units have none. In reports, head units carry their energy loss but no
per-layer output error (NaN): eq. (5) is defined for single linear layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from lowrank_vit.core.allocate import LayerBudget
from lowrank_vit.core.decompose import Decomposition, truncated_svd

PRODUCTS = ("qk", "vo")


# ---------------------------------------------------------------------------------------------------------------------
# What can be factorized, and its parameter accounting


def _supported_types() -> tuple[type, ...]:
    from timm.layers import Attention
    from timm.models.swin_transformer import WindowAttention

    return Attention, WindowAttention


@dataclass(frozen=True)
class AttentionGeometry:
    """Shape of one dense attention module, as COMCAT factorizes it."""

    dim: int
    """Input width (qkv.in_features)."""
    out_dim: int
    """Output width (proj.out_features)."""
    num_heads: int
    head_dim: int
    scale: float
    qkv_bias: bool
    proj_bias: bool
    relative_position: bool
    """Swin-style relative position bias table (kept as is)."""

    @property
    def q_rows(self) -> int:
        """Rows of the QK product: the input width plus the augmented bias row."""
        return self.dim + int(self.qkv_bias)

    @property
    def out_bias(self) -> bool:
        return self.proj_bias or self.qkv_bias

    def unit_shape(self, product: str) -> tuple[int, int]:
        """(rows, columns) of one head's product: QK ((d + bias) x d), VO (d x d_out)."""
        return (self.q_rows, self.dim) if product == "qk" else (self.dim, self.out_dim)


def attention_geometry(attn: nn.Module, name: str = "attention") -> AttentionGeometry:
    """Read (and check) what COMCAT needs from a timm ``Attention`` or Swin ``WindowAttention``; a clear ValueError
    for anything it cannot reproduce exactly (q/k norms, a norm before proj, gates, other attention classes)."""
    if type(attn) not in _supported_types():
        raise ValueError(f"decomposition='comcat' supports timm's Attention (ViT, DeiT) and WindowAttention (Swin); "
                         f"{name} is a {type(attn).__name__}")
    qkv, proj = getattr(attn, "qkv", None), getattr(attn, "proj", None)
    if not isinstance(qkv, nn.Linear) or not isinstance(proj, nn.Linear):
        raise ValueError(f"{name}: decomposition='comcat' needs dense qkv and proj nn.Linear layers")
    for part in ("q_norm", "k_norm", "norm"):
        if not isinstance(getattr(attn, part, nn.Identity()), nn.Identity):
            raise ValueError(f"{name} has a {part} layer: its heads are not products of two linear maps, "
                             "decomposition='comcat' cannot factorize it")
    if getattr(attn, "gate", None) is not None:
        raise ValueError(f"{name} has a gated output: decomposition='comcat' cannot factorize it")
    heads = int(attn.num_heads)
    attn_dim, rest = divmod(qkv.out_features, 3)
    if rest or attn_dim % heads or proj.in_features != attn_dim:
        raise ValueError(f"{name}: qkv ({qkv.out_features}) and proj ({proj.in_features}) widths do not match "
                         f"{heads} heads")
    head_dim = attn_dim // heads
    relative = hasattr(attn, "relative_position_bias_table")
    return AttentionGeometry(qkv.in_features, proj.out_features, heads, head_dim,
                             float(getattr(attn, "scale", head_dim ** -0.5)), qkv.bias is not None,
                             proj.bias is not None, relative)


def unit_name(attention_name: str, product: str, head: int) -> str:
    """Allocation unit of one head's product, e.g. ``blocks.3.attn.qk.5``."""
    return f"{attention_name}.{product}.{head}"


@dataclass
class HeadBudget(LayerBudget):
    """One head's QK or VO product as an allocation unit. Rank r costs ``r * (rows + columns)``; the allocator's
    "dense" (rank ``None``) is the exact full-rank factorization, rank ``head_dim``."""

    head_dim: int = 1

    @property
    def dense_params(self) -> int:
        return self.head_dim * self.rank_step


def head_budgets(attention: dict[str, nn.Module], curves: dict[str, torch.Tensor] | None = None) -> list[HeadBudget]:
    """Allocation units of every head of every attention module (energy curves from ``curves`` by unit name)."""
    out = []
    for name, attn in attention.items():
        geom = attention_geometry(attn, name)
        for product in PRODUCTS:
            rows, cols = geom.unit_shape(product)
            for h in range(geom.num_heads):
                unit = unit_name(name, product, h)
                curve = curves[unit] if curves is not None else torch.zeros(1)
                out.append(HeadBudget(unit, rows, cols, 0, curve, head_dim=geom.head_dim))
    return out


def replaced_params(attn: nn.Module) -> int:
    """Parameters of the dense module that the factorized one replaces (qkv and proj, weights and biases)."""
    return sum(p.numel() for layer in (attn.qkv, attn.proj) for p in layer.parameters())


def fixed_params(attn: nn.Module) -> int:
    """Parameters of the factorized module outside every head unit: the output bias."""
    geom = attention_geometry(attn)
    return geom.out_dim if geom.out_bias else 0


def unit_rank(budget_rank: int | None, head_dim: int) -> int:
    """The rank a head is factorized at: the allocation's, or head_dim when it left the unit "dense"."""
    return head_dim if budget_rank is None else int(budget_rank)


# ---------------------------------------------------------------------------------------------------------------------
# The per-head products and their SVDs


def product_svd(left: torch.Tensor, right: torch.Tensor) -> Decomposition:
    """SVD of ``left @ right^T`` (left (a, d), right (b, d)) without forming it: two thin QRs and a d x d SVD,
    ``left right^T = Q_a (R_a R_b^T) Q_b^T``, O((a + b) d^2) instead of O(a b min(a, b)). Float64."""
    Qa, Ra = torch.linalg.qr(left.double())
    Qb, Rb = torch.linalg.qr(right.double())
    P, s, R = truncated_svd(Ra @ Rb.T)
    return Decomposition(Qa @ P, Qb @ R, s)


def head_products(attn: nn.Module, device: torch.device | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """For every head h, the two factors whose product COMCAT factorizes (float64, on ``device``):

    * ``qk.h``: ``scale * [W_Q^h; b_Q^h]`` ((d + bias) x hd) and ``W_K^h`` (d x hd), product = the score matrix;
    * ``vo.h``: ``W_V^h`` (d x hd) and ``(W_O^h)^T`` (d_out x hd), product = the head's value-output map.

    W^h are in the x W convention (in x out); timm lays qkv's outputs out as (3, heads, head_dim).
    """
    geom = attention_geometry(attn)
    weight = attn.qkv.weight.detach().to(device).double()  # (3 A, d)
    bias = attn.qkv.bias.detach().to(device).double() if geom.qkv_bias else None
    proj = attn.proj.weight.detach().to(device).double()  # (d_out, A)
    attn_dim, hd = geom.num_heads * geom.head_dim, geom.head_dim
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for h in range(geom.num_heads):
        rows = slice(h * hd, (h + 1) * hd)
        q = weight[rows].T
        if bias is not None:
            q = torch.cat([q, bias[rows][None, :]])  # the augmented row: b_Q W_K^T x_j survives the softmax
        k = weight[attn_dim:][rows].T
        v = weight[2 * attn_dim:][rows].T
        out[f"qk.{h}"] = (geom.scale * q, k)
        out[f"vo.{h}"] = (v, proj[:, rows])
    return out


def head_decompositions(attention: dict[str, nn.Module], device: torch.device | None = None
                        ) -> dict[str, Decomposition]:
    """Unit name -> SVD of that head's product, for every head of every attention module."""
    return {f"{name}.{key}": product_svd(*pair)
            for name, attn in attention.items() for key, pair in head_products(attn, device).items()}


def output_bias(attn: nn.Module) -> torch.Tensor | None:
    """``b_O + W_O^T b_V``: the v bias folded into the output bias (softmax rows sum to 1)."""
    geom = attention_geometry(attn)
    if not geom.out_bias:
        return None
    proj = attn.proj
    out = proj.bias.detach().double() if proj.bias is not None else proj.weight.new_zeros(geom.out_dim).double()
    if geom.qkv_bias:
        attn_dim = geom.num_heads * geom.head_dim
        out = out + proj.weight.detach().double() @ attn.qkv.bias.detach().double()[2 * attn_dim:]
    return out


# ---------------------------------------------------------------------------------------------------------------------
# The module


def _padded_index(ranks: tuple[int, ...], width: int) -> torch.Tensor:
    """Positions of the concatenated per-head columns inside a (heads * width) zero-padded layout."""
    return torch.cat([torch.arange(r) + h * width for h, r in enumerate(ranks)]).long()


class FactorizedAttention(nn.Module):
    """Multi-head attention from rank-r factors of every head's QK and VO products (see the module docstring).

    Parameters (heads concatenated; head h owns ``qk_ranks[h]`` rows of q/k and ``vo_ranks[h]`` of v/o):
    ``q_weight`` (sum qk, d), ``q_bias`` (sum qk) when the dense qkv had a bias, ``k_weight`` (sum qk, d),
    ``v_weight`` (sum vo, d), ``o_weight`` (d_out, sum vo), ``o_bias`` (d_out), and for Swin the unchanged
    ``relative_position_bias_table``. Heads of unequal rank are zero-padded to the largest rank for one batched
    attention call (exact: padded columns add zeros to the scores and produce unused outputs).

    ``forward(x, attn_mask=None, is_causal=False, mask=None)`` accepts both timm call conventions: ViT/DeiT blocks
    pass ``attn_mask``/``is_causal``, Swin blocks pass the shifted-window ``mask`` (num_windows, N, N).
    """

    def __init__(self, dim: int, out_dim: int, num_heads: int, qk_ranks: list[int] | tuple[int, ...],
                 vo_ranks: list[int] | tuple[int, ...], q_bias: bool = True, o_bias: bool = True,
                 relative_position_index: torch.Tensor | None = None, relative_position_table_size: int = 0,
                 attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__()
        qk_ranks, vo_ranks = tuple(int(r) for r in qk_ranks), tuple(int(r) for r in vo_ranks)
        if len(qk_ranks) != num_heads or len(vo_ranks) != num_heads or min(qk_ranks + vo_ranks) < 1:
            raise ValueError(f"need one rank >= 1 per head for {num_heads} heads, got qk {qk_ranks}, vo {vo_ranks}")
        self.dim, self.out_dim, self.num_heads = dim, out_dim, num_heads
        self.qk_ranks, self.vo_ranks = qk_ranks, vo_ranks
        rq, rv = sum(qk_ranks), sum(vo_ranks)
        self.q_weight = nn.Parameter(torch.zeros(rq, dim))
        self.q_bias = nn.Parameter(torch.zeros(rq)) if q_bias else None
        self.k_weight = nn.Parameter(torch.zeros(rq, dim))
        self.v_weight = nn.Parameter(torch.zeros(rv, dim))
        self.o_weight = nn.Parameter(torch.zeros(out_dim, rv))
        self.o_bias = nn.Parameter(torch.zeros(out_dim)) if o_bias else None
        if relative_position_index is not None:
            self.relative_position_bias_table = nn.Parameter(torch.zeros(relative_position_table_size, num_heads))
            self.register_buffer("relative_position_index", relative_position_index.clone().long(), persistent=False)
        else:
            self.relative_position_bias_table = None
            self.relative_position_index = None
        self.register_buffer("qk_index", _padded_index(qk_ranks, max(qk_ranks)), persistent=False)
        self.register_buffer("vo_index", _padded_index(vo_ranks, max(vo_ranks)), persistent=False)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj_drop = nn.Dropout(proj_drop)

    # -- construction ----------------------------------------------------------------------------------------------

    @classmethod
    def like(cls, attn: nn.Module, qk_ranks: list[int] | tuple[int, ...],
             vo_ranks: list[int] | tuple[int, ...]) -> FactorizedAttention:
        """An empty (zero) factorized module shaped after the dense ``attn`` with the given per-head ranks."""
        geom = attention_geometry(attn)
        index = getattr(attn, "relative_position_index", None) if geom.relative_position else None
        table = attn.relative_position_bias_table.shape[0] if geom.relative_position else 0
        drops = [getattr(getattr(attn, part, None), "p", 0.0) for part in ("attn_drop", "proj_drop")]
        module = cls(geom.dim, geom.out_dim, geom.num_heads, qk_ranks, vo_ranks, q_bias=geom.qkv_bias,
                     o_bias=geom.out_bias, relative_position_index=index, relative_position_table_size=table,
                     attn_drop=drops[0], proj_drop=drops[1])
        return module.to(device=attn.qkv.weight.device, dtype=attn.qkv.weight.dtype)

    @classmethod
    def from_spec_like(cls, attn: nn.Module, spec: dict[str, Any], name: str = "attention") -> FactorizedAttention:
        """Rebuild a saved module (:meth:`spec`) on the dense ``attn`` of a freshly built model; raises ValueError
        when the two do not match."""
        geom = attention_geometry(attn, name)
        for key, value in (("dim", geom.dim), ("out_dim", geom.out_dim), ("num_heads", geom.num_heads),
                           ("q_bias", geom.qkv_bias), ("o_bias", geom.out_bias),
                           ("relative_position", geom.relative_position)):
            if spec.get(key) != value:
                raise ValueError(f"saved attention {name} has {key}={spec.get(key)!r}, the model's has {value!r}: "
                                 "mismatched model")
        ranks = [spec.get("qk_ranks"), spec.get("vo_ranks")]
        for r in ranks:
            if not isinstance(r, list) or len(r) != geom.num_heads or not all(
                    isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= geom.head_dim for v in r):
                raise ValueError(f"saved attention {name} needs qk_ranks and vo_ranks lists of {geom.num_heads} "
                                 f"integers in [1, {geom.head_dim}]")
        return cls.like(attn, ranks[0], ranks[1])

    @classmethod
    def from_attention(cls, attn: nn.Module, decompositions: dict[str, Decomposition],
                       qk_ranks: list[int], vo_ranks: list[int]) -> FactorizedAttention:
        """Factorize the dense ``attn`` at the given per-head ranks from its products' SVDs (keys ``qk.h``/``vo.h``,
        as :func:`head_products`); singular values are split evenly between the two factors."""
        geom = attention_geometry(attn)
        module = cls.like(attn, qk_ranks, vo_ranks)
        qa, qb, va, vb = [], [], [], []
        for h in range(geom.num_heads):
            A, B = decompositions[f"qk.{h}"].factors(qk_ranks[h])
            C, D = decompositions[f"vo.{h}"].factors(vo_ranks[h])
            qa.append(A), qb.append(B), va.append(C), vb.append(D)
        A, B, C, D = torch.cat(qa, 1), torch.cat(qb, 1), torch.cat(va, 1), torch.cat(vb, 1)
        dtype = module.q_weight.dtype
        with torch.no_grad():
            module.q_weight.copy_(A[: geom.dim].T.to(dtype))
            if module.q_bias is not None:
                module.q_bias.copy_(A[geom.dim].to(dtype))
            module.k_weight.copy_(B.T.to(dtype))
            module.v_weight.copy_(C.T.to(dtype))
            module.o_weight.copy_(D.to(dtype))
            if module.o_bias is not None:
                module.o_bias.copy_(output_bias(attn).to(dtype))
            if module.relative_position_bias_table is not None:
                module.relative_position_bias_table.copy_(attn.relative_position_bias_table.detach())
        return module

    def spec(self) -> dict[str, Any]:
        return {"dim": self.dim, "out_dim": self.out_dim, "num_heads": self.num_heads,
                "qk_ranks": list(self.qk_ranks), "vo_ranks": list(self.vo_ranks), "q_bias": self.q_bias is not None,
                "o_bias": self.o_bias is not None, "relative_position": self.relative_position_bias_table is not None}

    # -- computation -----------------------------------------------------------------------------------------------

    def _heads(self, y: torch.Tensor, ranks: tuple[int, ...], index: torch.Tensor) -> torch.Tensor:
        """(B, N, sum r) -> (B, heads, N, max r), zero-padding heads of lower rank."""
        B, N, _ = y.shape
        width = max(ranks)
        if min(ranks) != width:
            y = y.new_zeros(B, N, self.num_heads * width).index_copy(-1, index, y)
        return y.view(B, N, self.num_heads, width).transpose(1, 2)

    def _relative_position_bias(self, N: int) -> torch.Tensor:
        table = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return table.view(N, N, -1).permute(2, 0, 1).unsqueeze(0)  # (1, heads, N, N), as timm's Swin

    def _score_bias(self, B: int, N: int, dtype: torch.dtype, attn_mask: torch.Tensor | None,
                    mask: torch.Tensor | None) -> torch.Tensor | None:
        bias = None
        if self.relative_position_bias_table is not None:
            bias = self._relative_position_bias(N).to(dtype)
            if mask is not None:  # Swin's shifted-window mask (num_windows, N, N); windows are batch-major
                num_win = mask.shape[0]
                bias = bias.unsqueeze(1) + mask.to(dtype).view(1, num_win, 1, N, N)
                bias = bias.expand(B // num_win, -1, -1, -1, -1).reshape(B, self.num_heads, N, N)
        elif mask is not None:
            raise ValueError("a window mask needs a relative-position (Swin) attention")
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                attn_mask = torch.zeros_like(attn_mask, dtype=dtype).masked_fill(~attn_mask, float("-inf"))
            bias = attn_mask if bias is None else bias + attn_mask
        return bias

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        B, N, _ = x.shape
        q = self._heads(F.linear(x, self.q_weight, self.q_bias), self.qk_ranks, self.qk_index)
        k = self._heads(F.linear(x, self.k_weight), self.qk_ranks, self.qk_index)
        v = self._heads(F.linear(x, self.v_weight), self.vo_ranks, self.vo_index)
        bias = self._score_bias(B, N, q.dtype, attn_mask, mask)
        # The softmax scale is folded into the QK factors, hence scale=1.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=is_causal, scale=1.0,
                                             dropout_p=self.attn_drop.p if self.training else 0.0)
        out = out.transpose(1, 2).reshape(B, N, -1)
        if min(self.vo_ranks) != max(self.vo_ranks):
            out = out.index_select(-1, self.vo_index)
        return self.proj_drop(F.linear(out, self.o_weight, self.o_bias))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, out_dim={self.out_dim}, num_heads={self.num_heads}, qk_ranks={list(self.qk_ranks)}, "
                f"vo_ranks={list(self.vo_ranks)}, relative_position={self.relative_position_bias_table is not None}")


def attention_ranks(name: str, attn: nn.Module, ranks: dict[str, int | None]) -> tuple[list[int], list[int]]:
    """Per-head (qk, vo) ranks of attention module ``name`` from an allocation keyed by unit names (a unit that is
    absent or ``None`` is at full rank, head_dim)."""
    geom = attention_geometry(attn, name)
    qk, vo = ([unit_rank(ranks.get(unit_name(name, product, h)), geom.head_dim) for h in range(geom.num_heads)]
              for product in PRODUCTS)
    return qk, vo


def attention_spec(name: str, attn: nn.Module, ranks: dict[str, int | None]) -> dict[str, Any]:
    """The :meth:`FactorizedAttention.spec` that an allocation gives the dense ``attn`` (without computing factors)."""
    geom = attention_geometry(attn, name)
    qk, vo = attention_ranks(name, attn, ranks)
    return {"dim": geom.dim, "out_dim": geom.out_dim, "num_heads": geom.num_heads, "qk_ranks": qk, "vo_ranks": vo,
            "q_bias": geom.qkv_bias, "o_bias": geom.out_bias, "relative_position": geom.relative_position}


def factorize_attention(name: str, attn: nn.Module, decompositions: dict[str, Decomposition],
                        ranks: dict[str, int | None]) -> FactorizedAttention:
    """The factorized replacement of attention module ``name`` from an allocation keyed by unit names."""
    qk, vo = attention_ranks(name, attn, ranks)
    own = {key[len(name) + 1:]: d for key, d in decompositions.items() if key.startswith(f"{name}.")}
    return FactorizedAttention.from_attention(attn, own, qk, vo)
