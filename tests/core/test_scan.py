"""Tests of lowrank_vit/core/scan.py."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from lowrank_vit.core.scan import channel_mean_scan, selective_scan, selective_scan_reference


def scan_problem(seed: int, b: int, d: int, n: int, length: int, groups: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(b, d, length, generator=g)
    delta = F.softplus(torch.randn(b, d, length, generator=g) - 1)
    A = -torch.exp(torch.randn(d, n, generator=g))  # decays from slow to fast, over two decades
    B = torch.randn(b, groups, n, length, generator=g)
    C = torch.randn(b, groups, n, length, generator=g)
    D = torch.randn(d, generator=g)
    return u, delta, A, B, C, D


# lengths below, at and between powers of two (the doubling scan's rounds), one to four groups, one to four states
@pytest.mark.parametrize("seed, shape", [(0, (2, 6, 3, 37, 3)), (1, (1, 4, 1, 64, 4)), (2, (3, 8, 2, 5, 2)),
                                         (3, (2, 4, 4, 50, 1)), (9, (1, 2, 1, 1, 1)), (10, (2, 3, 2, 2, 3))])
def test_doubling_scan_is_the_recurrence(seed, shape):
    args = scan_problem(seed, *shape)
    expected = selective_scan_reference(*args)
    assert torch.allclose(selective_scan(*args), expected, atol=1e-5, rtol=1e-4)
    # float64 inputs: agreement to float64 rounding
    args64 = [t.double() for t in args]
    assert torch.allclose(selective_scan(*args64), selective_scan_reference(*args64), atol=1e-12)


def test_doubling_scan_gradients_are_the_recurrences():
    args = [t.double().requires_grad_() for t in scan_problem(4, 2, 4, 2, 19, 2)]
    weights = torch.randn(2, 4, 19, dtype=torch.float64)
    (selective_scan(*args) * weights).sum().backward()
    chunked = [t.grad.clone() for t in args]
    for t in args:
        t.grad = None
    (selective_scan_reference(*args) * weights).sum().backward()
    for got, want in zip(chunked, [t.grad for t in args], strict=True):
        assert torch.allclose(got, want, atol=1e-10)


def test_fast_decaying_channels_do_not_overflow():
    u, delta, A, B, C, D = scan_problem(5, 1, 2, 1, 200, 1)
    A = torch.full_like(A, -80.0)  # exp(-sum delta A) would overflow float32 within a few steps
    y = selective_scan(u, delta * 4, A, B, C, D)
    assert torch.isfinite(y).all()
    assert torch.allclose(y, selective_scan_reference(u, delta * 4, A, B, C, D), atol=1e-5, rtol=1e-4)


def test_channel_mean_scan_is_one_scan_of_the_group_means():
    u, delta, A, B, C, D = scan_problem(6, 2, 6, 2, 23, 3)  # 3 groups of 2 channels
    y = channel_mean_scan(u, delta, A, B, C, D)
    for group in range(3):
        channels = slice(2 * group, 2 * group + 2)
        mean = selective_scan_reference(u[:, channels].mean(1, keepdim=True), delta[:, channels].mean(1, keepdim=True),
                                        A[channels].mean(0, keepdim=True), B[:, group:group + 1],
                                        C[:, group:group + 1])
        for c in range(2 * group, 2 * group + 2):
            assert torch.allclose(y[:, c], mean[:, 0] + D[c] * u[:, c], atol=1e-5)


def test_channel_mean_scan_is_exact_when_a_groups_channels_agree():
    u, delta, A, B, C, D = scan_problem(7, 2, 6, 3, 17, 2)
    def same(t: torch.Tensor) -> torch.Tensor:  # every channel of a group takes its group's first channel
        return t.reshape(t.shape[0], 2, 3, *t.shape[2:])[:, :, :1].expand(-1, -1, 3, *t.shape[2:]).reshape(t.shape)

    u, delta = same(u), same(delta)
    A = A.reshape(2, 3, 3)[:, :1].expand(2, 3, 3).reshape(6, 3)
    assert torch.allclose(channel_mean_scan(u, delta, A, B, C, D), selective_scan_reference(u, delta, A, B, C, D),
                          atol=1e-5)


def test_scan_shape_errors_name_the_arguments():
    u, delta, A, B, C, D = scan_problem(8, 2, 6, 2, 9, 3)
    with pytest.raises(ValueError, match=r"A must be \(channels, states\) = \(6, n\)"):
        selective_scan(u, delta, A[:5], B, C)
    with pytest.raises(ValueError, match=r"6 channels cannot be split into 4 groups"):
        selective_scan(u, delta, A, B.repeat(1, 2, 1, 1)[:, :4], C.repeat(1, 2, 1, 1)[:, :4])
