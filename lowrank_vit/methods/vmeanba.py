"""VMeanba (Chi et al., 2024): training-free compression of the selective scans of vision state-space models.

The outputs of a state-space block's scan vary little across its channels. In K chosen blocks, the scan's inputs
(u, delta) and its state matrix A are averaged over the channels of each scan path, one scan runs per path, and its
output is given back to every channel (``core.scan.channel_mean_scan``): the scan's work drops by the path's width.

Which blocks: each block's *impact* is the mean KL divergence from the dense model's predictions to those of the model
with that block alone switched, over the calibration images (no labels needed); the K blocks of least impact are
switched. With a target speedup instead of K, blocks are added in that order until the predicted end-to-end speedup
reaches the target; the prediction adds up each block's measured saving (its mixer timed dense and switched at the
batch given) against the dense model's measured time. Errors name what is reachable.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from lowrank_vit.core.calibration import iter_calibration_batches
from lowrank_vit.core.progress import progress_bar
from lowrank_vit.core.scan import channel_mean_scan, selective_scan
from lowrank_vit.nn.adapters import TimmViTAdapter
from lowrank_vit.speed.timing import interleaved_timings


@dataclass(frozen=True)
class VMeanbaConfig:
    """What VMeanba does. Exactly one of ``num_blocks`` and ``target_speedup``."""

    num_blocks: int | None = None
    """K: how many blocks run the channel-mean scan (those of least impact)."""
    target_speedup: float | None = None
    """Switch the fewest blocks whose predicted end-to-end speedup reaches this (> 1)."""
    calib_samples: int = 256
    """Images the impact scores average over."""
    latency_batch: int = 32
    """Batch size the blocks and the model are timed at (a target speedup, and the report's measured speedup)."""
    repeats: int = 5
    """Interleaved timing repeats (medians are used)."""
    timing: bool = True
    """Measure the dense and the switched model side by side for the report (a target speedup always times)."""
    progress: bool = True

    def __post_init__(self) -> None:
        if (self.num_blocks is None) == (self.target_speedup is None):
            raise ValueError("VMeanba needs exactly one of num_blocks=K and target_speedup=S")
        if self.num_blocks is not None and (not isinstance(self.num_blocks, int) or isinstance(self.num_blocks, bool)
                                        or self.num_blocks < 1):
            raise ValueError(f"num_blocks must be a positive integer, not {self.num_blocks!r}")
        if self.target_speedup is not None and not (isinstance(self.target_speedup, (int, float))
                                                    and math.isfinite(self.target_speedup)
                                                    and self.target_speedup > 1):
            raise ValueError(f"target_speedup must be a number above 1, not {self.target_speedup!r}")
        for name in ("calib_samples", "latency_batch", "repeats"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, not {value!r}")


@dataclass
class VMeanbaReport:
    scores: dict[str, float]
    """Impact of each selective-scan block alone: mean KL(dense || switched) in nats per image, forward order."""
    chosen: list[str]
    """The blocks switched to the channel-mean scan, least impact first."""
    kl: float
    """Mean KL from the dense model to the returned one over the calibration images."""
    savings_ms: dict[str, float] = field(default_factory=dict)
    """Each block's measured saving (dense mixer minus switched mixer, ms per batch); empty when not timed."""
    dense_ms: float | None = None
    predicted_speedup: float | None = None
    measured_speedup: float | None = None
    scan_speedup: float | None = None
    """The chosen blocks' scans alone: their dense scan times over their channel-mean scan times, summed."""
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def scan_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """The selective-scan mixers of ``model``; a ValueError naming what the model has when it has none."""
    adapter = TimmViTAdapter()  # reads any model: a model without blocks has neither scans nor attention
    ops = adapter.scan_modules(model)
    if not ops:
        attention = len(adapter.attention_modules(model, include_factorized=True))
        raise ValueError(f"{type(model).__name__} has no selective-scan block (found {attention} attention "
                         "block(s)): VMeanba applies to vision state-space models such as vmamba_tiny")
    return ops


def _log_probs(model: nn.Module, images: list[torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [F.log_softmax(model(x).float(), dim=-1) for x in images]


def _kl(reference: list[torch.Tensor], model: nn.Module, images: list[torch.Tensor]) -> float:
    """Mean over images of KL(reference || model), in nats."""
    total, count = 0.0, 0
    for ref, out in zip(reference, _log_probs(model, images), strict=True):
        total += float((ref.exp() * (ref - out)).sum())
        count += ref.shape[0]
    return total / count


def layer_impact(model: nn.Module, images: list[torch.Tensor], progress: bool = True) -> dict[str, float]:
    """Each selective-scan block's impact: the model with that block alone switched, mean KL from the model as it is
    (nats per image). Blocks already switched stay switched while the others are scored."""
    ops = scan_blocks(model)
    reference = _log_probs(model, images)
    scores: dict[str, float] = {}
    with progress_bar(len(ops), "VMeanba impact", "block", progress) as bar:
        for name, op in ops.items():
            if op.mean_scan:
                scores[name] = 0.0
            else:
                op.mean_scan = True
                try:
                    scores[name] = _kl(reference, model, images)
                finally:
                    op.mean_scan = False
            bar.update(1)
    return scores


def _check_k(k: int, blocks: int) -> None:
    if k > blocks:
        raise ValueError(f"num_blocks={k} but the model has {blocks} selective-scan block(s): choose 1 to {blocks}")


def least_impact(scores: dict[str, float], k: int) -> list[str]:
    """The k blocks of smallest impact (ties in forward order)."""
    _check_k(k, len(scores))
    order = sorted(range(len(scores)), key=lambda i: (list(scores.values())[i], i))
    names = list(scores)
    return [names[i] for i in order[:k]]


def _batch_of(images: list[torch.Tensor], size: int) -> torch.Tensor:
    """``size`` images from the calibration images, repeated when there are fewer."""
    pool = torch.cat(images)
    return pool.repeat(math.ceil(size / pool.shape[0]), 1, 1, 1)[:size]


@dataclass
class BlockTimes:
    """Milliseconds per batch, medians of interleaved repeats."""

    model: float
    """The whole model, as it is."""
    mixer: dict[str, tuple[float, float]]
    """Each selective-scan mixer on its own input: (dense, switched)."""
    scan: dict[str, tuple[float, float]]
    """Each mixer's scan alone (``selective_scan`` against ``channel_mean_scan`` on the same arguments)."""

    def savings(self) -> dict[str, float]:
        return {name: dense - mean for name, (dense, mean) in self.mixer.items()}


def block_times(model: nn.Module, batch: torch.Tensor, repeats: int = 5, progress: bool = True) -> BlockTimes:
    """Time the model, each selective-scan mixer dense and switched, and each scan alone, interleaved."""
    ops = scan_blocks(model)
    inputs: dict[str, torch.Tensor] = {}
    hooks = [op.register_forward_pre_hook(lambda module, args, name=name: inputs.__setitem__(name, args[0]))
             for name, op in ops.items()]
    try:
        with torch.no_grad():
            model(batch)
    finally:
        for hook in hooks:
            hook.remove()

    sync = torch.cuda.synchronize if batch.is_cuda else (lambda: None)
    calls: dict[str, Any] = {"model": lambda: model(batch)}
    with torch.no_grad():
        for name, op in ops.items():
            calls[f"{name}:dense"] = lambda op=op, x=inputs[name]: op(x)
            calls[f"{name}:mean"] = lambda op=op, x=inputs[name]: _call_switched([op], True, op, x)
            args = op.scan_inputs(inputs[name])
            calls[f"{name}:scan"] = lambda args=args: selective_scan(*args)
            calls[f"{name}:mean_scan"] = lambda args=args: channel_mean_scan(*args)
    with torch.no_grad(), progress_bar(repeats, "VMeanba timing", "repeat", progress) as bar:
        t = interleaved_timings(calls, repeats=repeats, sync=sync, on_repeat=lambda _: bar.update(1))
    return BlockTimes(t["model"].median, {n: (t[f"{n}:dense"].median, t[f"{n}:mean"].median) for n in ops},
                      {n: (t[f"{n}:scan"].median, t[f"{n}:mean_scan"].median) for n in ops})


@contextlib.contextmanager
def switched(ops: Iterable[nn.Module], on: bool) -> Iterator[None]:
    """The scans ``ops`` set to the channel-mean scan (``on``) or the dense one for the duration, then each restored
    to what it was, whatever the body raised."""
    ops = list(ops)
    before = [op.mean_scan for op in ops]
    for op in ops:
        op.mean_scan = on
    try:
        yield
    finally:
        for op, was in zip(ops, before, strict=True):
            op.mean_scan = was


def _call_switched(ops: Iterable[nn.Module], on: bool, fn: Any, *args: Any) -> None:
    with switched(ops, on):
        fn(*args)


def _by_speedup(scores: dict[str, float], savings: dict[str, float], dense_ms: float, target: float) -> list[str]:
    order = least_impact(scores, len(scores))
    saved = 0.0
    for k, name in enumerate(order, start=1):
        saved += savings[name]
        if dense_ms / max(dense_ms - saved, 1e-9) >= target:
            return order[:k]
    reachable = dense_ms / max(dense_ms - sum(max(s, 0.0) for s in savings.values()), 1e-9)
    raise ValueError(f"a {target:g}x speedup is out of reach: switching all {len(order)} selective-scan blocks is "
                     f"predicted to give {reachable:.3f}x (measured savings at this batch); ask for at most that")


def check_blocks(model: nn.Module, config: VMeanbaConfig) -> dict[str, nn.Module]:
    """The model's selective-scan mixers; a ValueError when it has none or fewer than ``config.num_blocks``."""
    ops = scan_blocks(model)
    if config.num_blocks is not None:
        _check_k(config.num_blocks, len(ops))
    return ops


def apply_vmeanba(model: nn.Module, calib_images: Iterable, config: VMeanbaConfig | None = None,
                  **overrides: Any) -> VMeanbaReport:
    """Switch the chosen selective-scan blocks of ``model`` to the channel-mean scan, in place.

    Args:
        model: a vision state-space model (``vmamba_tiny`` and relatives, ``nn/vssm.py``), possibly already
            low-rank compressed.
        calib_images: batches of preprocessed images (tensors, (images, labels) tuples or dicts with "image").
        config: a :class:`VMeanbaConfig`; ``overrides`` replace its fields (``apply_vmeanba(m, data, num_blocks=3)``).
    """
    cfg = VMeanbaConfig(**overrides) if config is None else replace(config, **overrides)
    ops = check_blocks(model, cfg)  # before any calibration pass
    device = next(model.parameters()).device
    images = [x.to(device) for x, _ in iter_calibration_batches(calib_images, cfg.calib_samples)]
    was_training = model.training
    model.eval()
    try:
        reference = _log_probs(model, images)
        scores = layer_impact(model, images, cfg.progress)
        times = None
        timing_batch = _batch_of(images, cfg.latency_batch)
        if cfg.target_speedup is not None or cfg.timing:
            times = block_times(model, timing_batch, cfg.repeats, cfg.progress)
        if cfg.num_blocks is not None:
            chosen = least_impact(scores, cfg.num_blocks)
        else:
            chosen = _by_speedup(scores, times.savings(), times.model, cfg.target_speedup)
        for name in chosen:
            ops[name].mean_scan = True
        report = VMeanbaReport(scores, chosen, _kl(reference, model, images), config=asdict(cfg))
        if times is not None:
            report.savings_ms, report.dense_ms = times.savings(), times.model
            saved = sum(report.savings_ms[name] for name in chosen)
            report.predicted_speedup = times.model / max(times.model - saved, 1e-9)
            report.scan_speedup = (sum(times.scan[n][0] for n in chosen) / sum(times.scan[n][1] for n in chosen))
            report.measured_speedup = _measured_speedup(model, ops, chosen, timing_batch, cfg.repeats)
    finally:
        model.train(was_training)
    return report


def _measured_speedup(model: nn.Module, ops: dict[str, nn.Module], chosen: list[str], batch: torch.Tensor,
                      repeats: int) -> float:
    """The dense and the switched model timed side by side (the switch flipped inside each call)."""
    switched_ops = [ops[name] for name in chosen]
    calls = {"dense": lambda: _call_switched(switched_ops, False, model, batch),
             "vmeanba": lambda: _call_switched(switched_ops, True, model, batch)}
    sync = torch.cuda.synchronize if batch.is_cuda else (lambda: None)
    with torch.no_grad():
        timings = interleaved_timings(calls, repeats=repeats, sync=sync)
    return timings["dense"].median / timings["vmeanba"].median
