"""Measured layer latencies and what the allocation does with them (issue: speed you can ship).

A factorized layer ``(x U) V^T`` does fewer multiplications than the dense ``x W`` below the equal-cost rank, but it
runs two thin matrix products and writes an extra (tokens x r) activation, so on a real device it can be slower than
the dense layer well below that rank (and a rank just past a multiple of 8 can cost a quarter of the speed,
benchmarks/README.md). A :class:`LatencyTable` holds, for one model on one device, runtime, precision and batch
size, the measured median time of every distinct layer shape dense and factored over a grid of ranks, and of the
whole dense model. From it:

* :func:`rank_limits`: the largest rank at which each layer is still faster factored than dense; the allocation never
  goes above it, so no compressed layer is slower than the layer it replaces (a layer whose every rank is slower stays
  dense);
* :func:`allocate_latency`: the ranks that lose the least (the allocation policy's own absolute losses, for the
  loss-aware method its predicted loss increase) under a budget of milliseconds rather than of parameters, over the
  profiled ranks (a multiple-choice knapsack, :func:`knapsack`);
* :func:`predicted_ms`: the end-to-end prediction, the dense model's time minus what each layer saves.

The table itself is plain data (JSON); measuring it is :mod:`lowrank_vit.speed`'s job. Torch only.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lowrank_vit.core.budget import Allocation, LayerBudget
from lowrank_vit.core.common import check_number
from lowrank_vit.core.files import atomic_write, strict_json

TABLE_FORMAT = 2
"""Version of the JSON layout and of how it is measured (2: every shape's run times the whole model too); a table of
another version is refused, and a cached one measured again."""


@dataclass(frozen=True)
class Timing:
    """The median of ``repeats`` interleaved samples of one form, in milliseconds, and their spread (the first and
    third quartiles)."""

    median: float
    low: float
    high: float
    repeats: int

    @classmethod
    def of(cls, samples: list[float]) -> Timing:
        if not samples:
            raise ValueError("a timing needs at least one sample")
        ordered = sorted(samples)
        return cls(_quantile(ordered, 0.5), _quantile(ordered, 0.25), _quantile(ordered, 0.75), len(ordered))

    def text(self) -> str:
        """``12.3 ms (IQR 12.1-12.9, 7 repeats)``: how every latency is printed."""
        return f"{self.median:.2f} ms (IQR {self.low:.2f}-{self.high:.2f}, {self.repeats} repeats)"

    def record(self) -> dict[str, float | int]:
        """How every latency is written in JSON (reports, ``profile --json``): the quartiles as q1 and q3."""
        return {"median": self.median, "q1": self.low, "q3": self.high, "repeats": self.repeats}


def _quantile(ordered: list[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default), on a sorted list."""
    position = q * (len(ordered) - 1)
    lo = math.floor(position)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (position - lo) * (ordered[hi] - ordered[lo])


@dataclass(frozen=True)
class ShapeLatency:
    """One distinct layer shape: ``rows`` input rows (tokens x batch) of width ``in_features`` to ``out_features``."""

    in_features: int
    out_features: int
    rows: int
    bias: bool
    dense: Timing
    ranks: tuple[int, ...]
    """The profiled ranks, increasing."""
    factored: tuple[Timing, ...]
    """The factored form ``(x U) V^T + b`` at each of ``ranks`` (a folded low-rank Z is this form at rank r + q)."""
    overhead: Timing | None = None
    """An identity on the same input in the same runtime, timed in the same run: what calling one layer on its own
    costs beyond its arithmetic (a runtime call, copying the input in and out), which the layer does not pay inside
    the whole model. Subtracted from every form before predicting the model's time."""

    @property
    def call_ms(self) -> float:
        return 0.0 if self.overhead is None else self.overhead.median

    @property
    def dense_ms(self) -> float:
        """The dense layer's time inside a model: its median less the call overhead."""
        return self.dense.median - self.call_ms

    @property
    def key(self) -> str:
        return shape_key(self.in_features, self.out_features, self.rows, self.bias)

    def factored_ms(self, rank: int) -> float:
        """Time at ``rank`` inside a model (the median less the call overhead): measured on the grid, linear between
        grid ranks, the first rank's time below it (thin products cost their launch and memory traffic more than
        their arithmetic: a smaller rank is not predicted faster than what was measured). A rank off the grid is an
        estimate; the latency allocation only picks grid ranks."""
        ranks, times = self.ranks, [t.median - self.call_ms for t in self.factored]
        if rank <= ranks[0]:
            return times[0]
        for r0, t0, r1, t1 in zip(ranks, times, ranks[1:], times[1:], strict=False):  # consecutive pairs
            if rank <= r1:
                return t0 + (t1 - t0) * (rank - r0) / (r1 - r0)
        if len(ranks) == 1:
            return times[0]
        slope = (times[-1] - times[-2]) / (ranks[-1] - ranks[-2])
        return times[-1] + max(slope, 0.0) * (rank - ranks[-1])

    def break_even(self) -> int:
        """The largest profiled rank whose factored form is faster than dense (0 if none is). The time grows with the
        rank, so the ranks below it are faster too, up to the measurement's noise and the dips at multiples of 8."""
        faster = [rank for rank, timing in zip(self.ranks, self.factored, strict=True)
                  if timing.median < self.dense.median]
        return max(faster, default=0)


def shape_key(in_features: int, out_features: int, rows: int, bias: bool) -> str:
    return f"{in_features}x{out_features}@{rows}{'+b' if bias else ''}"


@dataclass
class LatencyTable:
    """Layer latencies of one model at one batch size on one device, runtime and precision (see the module doc)."""

    model: str
    """What was profiled (an architecture name), for people."""
    batch: int
    device: str
    """"cpu" or "cuda"."""
    device_name: str
    """The processor's or the GPU's name: a table from another machine is refused."""
    runtime: str
    """"torch" or "onnxruntime"."""
    dtype: str
    threads: int
    versions: dict[str, str]
    """Software that decides the speed (torch, onnxruntime): a table from other versions is refused."""
    model_ms: Timing
    """The whole dense model's forward at ``batch``: the median over the shapes' runs, each of which timed it beside
    the layers (the layers' times are scaled to it, run by run)."""
    layers: dict[str, str]
    """Compressible layer name -> its shape key in ``shapes``."""
    shapes: dict[str, ShapeLatency]
    rank_step: int = 8
    format: int = TABLE_FORMAT

    # --------------------------------------------------------------------------------------------- persistence
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: tmp.write_text(strict_json(self.to_dict(), indent=1)))
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LatencyTable:
        if not isinstance(data, dict) or data.get("format") != TABLE_FORMAT:
            raise ValueError(f"not a latency table of this version (format {TABLE_FORMAT}): re-profile with "
                             f"`lowrank-vit profile`")
        try:
            shapes = {key: ShapeLatency(s["in_features"], s["out_features"], s["rows"], s["bias"],
                                        Timing(**s["dense"]), tuple(s["ranks"]),
                                        tuple(Timing(**t) for t in s["factored"]),
                                        None if s.get("overhead") is None else Timing(**s["overhead"]))
                      for key, s in data["shapes"].items()}
            table = cls(**{**data, "model_ms": Timing(**data["model_ms"]), "shapes": shapes})
        except (KeyError, TypeError) as exc:
            raise ValueError(f"latency table is malformed ({exc}): re-profile with `lowrank-vit profile`") from None
        for name, key in table.layers.items():
            if key not in table.shapes:
                raise ValueError(f"latency table is malformed: layer {name} has no measured shape {key}")
        return table

    @classmethod
    def load(cls, path: str | Path) -> LatencyTable:
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ValueError(f"latency table {path} does not exist (make one with `lowrank-vit profile`)") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"latency table {path} is not readable JSON ({exc})") from None
        return cls.from_dict(data)

    # ------------------------------------------------------------------------------------------------ checks
    def check_environment(self, here: dict[str, Any]) -> None:
        """Raise a ValueError unless the table was measured where ``here`` (:func:`lowrank_vit.speed.environment`'s
        fields: device, device_name, threads, versions) says we are now: a stale table is never used silently."""
        mine = {"device": self.device, "device_name": self.device_name, "threads": self.threads}
        for key, value in mine.items():
            if here.get(key) != value:
                raise ValueError(f"the latency table was measured with {key}={value!r}, this run has "
                                 f"{here.get(key)!r}: re-profile here (`lowrank-vit profile ... --device "
                                 f"{here.get('device')}`)")
        for name, version in self.versions.items():
            if here.get("versions", {}).get(name) != version:
                raise ValueError(f"the latency table was measured with {name} {version}, this run has "
                                 f"{here.get('versions', {}).get(name)}: re-profile (`lowrank-vit profile`)")

    def check_layers(self, layers: dict[str, tuple[int, int, bool]]) -> None:
        """Raise a ValueError unless every layer (name -> in, out, bias) is in the table with that shape."""
        missing = sorted(set(layers) - set(self.layers))
        if missing:
            raise ValueError(f"the latency table (of {self.model}) has no measurement for {len(missing)} of this "
                             f"model's layers, e.g. {missing[0]}: profile this model")
        for name, (k, m, bias) in layers.items():
            s = self.shapes[self.layers[name]]
            if (s.in_features, s.out_features, s.bias) != (k, m, bias):
                raise ValueError(f"the latency table's {name} is {s.in_features}x{s.out_features}, the model's is "
                                 f"{k}x{m}: profile this model")

    def shape_of(self, name: str) -> ShapeLatency:
        return self.shapes[self.layers[name]]


