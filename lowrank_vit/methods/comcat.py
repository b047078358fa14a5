"""COMCAT (Xiao et al. ICML 2023, "COMCAT: Towards Efficient Compression and Customization of Attention-Based Vision
Models", arXiv 2305.17235): head-level low-rank factorization of multi-head attention, the compression side: the
per-head products, their SVDs, the allocation units, and the :class:`~lowrank_vit.nn.comcat.FactorizedAttention`
an allocation gives (that module, all a compressed model needs to load and run, is in :mod:`lowrank_vit.nn.comcat`).

The insight (their Sec. 3): head h's scores and output depend on its four projections only through two products,

    scores_h = softmax(x W_Q^h (W_K^h)^T x^T * scale),     out = sum_h scores_h x (W_V^h W_O^h),

each a d x d matrix of rank <= head_dim. Factorizing the *products* (instead of W_Q, W_K, W_V, W_O one by one)
keeps what attention computes and reaches lower ranks for the same error. Each head's factors are

    scale * [W_Q^h; b_Q^h] (W_K^h)^T = [A_h; a_h] B_h^T,     W_V^h W_O^h = C_h D_h^T,

which the factorized module computes with as ``q~_h = x A_h + a_h``, ``k~_h = x B_h``, ``v~_h = x C_h`` and output
weight D_h^T. Biases are handled exactly (at full rank the module reproduces the dense attention to rounding error):

* q and k biases: ``(x_i W_Q + b_Q)(x_j W_K + b_K)^T`` has four terms; ``x_i W_Q b_K^T`` and ``b_Q b_K^T`` are
  constant along the key axis j and cancel in the softmax, so b_K is dropped; ``b_Q W_K^T x_j`` is not constant and
  is kept by factorizing the *augmented* product ``[W_Q; b_Q] W_K^T`` ((d+1) x d): its last factor row a_h acts as a
  bias of the query-side projection (r extra parameters per head instead of d).
* v bias: softmax rows sum to 1, so ``softmax(.) (x W_V + 1 b_V) W_O = softmax(.) x W_V W_O + 1 b_V W_O``; b_V folds
  into the output bias, ``b_O' = b_O + W_O^T b_V``.
* Swin's relative position bias table is copied unchanged.

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

from lowrank_vit.core.budget import LayerBudget
from lowrank_vit.core.decompose import Decomposition, truncated_svd
from lowrank_vit.nn.comcat import AttentionGeometry, FactorizedAttention, attention_geometry

PRODUCTS = ("qk", "vo")


# ---------------------------------------------------------------------------------------------------------------------
# Allocation units


def unit_name(attention_name: str, product: str, head: int) -> str:
    """Allocation unit of one head's product, e.g. ``blocks.3.attn.qk.5``."""
    return f"{attention_name}.{product}.{head}"


def unit_shape(geom: AttentionGeometry, product: str) -> tuple[int, int]:
    """(rows, columns) of one head's product: QK ((d + bias) x d, the augmented bias row with a qkv bias),
    VO (d x d_out)."""
    return (geom.dim + int(geom.qkv_bias), geom.dim) if product == "qk" else (geom.dim, geom.out_dim)


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
            rows, cols = unit_shape(geom, product)
            for h in range(geom.num_heads):
                unit = unit_name(name, product, h)
                curve = curves[unit] if curves is not None else torch.zeros(1)
                out.append(HeadBudget(unit, rows, cols, 0, curve, head_dim=geom.head_dim))
    return out


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
# The factorized module an allocation gives


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
    """The factorized replacement of attention module ``name`` from an allocation keyed by unit names, its factors
    from the SVDs of its heads' products (``decompositions`` keyed by unit name, as :func:`head_decompositions`);
    singular values are split evenly between the two factors."""
    geom = attention_geometry(attn, name)
    qk_ranks, vo_ranks = attention_ranks(name, attn, ranks)
    module = FactorizedAttention.like(attn, qk_ranks, vo_ranks)
    qa, qb, va, vb = [], [], [], []
    for h in range(geom.num_heads):
        A, B = decompositions[unit_name(name, "qk", h)].factors(qk_ranks[h])
        C, D = decompositions[unit_name(name, "vo", h)].factors(vo_ranks[h])
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
