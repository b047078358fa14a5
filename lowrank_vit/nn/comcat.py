"""COMCAT's factorized multi-head attention (Xiao et al. ICML 2023, "COMCAT: Towards Efficient Compression and
Customization of Attention-Based Vision Models", arXiv 2305.17235): the module a compressed model is made of.

COMCAT factorizes each head's two products, ``scale * [W_Q^h; b_Q^h] (W_K^h)^T = [A_h; a_h] B_h^T`` (the score matrix,
augmented by the q bias row) and ``W_V^h W_O^h = C_h D_h^T`` (the value-output map). :class:`FactorizedAttention`
replaces a timm attention module and computes every head from those rank-r factors:
    q~_h = x A_h + a_h,  k~_h = x B_h,  v~_h = x C_h,      out = sum_h softmax(q~_h k~_h^T + bias) v~_h D_h^T + b_O'

It has a query bias (a_h) but no key or value bias: b_K cancels in the softmax and b_V is folded into the output bias
``b_O' = b_O + W_O^T b_V``, so at full rank it reproduces the dense attention to rounding error. Swin's relative
position bias and shifted-window mask are added to the scores exactly as timm does.

Loading and running a compressed model needs only this module and the dense geometry it is built on
(:meth:`FactorizedAttention.from_spec_like` rebuilds it from its saved spec on a freshly built model). Computing its
factors, the per-head products, their SVDs and the per-head rank allocation, is compression's:
:mod:`lowrank_vit.methods.comcat`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

# ---------------------------------------------------------------------------------------------------------------------
# What can be factorized


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
    def out_bias(self) -> bool:
        return self.proj_bias or self.qkv_bias


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
        """An empty (zero) factorized module shaped after the dense ``attn`` with the given per-head ranks (filled by
        :func:`lowrank_vit.methods.comcat.factorize_attention`, or by a checkpoint's tensors)."""
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