# ------------------------------------------------------------------------------------------------- allocation


def z_rank(layer: LayerBudget) -> int:
    """The rank a low-rank Z adds once folded (its z_params / (k + m)); 0 without Z."""
    return layer.z_params // layer.rank_step


def rank_limits(layers: list[LayerBudget], table: LatencyTable) -> dict[str, int]:
    """Per layer, the largest U V^T rank at which the layer (its low-rank Z folded in, rank r + q) is still faster
    than dense on the table's target: the profiled break-even rank minus Z's rank (0: keep it dense)."""
    return {layer.name: max(0, table.shape_of(layer.name).break_even() - z_rank(layer)) for layer in layers}


def layer_ms(layer: LayerBudget, table: LatencyTable, rank: int | None) -> float:
    """Predicted time of ``layer`` at ``rank`` (``None``: dense)."""
    shape = table.shape_of(layer.name)
    return shape.dense_ms if rank is None else shape.factored_ms(rank + z_rank(layer))


def predicted_ms(layers: list[LayerBudget], table: LatencyTable, ranks: dict[str, int | None]) -> float:
    """The whole model's predicted time: the dense model's measured time, minus each layer's dense time, plus its
    time at the allocated rank (attention products, norms and activations are unchanged by compression)."""
    saved = sum(layer_ms(layer, table, None) - layer_ms(layer, table, ranks.get(layer.name)) for layer in layers)
    return table.model_ms.median - saved


