"""The selective scan of state-space models (Mamba's S6, as VMamba runs it along four directions), in plain PyTorch.

For every channel c with its own step size delta (> 0), state matrix A (diagonal, negative), and the input-dependent
B_t, C_t that a group of channels shares (one group per scan direction in VMamba):

    h_t = exp(delta_t A) * h_{t-1} + delta_t B_t u_t          (n states per channel, h_0 = 0)
    y_t = C_t . h_t + D u_t

``selective_scan_reference`` runs this recurrence one step at a time: the truth the tests compare with.
``selective_scan`` computes the same in chunks of T steps without a step loop inside a chunk. With S_t the running
sum of delta A over the chunk, every state of the chunk is

    h_t = exp(S_t) h_start + sum_{s <= t} exp(S_t - S_s) delta_s B_s u_s,

a masked T x T decay matrix times the chunk's inputs. Every exponent is <= 0 (A < 0, delta > 0), so nothing
overflows, unlike the cumulative-product form exp(S_t) * cumsum(exp(-S_s) x_s), whose exp(-S_s) overflows float32
after a few steps of a fast-decaying channel. The chunks are chained through their last state: l / T steps of a
Python loop instead of l. Everything is ordinary tensor algebra, so it runs on any device, under autograd and in
ONNX export, with no custom kernel.
"""

from __future__ import annotations

import torch


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
                   D: torch.Tensor | None = None, chunk: int = 32) -> torch.Tensor:
    """The same as :func:`selective_scan_reference`, chunk by chunk (see the module docstring), in u's dtype.

    Args:
        chunk: steps per chunk. Memory grows as b d n chunk^2 and the step loop shrinks as l / chunk.
    """
    _check(u, delta, A, B, C)
    if chunk < 1:
        raise ValueError(f"chunk must be a positive number of steps, got {chunk}")
    b, d, length = u.shape
    Bx, Cx = _expand_groups(B, d), _expand_groups(C, d)
    log_decay = delta[:, :, None, :] * A[None, :, :, None]  # (b, d, n, l), every entry <= 0
    inputs = (delta * u)[:, :, None, :] * Bx  # (b, d, n, l): delta_t B_t u_t
    h = torch.zeros(b, d, A.shape[1], dtype=u.dtype, device=u.device)
    ys = []
    for start in range(0, length, chunk):
        stop = min(start + chunk, length)
        S = log_decay[..., start:stop].cumsum(-1)  # (b, d, n, T)
        steps = stop - start
        causal = torch.ones(steps, steps, dtype=torch.bool, device=u.device).tril()
        pairwise = (S[..., :, None] - S[..., None, :]).masked_fill(~causal, float("-inf"))  # [t, s]: S_t - S_s
        states = torch.exp(S) * h[..., None] + (torch.exp(pairwise) @ inputs[..., start:stop, None]).squeeze(-1)
        ys.append((states * Cx[..., start:stop]).sum(2))  # (b, d, T)
        h = states[..., -1]
    y = torch.cat(ys, dim=-1)
    if D is not None:
        y = y + D[:, None] * u
    return y


def channel_mean_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                      D: torch.Tensor | None = None, chunk: int = 32) -> torch.Tensor:
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
    y = selective_scan(mean_u, mean_delta, mean_A, B, C, None, chunk)  # (b, g, l): one channel per group
    y = y[:, :, None, :].expand(b, g, d // g, length).reshape(b, d, length)
    if D is not None:
        y = y + D[:, None] * u
    return y
