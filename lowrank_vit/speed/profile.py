"""Layer latency tables (:class:`lowrank_vit.core.latency.LatencyTable`): for one model, device, runtime, precision
and batch size, every distinct compressible-layer shape timed dense and factored over a grid of ranks (one
interleaved run per shape), and the whole dense model; cached per machine and software versions, like timm's
weights: reused while they match, measured again when anything the speed depends on changed."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowrank_vit.core.latency import LatencyTable, ShapeLatency, Timing, shape_key
from lowrank_vit.core.progress import progress_bar
from lowrank_vit.io.surgery import fold_lowrank_z_
from lowrank_vit.nn.adapters import get_adapter
from lowrank_vit.nn.factorized import FactorizedLinear
from lowrank_vit.speed.runtimes import environment, get_runtime
from lowrank_vit.speed.timing import interleaved_timings


def model_input_size(model: nn.Module) -> tuple[int, int, int]:
    """(channels, height, width) a timm model takes: what its modules say (the adapter), else its pretrained
    config's."""
    channels, size = get_adapter(model).input_shape(model)
    default = (getattr(model, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224))
    height, width = size or default[1:]
    return int(channels or default[0]), int(height), int(width)


def rows_per_layer(model: nn.Module, batch: int, input_size: tuple[int, int, int]) -> dict[str, int]:
    """Input rows (tokens x batch) every compressible layer sees in one forward of ``batch`` images (Swin's stages
    differ), from forward hooks on the dense model."""
    layers = get_adapter(model).compressible_layers(model)
    rows: dict[str, int] = {}
    handles = [layer.register_forward_hook(
        lambda mod, inputs, _out, name=name: rows.__setitem__(name, inputs[0].numel() // mod.in_features))
        for name, layer in layers.items()]
    device = next(model.parameters()).device
    try:
        with torch.inference_mode():
            model.eval()(torch.zeros(batch, *input_size, device=device))
    finally:
        for handle in handles:
            handle.remove()
    return rows


def rank_grid(in_features: int, out_features: int, step: int) -> list[int]:
    """The ranks profiled for a layer: multiples of ``step`` below the equal-cost rank k m / (k + m) (no allocation
    goes higher: the parameters would not shrink); every rank where no multiple is."""
    top = (in_features * out_features - 1) // (in_features + out_features)
    return list(range(step, top + 1, step)) or list(range(1, top + 1))


def _dense_layers(model: nn.Module) -> dict[str, nn.Linear]:
    if any(isinstance(m, FactorizedLinear) for m in model.modules()):
        raise ValueError("profile the dense model: this one already holds factorized layers")
    return get_adapter(model).compressible_layers(model)


def profile_model(model: nn.Module, *, batch: int, input_size: tuple[int, int, int] | None = None,
                  device: str = "cpu", runtime: str = "torch", dtype: str = "float32", rank_step: int = 8,
                  repeats: int = 5, warmup: int = 2, min_time: float = 0.02, name: str | None = None,
                  progress: bool = True) -> LatencyTable:
    """Measure the :class:`LatencyTable` of ``model`` (dense; its weights do not matter) at ``batch``."""
    rt = get_runtime(runtime)
    rt.check(device, dtype)
    if isinstance(rank_step, bool) or not isinstance(rank_step, int) or rank_step < 1:
        raise ValueError(f"rank_step must be a positive integer, got {rank_step!r}")
    input_size = input_size or model_input_size(model)
    layers = _dense_layers(model)
    rows = rows_per_layer(model, batch, input_size)
    target = torch.device(device)
    sync = (lambda: torch.cuda.synchronize(target)) if target.type == "cuda" else (lambda: None)
    shapes: dict[str, tuple[int, int, int, bool]] = {}
    for layer_name, layer in layers.items():
        spec = (layer.in_features, layer.out_features, rows[layer_name], layer.bias is not None)
        shapes.setdefault(shape_key(*spec), spec)
    generator = torch.Generator().manual_seed(0)
    measured: dict[str, ShapeLatency] = {}
    with tempfile.TemporaryDirectory(prefix="lowrank_vit_profile_") as scratch, \
            progress_bar(len(shapes) + 1, f"profile b{batch} {runtime} {device}", "shape", progress) as bar:
        model_call = rt.prepare(model, torch.randn(batch, *input_size, generator=generator), target, dtype,
                                scratch)
        bar.update(1)
        raw: dict[str, tuple[ShapeLatency, Timing]] = {}
        for key, (k, m, n, bias) in shapes.items():
            x = torch.randn(batch, max(n // batch, 1), k, generator=generator) if n % batch == 0 \
                else torch.randn(n, k, generator=generator)
            ranks = rank_grid(k, m, rank_step)
            # the whole model runs in every shape's interleaved run: the layers' times are then read relative to
            # it, so a change of the machine's load between runs (other jobs) does not skew one shape against another
            # or against the model's own time, which the predictions subtract the layers' savings from
            calls = {"model": model_call,
                     "dense": rt.prepare(_random(nn.Linear(k, m, bias=bias), generator), x, target, dtype, scratch),
                     "overhead": rt.prepare(nn.Identity(), x, target, dtype, scratch)}
            for r in ranks:
                calls[str(r)] = rt.prepare(_random(FactorizedLinear(k, m, r, bias=bias), generator), x, target,
                                           dtype, scratch)
            times = interleaved_timings(calls, repeats=repeats, warmup=warmup, min_time=min_time, sync=sync)
            raw[key] = (ShapeLatency(k, m, n, bias, times["dense"], tuple(ranks),
                                     tuple(times[str(r)] for r in ranks), times["overhead"]), times["model"])
            bar.update(1)
        del model_call
    model_ms, measured = _common_load(raw)
    here = environment(device, runtime)
    layer_keys = {layer_name: shape_key(layer.in_features, layer.out_features, rows[layer_name],
                                        layer.bias is not None) for layer_name, layer in layers.items()}
    return LatencyTable(name or type(model).__name__, batch, device, here["device_name"], runtime, dtype,
                        here["threads"], here["versions"], model_ms, layer_keys, measured, rank_step)


def _common_load(raw: dict[str, tuple[ShapeLatency, Timing]]) -> tuple[Timing, dict[str, ShapeLatency]]:
    """Every shape's times scaled to the median of the model's times over all runs (each shape's run timed the model
    too), and that model time."""
    reference = statistics.median(model.median for _, model in raw.values())
    model_ms = Timing(reference, statistics.median(model.low for _, model in raw.values()),
                      statistics.median(model.high for _, model in raw.values()),
                      sum(model.repeats for _, model in raw.values()))

    def scaled(t: Timing | None, factor: float) -> Timing | None:
        return None if t is None else Timing(t.median * factor, t.low * factor, t.high * factor, t.repeats)

    measured = {}
    for key, (shape, model) in raw.items():
        factor = reference / model.median
        measured[key] = replace(shape, dense=scaled(shape.dense, factor), overhead=scaled(shape.overhead, factor),
                                factored=tuple(scaled(t, factor) for t in shape.factored))
    return model_ms, measured


def _copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


def _random(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """Small random values: zeros could meet a fast path that real weights never take."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.02 * torch.randn(p.shape, generator=generator))
    return module


def cache_dir() -> Path:
    """Where latency tables are cached: ``$LOWRANK_VIT_CACHE``, else ``$XDG_CACHE_HOME/lowrank_vit``, else
    ``~/.cache/lowrank_vit``; tables go in its ``latency`` folder."""
    root = os.environ.get("LOWRANK_VIT_CACHE")
    if root:
        return Path(root) / "latency"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lowrank_vit" / "latency"


def cache_path(model: nn.Module, *, batch: int, input_size: tuple[int, int, int], device: str, runtime: str,
               dtype: str, rank_step: int, name: str) -> Path:
    """The cached table's file: its name says what it holds, its hash everything the measurement depends on (the
    layer shapes, the machine, the software versions), so a changed version is a different file."""
    shapes = [(layer.in_features, layer.out_features, layer.bias is not None)
              for layer in _dense_layers(model).values()]
    key = json.dumps([shapes, batch, list(input_size), environment(device, runtime), runtime, dtype, rank_step],
                     sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return cache_dir() / f"{safe}-b{batch}-{device}-{runtime}-{dtype}-{digest}.json"


def cached_profile(model: nn.Module, *, batch: int, input_size: tuple[int, int, int] | None = None,
                   device: str = "cpu", runtime: str = "torch", dtype: str = "float32", rank_step: int = 8,
                   name: str | None = None, force: bool = False, **timing: Any) -> tuple[LatencyTable, Path, bool]:
    """The table from the cache when one was measured for this model, machine and software; else measured now and
    cached. Returns (table, its file, whether it was measured now)."""
    get_runtime(runtime).check(device, dtype)
    input_size = input_size or model_input_size(model)
    name = name or type(model).__name__
    path = cache_path(model, batch=batch, input_size=input_size, device=device, runtime=runtime, dtype=dtype,
                      rank_step=rank_step, name=name)
    if path.exists() and not force:
        try:
            return LatencyTable.load(path), path, False
        except ValueError:
            pass  # an unreadable cache entry is measured again
    table = profile_model(model, batch=batch, input_size=input_size, device=device, runtime=runtime, dtype=dtype,
                          rank_step=rank_step, name=name, **timing)
    return table, table.save(path), True


def plot_table(table: LatencyTable, path: str | Path) -> Path:
    """A figure of latency against rank for every shape: the factored form's median and quartiles, the dense
    layer's median as a line, the break-even rank marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(table.shapes.values())
    cols = min(len(shapes), 3)
    rows = -(-len(shapes) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, shape in zip(axes.flat, shapes, strict=False):  # spare axes are switched off below
        ranks = list(shape.ranks)
        ax.plot(ranks, [t.median for t in shape.factored], marker=".", label="factored (x U) V^T")
        ax.fill_between(ranks, [t.low for t in shape.factored], [t.high for t in shape.factored], alpha=0.25)
        ax.axhline(shape.dense.median, color="black", linestyle="--", label="dense")
        if shape.break_even():
            ax.axvline(shape.break_even(), color="tab:red", alpha=0.6, label=f"break-even r={shape.break_even()}")
        ax.set_title(f"{shape.in_features}->{shape.out_features}, {shape.rows} rows", fontsize=9)
        ax.set_xlabel("rank")
        ax.set_ylabel("ms")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(shapes):]:
        ax.axis("off")
    fig.suptitle(f"{table.model}, batch {table.batch}, {table.runtime} {table.dtype} on {table.device_name}",
                 fontsize=10)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def time_models(models: dict[str, nn.Module], *, batch: int, input_size: tuple[int, int, int], device: str = "cpu",
                runtime: str = "torch", dtype: str = "float32", fold: bool = True, repeats: int = 7,
                warmup: int = 2, min_time: float = 0.05, progress: bool = True) -> dict[str, Any]:
    """End-to-end time of every model on one batch, side by side (interleaved repeats), each in its deploy form: a
    copy with every low-rank Z folded into its factors (``fold``), in ``dtype`` on ``device`` under ``runtime``.
    Returns name -> :class:`~lowrank_vit.core.latency.Timing`."""

    rt = get_runtime(runtime)
    rt.check(device, dtype)
    target = torch.device(device)
    sync = (lambda: torch.cuda.synchronize(target)) if target.type == "cuda" else (lambda: None)
    images = torch.randn(batch, *input_size, generator=torch.Generator().manual_seed(0))
    calls = {}
    with tempfile.TemporaryDirectory(prefix="lowrank_vit_time_") as scratch:
        for name, model in models.items():
            deployed = _copy(model).eval()
            if fold:
                fold_lowrank_z_(deployed)
            calls[name] = rt.prepare(deployed, images, target, dtype, scratch)
        with progress_bar(repeats, f"timing b{batch} {runtime}", "repeat", progress) as bar:
            return interleaved_timings(calls, repeats=repeats, warmup=warmup, min_time=min_time, sync=sync,
                                       on_repeat=lambda _: bar.update(1))