def latency_choices(layer: LayerBudget, table: LatencyTable) -> list[tuple[int | None, float, float]]:
    """(rank, milliseconds, loss) of every option of ``layer``: the profiled ranks (minus Z's rank) allowed by its
    ``max_rank``, and dense."""
    q = z_rank(layer)
    shape = table.shape_of(layer.name)
    ranks = [r - q for r in shape.ranks if 1 <= r - q <= layer.max_rank]
    return [(r, layer_ms(layer, table, r), layer.loss(r)) for r in ranks] + [(None, shape.dense_ms, 0.0)]


def fastest_ms(layers: list[LayerBudget], table: LatencyTable) -> float:
    """The fastest the model can be on this table: every layer at its fastest option."""
    saved = sum(layer_ms(layer, table, None) - min(ms for _, ms, _ in latency_choices(layer, table))
                for layer in layers)
    return table.model_ms.median - saved


def check_speedup(layers: list[LayerBudget], table: LatencyTable, target_speedup: float) -> None:
    """Raise a ValueError naming the largest reachable speedup unless ``target_speedup`` (> 1) is reachable."""
    check_number("target_speedup", target_speedup, "> 1")
    best = fastest_ms(layers, table)
    if best * target_speedup > table.model_ms.median:
        reachable = math.floor(100 * table.model_ms.median / best) / 100  # rounded down: reachable as printed
        raise ValueError(f"target_speedup={target_speedup:g} is out of reach on this latency table: with every "
                         f"layer at its fastest profiled rank the model is predicted at {best:.2f} ms against "
                         f"{table.model_ms.median:.2f} ms dense, at most {reachable:.2f}x (ask for that or less)")


