"""The selective scan of state-space models (Mamba's S6, as VMamba runs it along four directions), in plain PyTorch.

For every channel c with its own step size delta (> 0), state matrix A (diagonal, negative), and the input-dependent
B_t, C_t that a group of channels shares (one group per scan direction in VMamba):
    h_t = exp(delta_t A) * h_{t-1} + delta_t B_t u_t          (n states per channel, h_0 = 0)
    y_t = C_t . h_t + D u_t

``selective_scan_reference`` runs this recurrence one step at a time: the truth the tests compare with.
``selective_scan`` computes every state at once by a doubling scan (Hillis and Steele): the step t -> t' of the
recurrence is the affine map h -> a h + x with a = exp(delta A) and x = delta B u; composing two maps gives another,
(a2, x2) after (a1, x1) = (a2 a1, a2 x1 + x2), so after log2(l) rounds, in which every position composes itself with
the position ``offset`` steps back (offset = 1, 2, 4, ...), every position holds the map from the start, whose x is
the state. Every factor a lies in (0, 1], so the products only shrink: nothing overflows in float32, unlike the
cumulative-product form exp(S_t) * cumsum(exp(-S_s) x_s), whose exp(-S_s) overflows after a few steps of a
fast-decaying channel. Each round is elementwise work on (b, d, n, l) tensors: a loop of log2(l) steps instead of l,
ordinary tensor algebra that runs on any device, under autograd and in ONNX export, with no custom kernel.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def _expand_groups(shared: torch.Tensor, channels: int) -> torch.Tensor:
    """B or C of shape (b, g, n, l), shared by the channels of each of g equal groups -> (b, channels, n, l)."""
    groups = shared.shape[1]
    if channels % groups:
        raise ValueError(f"{channels} channels cannot be split into {groups} groups sharing B and C")
    return shared.repeat_interleave(channels // groups, dim=1)


def _check(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor) -> None:
    if u.ndim != 3 or delta.shape != u.shape:
        raise ValueError(f"u and delta must both be (batch, channels, length), got {tuple(u.shape)} and "
                         f"{tuple(delta.shape)}")
    if A.ndim != 2 or A.shape[0] != u.shape[1]:
        raise ValueError(f"A must be (channels, states) = ({u.shape[1]}, n), got {tuple(A.shape)}")
    for name, t in (("B", B), ("C", C)):
        if t.ndim != 4 or t.shape[0] != u.shape[0] or t.shape[2] != A.shape[1] or t.shape[3] != u.shape[2]:
            raise ValueError(f"{name} must be (batch, groups, states, length) = ({u.shape[0]}, g, {A.shape[1]}, "
                             f"{u.shape[2]}), got {tuple(t.shape)}")


def selective_scan_reference(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                             C: torch.Tensor, D: torch.Tensor | None = None) -> torch.Tensor:
    """The recurrence of the module docstring, one step at a time (float64 inside; slow: tests and checks only).

    Args:
        u, delta: (b, d, l) inputs and step sizes.
        A: (d, n) diagonal state matrices (negative entries).
        B, C: (b, g, n, l), shared by d/g consecutive channels each.
        D: (d,) skip weights, or None.

    Returns:
        y: (b, d, l) in u's dtype.
    """
    _check(u, delta, A, B, C)
    b, d, length = u.shape
    Bx, Cx = _expand_groups(B, d).double(), _expand_groups(C, d).double()
    uu, dd, AA = u.double(), delta.double(), A.double()
    h = torch.zeros(b, d, A.shape[1], dtype=torch.float64, device=u.device)
    ys = []
    for t in range(length):
        h = torch.exp(dd[:, :, t, None] * AA) * h + (dd[:, :, t] * uu[:, :, t])[..., None] * Bx[..., t]
        ys.append((h * Cx[..., t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D.double()[:, None] * uu
    return y.to(u.dtype)


def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   D: torch.Tensor | None = None) -> torch.Tensor:
    """The same as :func:`selective_scan_reference`, by the doubling scan of the module docstring, in u's dtype."""
    _check(u, delta, A, B, C)
    length = u.shape[2]
    decay = torch.exp(delta[:, :, None, :] * A[None, :, :, None])  # (b, d, n, l) in (0, 1]
    state = (delta * u)[:, :, None, :] * _expand_groups(B, u.shape[1])  # delta_t B_t u_t
    offset = 1
    while offset < length:  # position t composes itself with position t - offset (the identity before the start)
        state = state + decay * F.pad(state[..., :-offset], (offset, 0))
        decay = decay * F.pad(decay[..., :-offset], (offset, 0), value=1.0)
        offset *= 2
    y = (state * _expand_groups(C, u.shape[1])).sum(2)
    if D is not None:
        y = y + D[:, None] * u
    return y


def channel_mean_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                      D: torch.Tensor | None = None) -> torch.Tensor:
    """VMeanba's scan: within each group of channels that share B and C, the scan's inputs u and delta and its state
    matrix A are averaged over the channels, one scan runs per group, and its output is given to every channel of the
    group. The skip term D u stays per channel (elementwise, outside the scan: it costs l multiply-adds a channel).

    Same arguments and result shape as :func:`selective_scan`; the scan's work drops by the group width d / g.
    """
    _check(u, delta, A, B, C)
    b, d, length = u.shape
    g = B.shape[1]
    if d % g:
        raise ValueError(f"{d} channels cannot be split into {g} groups sharing B and C")
    mean_u = u.reshape(b, g, d // g, length).mean(2)
    mean_delta = delta.reshape(b, g, d // g, length).mean(2)
    mean_A = A.reshape(g, d // g, A.shape[1]).mean(1)
    y = selective_scan(mean_u, mean_delta, mean_A, B, C, None)  # (b, g, l): one channel per group
    y = y[:, :, None, :].expand(b, g, d // g, length).reshape(b, d, length)
    if D is not None:
        y = y + D[:, None] * u
    return y