def allocate_latency(layers: list[LayerBudget], table: LatencyTable, target_speedup: float,
                     resolution: int = 8192) -> Allocation:
    """The ranks minimizing the summed loss (each layer's ``loss(r)``, absolute units) subject to a predicted model
    time of at most ``model_ms / target_speedup``: the policy's loss priced per millisecond saved instead of per
    parameter, over the profiled ranks (:func:`knapsack`). ``Allocation.params`` is the parameters of the result."""
    check_speedup(layers, table, target_speedup)
    goal = table.model_ms.median / target_speedup
    fixed = table.model_ms.median - sum(layer_ms(layer, table, None) for layer in layers)
    choices = [latency_choices(layer, table) for layer in layers]
    picks = knapsack([[(ms, loss) for _, ms, loss in options] for options in choices], goal - fixed, resolution)
    ranks = {layer.name: options[i][0] for layer, options, i in zip(layers, choices, picks, strict=True)}
    params = sum(layer.params(ranks[layer.name]) for layer in layers)
    return Allocation(ranks, params, [{"target_ms": goal, "predicted_ms": predicted_ms(layers, table, ranks)}])


def knapsack(options: list[list[tuple[float, float]]], budget: float, resolution: int = 8192) -> list[int]:
    """One option per group, (cost, loss) each, minimizing the summed loss with the summed cost at most ``budget``: a
    dynamic program over the budget cut into ``resolution`` steps, every cost rounded *up* to whole steps, so the
    answer always fits the budget and loses at most what a budget smaller by one step per group would (exact on costs
    that are whole steps). Milliseconds are not integers, and an integer program over 48 layers x 80 ranks took
    minutes to prove optimality; this takes milliseconds. Returns each group's chosen index."""
    if budget < 0 or not all(options):
        raise ValueError("the latency allocation has no feasible choice (a negative budget or a layer without options)")
    size = resolution + 1
    step = budget / resolution if budget > 0 else math.inf

    def steps(cost: float) -> int:  # rounded up; with no budget at all, only what costs nothing fits
        return 0 if cost <= 0 else size if budget <= 0 else math.ceil(cost / step - 1e-9)

    best = np.zeros(size)  # best[b]: the least loss of the groups so far within b steps
    picks = []
    for group in options:
        costs = [steps(cost) for cost, _ in group]
        new = np.full(size, np.inf)
        choice = np.full(size, -1, dtype=np.int64)
        for index, ((_, loss), cost) in enumerate(zip(group, costs, strict=True)):
            if cost >= size:
                continue
            candidate = np.full(size, np.inf)
            candidate[cost:] = best[: size - cost] + loss
            better = candidate < new
            new[better], choice[better] = candidate[better], index
        best = new
        picks.append(choice)
    if not np.isfinite(best[-1]):
        raise ValueError("no combination of the profiled ranks fits the latency budget")
    chosen, remaining = [], resolution
    for group, choice in zip(reversed(options), reversed(picks), strict=True):
        index = int(choice[remaining])
        chosen.append(index)
        remaining -= steps(group[index][0])
    return chosen[::-1]


@dataclass
class LatencyReport:
    """What the report says about speed: the table's target and the predicted end-to-end time."""

    batch: int
    device: str
    runtime: str
    dtype: str
    dense_ms: float
    predicted_ms: float
    layers_ms: dict[str, float] = field(default_factory=dict)
    """Predicted time of every compressible layer as allocated."""

    @property
    def predicted_speedup(self) -> float:
        return self.dense_ms / self.predicted_ms


def latency_report(layers: list[LayerBudget], table: LatencyTable, ranks: dict[str, int | None]) -> dict[str, Any]:
    report = LatencyReport(table.batch, table.device, table.runtime, table.dtype, table.model_ms.median,
                           predicted_ms(layers, table, ranks),
                           {layer.name: layer_ms(layer, table, ranks.get(layer.name)) for layer in layers})
    return {**asdict(report), "predicted_speedup": report.predicted_speedup}
