"""What a registry row costs before it runs: FLOPs, memory and time of every stage, from the model's shapes and the
row's data sizes, with published peak throughputs per precision and an efficiency factor (``lowrank-vit plan NAME
--estimate``, ``lowrank-vit reproduce TABLE --dry-run --estimate``; docs/estimate.md).

Why. No full-scale row has run on the development machines; a researcher about to book GPU hours needs to know
whether a table takes an hour or a week, and whether float64 statistics on a consumer GPU (float64 at 1/32 to 1/64 of
float32) would dominate the compression. Everything here is a model of the cost, never a measurement: pure functions
of shapes and sizes. The model is built with timm on the meta device (no weights, no memory), so this module imports
torch and timm only, never Lightning (``plan`` is one of the CLI's Lightning-free commands).

Here, in order: the devices an estimate knows (``--gpu NAME``: published peak throughputs per precision, and how
well the eigensolvers and the calibration hooks use them; every figure in docs/estimate.md), the estimate as text
(durations, one row stage by stage, several rows and their total; every line labelled as an estimate, the warnings
after), and the stages' costs with the row's total and warnings. What is read off the model is in
:mod:`lowrank_vit.repro.modelshapes`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from lowrank_vit.config import CompressionConfig, resolve_gram_precision
from lowrank_vit.core.allocate import GreedySettings, get_policy
from lowrank_vit.core.common import settings_of
from lowrank_vit.methods.compensate import SgdSettings, get_z_kind
from lowrank_vit.methods.decompositions import anchors_blocks, get_method
from lowrank_vit.pipeline import statistics_space
from lowrank_vit.repro.modelshapes import LinearShape, ModelShapes, count_shapes, model_shapes
from lowrank_vit.repro.registry import Experiment, RunConfig
from lowrank_vit.repro.runner import row_config

GPU_HOOK_LATENCY_S = 1.2e-3
"""See :attr:`DeviceSpec.hook_latency_s`."""


@dataclass(frozen=True)
class DeviceSpec:
    """One device of the table: published peak throughputs (TFLOP/s, dense, no sparsity) and how well the
    eigensolvers use it."""

    label: str
    peak_tflops: dict[str, float]
    """Precision ("fp32", "tf32", "bf16", "fp64") -> peak TFLOP/s."""
    memory_gib: float
    eig_efficiency: float
    """Fraction of the float64 peak an eigendecomposition or SVD of a few hundred to a few thousand rows reaches:
    LAPACK on a CPU is blocked and fast; cuSOLVER's are memory-bound and sequential at these sizes."""
    eig_latency_s: float
    """Fixed cost of one eigendecomposition call (GPU solvers synchronize with the host several times per call)."""
    hook_latency_s: float = 0.0
    """Host time of the calibration hooks' per-batch work for one layer (small kernels, a finiteness check and norms
    read back to the host), which a GPU's short passes cannot hide: 1.2 ms per layer and (micro-)batch, fitted on
    DeiT-B on an H100 and checked on DeiT-S (docs/estimate.md); assumed for the other GPUs. Hidden behind the
    products on a CPU."""


DEVICES: dict[str, DeviceSpec] = {
    # NVIDIA datasheets (SXM parts where there are two); fp64 is the tensor-core DGEMM figure on A100 and H100
    "a100": DeviceSpec("NVIDIA A100 80GB", {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp64": 19.5}, 80, 0.05,
                       2e-3, GPU_HOOK_LATENCY_S),
    "h100": DeviceSpec("NVIDIA H100 SXM", {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "fp64": 66.9}, 80, 0.05,
                       2e-3, GPU_HOOK_LATENCY_S),
    "a6000": DeviceSpec("NVIDIA RTX A6000", {"fp32": 38.7, "tf32": 77.4, "bf16": 154.8, "fp64": 38.7 / 32}, 48,
                        0.05, 2e-3, GPU_HOOK_LATENCY_S),
    "rtx4090": DeviceSpec("NVIDIA GeForce RTX 4090", {"fp32": 82.6, "tf32": 82.6, "bf16": 165.2, "fp64": 82.6 / 64},
                          24, 0.05, 2e-3, GPU_HOOK_LATENCY_S),
    # two cores of a Zen 4 server CPU: AVX-512 runs on two 256-bit FMA pipes, 32 fp32 FLOPs a cycle a core, ~3 GHz
    "cpu": DeviceSpec("2 cores of a Zen 4 CPU", {"fp32": 0.192, "tf32": 0.192, "bf16": 0.384, "fp64": 0.096}, 16,
                      0.3, 0.0),
}
"""--gpu choices. Add a device by adding an entry; every figure is documented in docs/estimate.md."""


def get_device(name: str) -> DeviceSpec:
    """The device called ``name``.

    Raises:
        ValueError: an unknown name (the message lists the known ones).
    """
    try:
        return DEVICES[name]
    except KeyError:
        raise ValueError(f"unknown --gpu {name!r}; known: {', '.join(DEVICES)}") from None


def duration(seconds: float) -> str:
    """1.2 s, 3.4 min, 5.6 h, 7.8 days."""
    for limit, unit, scale in ((120, "s", 1), (7200, "min", 60), (172800, "h", 3600)):
        if seconds < limit:
            return f"{seconds / scale:.1f} {unit}"
    return f"{seconds / 86400:.1f} days"


def format_row(est: dict[str, Any]) -> str:
    """A row's estimate as text, every line labelled as an estimate."""
    lines = [f"{est['name']}: estimated {duration(est['total_seconds'])} on {est['devices']} x {est['device_label']} "
             f"({est['params']:,} parameters, {est['forward_gflops_per_image']:.2f} GFLOP per image forward)",
             f"  {'stage (estimated)':24s} {'TFLOP':>10s} {'time':>10s} {'memory GiB':>11s}  detail"]
    for s in est["stages"]:
        lines.append(f"  {s['name']:24s} {s['flops'] / 1e12:10.3f} {duration(s['seconds']):>10s} "
                     f"{s['memory_gib']:11.2f}  {s['detail']}")
    lines += [f"warning: {w}" for w in est["warnings"]]
    return "\n".join(lines)


def format_rows(data: dict[str, Any]) -> str:
    """One line per row and the total, labelled as estimates; the warnings after."""
    width = max((len(r["name"]) for r in data["rows"]), default=10)
    lines = [f"estimated cost on {data['devices']} x {data['device_label']} ({data['scale']} scale):"]
    for r in data["rows"]:
        lines.append(f"  {r['name']:{width}s}  estimated {duration(r['total_seconds']):>10s}  "
                     f"(compression {duration(r['compress_seconds'])})")
    lines.append(f"estimated total: {duration(data['total_seconds'])} for {len(data['rows'])} row(s)")
    lines += [f"warning: {w}" for w in data["warnings"]]
    return "\n".join(lines)


GEMM_EFFICIENCY = 0.4
"""Fraction of the peak a dense matrix product reaches in a whole pass (kernels of ViT size, framework overhead)."""
F64_SHARE_WARNING = 1 / 3
"""Float64 statistics above this share of the compression's time earn a warning naming the float32 override."""
GIB = 2 ** 30


DATASET_SIZES: dict[str, tuple[int, int | None]] = {
    "imagenet-1k": (1_281_167, 50_000),
    "mnist-5k": (5_000, None),
}
"""Data name -> (training images, validation images); None: the validation split is ``val_fraction`` of the
training images (the data module's split when the data has no validation split of its own)."""


_DTYPE_NAMES = {"fp64": "float64", "fp32": "float32"}


def statistics_precision(compression: CompressionConfig, device: str) -> str:
    """The table precision of the Gram products: what :func:`~lowrank_vit.config.resolve_gram_precision` gives the
    configured ``gram_precision`` on that device (an explicit value as it is; "auto": float32 on GPUs for every
    method, float64 on the CPU for the methods without a gradient pass), with IEEE float32 products as the runner
    leaves them."""
    device_type = "cpu" if device == "cpu" else "cuda"
    return {v: k for k, v in _DTYPE_NAMES.items()}[resolve_gram_precision(compression, device_type,
                                                                         float32_exact=True)]


def gemm_precision(device: str) -> str:
    """The precision of the forward and backward passes. The runner enables neither TF32 nor mixed precision, so
    torch multiplies in true float32 on every device."""
    return "fp32"


# ------------------------------------------------------------------------------------------------- the stages


@dataclass
class Stage:
    name: str
    flops: float
    seconds: float
    memory_gib: float
    detail: str = ""
    data_parallel: bool = False
    """Divided by --devices (the fine-tune's DDP); the others run whole on one process (rank zero compresses and
    hands the model to the fine-tune's processes, and alone evaluates)."""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "flops": self.flops, "seconds": self.seconds, "memory_gib": self.memory_gib,
                "detail": self.detail, "data_parallel": self.data_parallel, **self.extra}


def _gemm_seconds(flops: float, spec: DeviceSpec, precision: str) -> float:
    return flops / (spec.peak_tflops[precision] * 1e12 * GEMM_EFFICIENCY)


def _eig_seconds(flops: float, calls: int, spec: DeviceSpec) -> float:
    return flops / (spec.peak_tflops["fp64"] * 1e12 * spec.eig_efficiency) + calls * spec.eig_latency_s


def eigh_flops(n: int) -> float:
    """A symmetric eigendecomposition with vectors: tridiagonal reduction and back-transformation, ~9 n^3."""
    return 9.0 * n ** 3


def svd_flops(rows: int, cols: int) -> float:
    """A thin SVD with both factors (Golub-Van Loan's R-SVD): ~6 M n^2 + 20 n^3, n the smaller side."""
    big, small = max(rows, cols), min(rows, cols)
    return 6.0 * big * small ** 2 + 20.0 * small ** 3


def _narrow(layer: LinearShape, auto: bool) -> tuple[int, int]:
    """The widths of a layer's two statistics (input side, gradient side) under ``gram_space``: "auto" keeps both
    on the layer's narrow side (calibration.py / loss_aware_svd.py)."""
    if auto:
        narrow = min(layer.in_features, layer.out_features)
        return narrow, narrow
    return layer.in_features, layer.out_features


def _decomposition_cost(layer: LinearShape, method: Any, auto: bool) -> tuple[float, int]:
    """FLOPs and eigensolver calls of one layer's decomposition, by the method's declared capabilities."""
    k, m = layer.in_features, layer.out_features
    h, g = _narrow(layer, auto)
    if method.gradient_pass:  # two-sided (loss-aware): two whitenings and the eigenproblem of the whitened product
        return 2 * eigh_flops(h) + eigh_flops(min(h, g)) + 4.0 * k * m * min(k, m), 3
    if method.narrow_side_exact:  # whitened: the whitening of H, then the SVD of H^1/2 W
        return eigh_flops(h) + 4.0 * k * m * h + svd_flops(k, m), 2
    return svd_flops(k, m), 1  # plain, mean, ASVD, FWSVD, COMCAT: one SVD of a (scaled) weight


def _kept_fraction(shapes: ModelShapes, compression: CompressionConfig) -> float:
    """The fraction of the compressible linears' parameters (hence of their FLOPs: a rank-r factorization costs
    (k + m) r of both) that the target leaves."""
    replaced = sum(layer.in_features * layer.out_features for layer in shapes.layers)
    target = compression.target_params if compression.target_params is not None else \
        round((1.0 - compression.reduction) * shapes.params)
    return min(1.0, max(0.0, (replaced - (shapes.params - target)) / replaced)) if replaced else 1.0


def data_sizes(cfg: RunConfig) -> tuple[int, int]:
    """(training images, validation images) of the row's data.

    Raises:
        ValueError: data whose size the table does not know (a folder or hub dataset of your own).
    """
    key = cfg.data.name
    if key not in DATASET_SIZES:
        raise ValueError(f"cannot estimate: the size of the data {cfg.data.path or key!r} is unknown (known: "
                         f"{', '.join(DATASET_SIZES)})")
    train, val = DATASET_SIZES[key]
    if val is None:
        val = round(train * cfg.data.val_fraction)
        train -= val
    return train, val


def compress_stages(shapes: ModelShapes, cfg: RunConfig, device: str) -> list[Stage]:
    """Calibration forward (and backward), statistics, decompositions, allocation, compensation and the report's
    per-layer errors of one compression."""

    compression, spec = cfg.compression, get_device(device)
    assert compression is not None
    method = get_method(compression.decomposition)
    images = min(compression.calib_samples, cfg.data.calib_samples)
    batch = cfg.finetune.batch_size if cfg.finetune is not None else cfg.data.batch_size
    gemm = gemm_precision(device)
    params_gib = shapes.params * 4 / GIB
    stages, passes = _calibration_stages(shapes, compression, method, spec, images, batch, gemm, params_gib)
    auto = statistics_space(compression) == "auto"
    widths = []
    for layer in shapes.layers:
        h, g = _narrow(layer, auto)
        widths.append((layer, h))
        if method.gradient_pass:
            widths.append((layer, g))
    precision = statistics_precision(compression, device)
    # each batch's X^T X is formed on its upper block triangle: ~T w^2 multiply-adds of 2 FLOPs, halved
    flops = images * sum(layer.tokens * w * w for layer, w in widths)
    stats_memory = sum(8.0 * w * w for _, w in widths) / GIB
    if auto:  # a layer kept on its output side keeps its weight in float64 beside W^T H W (calibration.range_gram)
        stats_memory += sum(8.0 * layer.in_features * layer.out_features for layer in shapes.layers
                            if layer.in_features > layer.out_features) / GIB
    products = _gemm_seconds(flops, spec, precision)
    stages.append(Stage("statistics", flops, products + passes * len(shapes.layers) * spec.hook_latency_s,
                        params_gib + stats_memory, f"{len(widths)} Gram matrices, {_DTYPE_NAMES[precision]} products",
                        extra={"precision": _DTYPE_NAMES[precision], "products_seconds": products}))
    costs = [_decomposition_cost(layer, method, auto) for layer in shapes.layers]
    flops, calls = sum(c[0] for c in costs), sum(c[1] for c in costs)
    largest = max((max(layer.in_features, layer.out_features) for layer in shapes.layers), default=0)
    # every layer's float64 factors (k + m) x min(k, m) are held from its decomposition until the allocation has
    # decided all ranks: for ViT-L 3.2 GB, more than the statistics (10.7 GB resident at that point, measured)
    factors_memory = sum(8.0 * (layer.in_features + layer.out_features) * min(layer.in_features, layer.out_features)
                         for layer in shapes.layers) / GIB
    stages.append(Stage("decomposition", flops, _eig_seconds(flops, calls, spec),
                        params_gib + stats_memory + factors_memory + 4 * 8.0 * largest ** 2 / GIB,
                        f"{calls} eigendecompositions/SVDs of {len(shapes.layers)} layers, fp64"))
    stages += _allocation_stages(shapes, compression, spec, images, batch, gemm, params_gib)
    stages.append(_compensation(shapes, compression, spec, method, params_gib))
    # eq. 5's error of every layer twice (U V^T alone, then with Z): H (or W^T H W) times the residual
    flops = sum(2 * 2.0 * h * h * min(layer.in_features, layer.out_features)
                for layer, h in ((layer, _narrow(layer, auto)[0]) for layer in shapes.layers))
    stages.append(Stage("report", flops, _gemm_seconds(flops, spec, "fp64"), params_gib + stats_memory,
                        "per-layer output errors, fp64"))
    if compression.refit:
        stages.append(_refit(shapes, compression, spec, method, images, gemm, precision, params_gib))
    if compression.distill_steps:
        stages.append(_distillation(shapes, compression, spec, images, gemm, params_gib))
    return stages


def _calibration_stages(shapes: ModelShapes, compression: CompressionConfig, method: Any, spec: DeviceSpec,
                        images: int, batch: int, gemm: str, params_gib: float) -> tuple[list[Stage], int]:
    """The calibration forward, and the backward of the methods that need gradients; returns them and how many
    passes the statistics' hooks run per layer."""
    stages = [Stage("calibration forward", images * shapes.forward_flops,
                    _gemm_seconds(images * shapes.forward_flops, spec, gemm),
                    params_gib + batch * 2 * shapes.peak_output_bytes / GIB, f"{images} images, {gemm}")]
    passes = math.ceil(images / batch)  # the hooks run once per layer and batch (micro-batch with a backward)
    backward_images = 0
    if method.gradient_pass:  # gradients at the activations only (the weights' are never formed): ~ one forward
        backward_images = math.ceil(settings_of(compression, method.settings).grad_fraction * images)
    elif method.needs_labels(compression):  # FWSVD: a labelled gradient pass of its own first, weights' included
        backward_images = 2 * images
    if backward_images:
        flops = backward_images * shapes.forward_flops
        micro = min(batch, 32)  # collect_loss_statistics runs its backward in micro-batches of 32
        passes = math.ceil(images / micro)
        stages.append(Stage("calibration backward", flops, _gemm_seconds(flops, spec, gemm),
                            params_gib + micro * shapes.activation_bytes / GIB,
                            f"{min(backward_images, images)} images, {gemm}"))
    return stages, passes


def _allocation_stages(shapes: ModelShapes, compression: CompressionConfig, spec: DeviceSpec, images: int,
                       batch: int, gemm: str, params_gib: float) -> list[Stage]:
    """The allocation over every layer's spectrum (negligible), and the whole-model probes of the policies that
    measure (FLAR-SVD, LEMS)."""

    spectrum = sum(min(layer.in_features, layer.out_features) for layer in shapes.layers)
    # at most greedy_iterations passes over every layer's spectrum (Algorithm 1 at its default where another policy
    # is chosen, which sorts once): negligible
    flops = 20.0 * spectrum * settings_of(compression, GreedySettings).greedy_iterations
    stages = [Stage("allocation", flops, flops / (DEVICES["cpu"].peak_tflops["fp64"] * 1e12 * 0.01),
                    spectrum * 8 * 4 / GIB, f"{compression.allocation} over {spectrum:,} singular values, CPU")]
    policy = get_policy(compression.allocation)
    if policy.needs_probe:  # FLAR-SVD's and LEMS's measurements: whole forwards over the probe images
        own = settings_of(compression, policy.settings)
        forwards = policy.probe_forwards([(layer.in_features, layer.out_features) for layer in shapes.layers], own)
        probe_images = min(own.probe_images, images)
        flops = forwards * probe_images * shapes.forward_flops
        stages.append(Stage("allocation probes", flops, _gemm_seconds(flops, spec, gemm),
                            params_gib + batch * 2 * shapes.peak_output_bytes / GIB,
                            f"{forwards} forwards of {probe_images} images, {gemm}"))
    if policy.search is not None:  # COMCAT's search: training, before the statistics
        stages.append(_search_stage(shapes, compression, spec, images, gemm, params_gib))
    return stages


SEARCH_STEP_FORWARDS = 4.0
"""Forward-pass equivalents of one step of COMCAT's search or weight training: the model's forward and backward
(about three forwards) and the dense teacher's forward."""


def _search_stage(shapes: ModelShapes, compression: CompressionConfig, spec: DeviceSpec, images: int, gemm: str,
                  params_gib: float) -> Stage:
    """``allocation="comcat_search"``: ``search_rounds - 1`` search passes and ``search_rounds`` weight-training
    passes, each of ``search_steps`` / ``train_steps`` batches of ``search_batch_size`` images (one pass over the
    images when None); the teacher copy and AdamW's two moments beside the model."""
    own = settings_of(compression, get_policy(compression.allocation).settings)
    batch = own.search_batch_size
    per_pass = math.ceil(images / batch)
    steps = (own.search_rounds - 1) * (own.search_steps or per_pass) + own.search_rounds * (own.train_steps or per_pass)
    flops = SEARCH_STEP_FORWARDS * steps * batch * shapes.forward_flops
    memory = 4 * params_gib + batch * 3 * shapes.activation_bytes / GIB  # model, teacher, two moments; activations
    return Stage("search", flops, _gemm_seconds(flops, spec, gemm), memory,
                 f"COMCAT: {steps} steps of {batch} images over {own.search_rounds} rounds, {gemm}")


REFIT_FORWARDS = 3.5
"""Forward passes over the calibration images that the refit runs (lowrank_vit.core.refit), both streams together:
the dense stream every block once (one pass records its layers' inputs and advances its cache), the compressed
stream every block once to advance its cache and about one and a half times more in the early-stopped passes that
reach each of its layers."""


def _widest_block_inputs(layers: tuple[LinearShape, ...]) -> int:
    """The most input values per image that one block's compressible layers see together (the refit's record of the
    dense block), blocks as the adapter groups them (``LinearShape.block``)."""
    per_block: dict[str, int] = {}
    for layer in layers:
        per_block[layer.block] = per_block.get(layer.block, 0) + layer.tokens * layer.in_features
    return max(per_block.values(), default=0)


def _block_writers(layers: tuple[LinearShape, ...]) -> list[LinearShape]:
    """The last compressible layer of each block (a ViT block's fc2): the one ``refit_target="block"`` anchors to
    the block's output where the block's probe accepts it (the estimate counts every block's)."""
    last: dict[str, LinearShape] = {}
    for layer in layers:
        last[layer.block] = layer
    return list(last.values())


def _refit(shapes: ModelShapes, compression: CompressionConfig, spec: DeviceSpec, method: Any, images: int,
           gemm: str, precision: str, params_gib: float) -> Stage:
    """``CompressionConfig.refit``: the two streams' forwards, each layer's H_c and K on its input side, the solve
    for W* and the decomposition once more. Anchored (``refit_target="block"``): each block's last layer once more
    (the compressed block run past it to its output; the dense layer's outputs are recorded in the dense block's one
    pass, beside its inputs) and one more product, its inputs against E."""
    forward = REFIT_FORWARDS * images * shapes.forward_flops
    grams = images * sum(layer.tokens * 2.0 * 2 * layer.in_features ** 2 for layer in shapes.layers)
    anchored = anchors_blocks(compression)
    if anchored:
        writers = _block_writers(shapes.layers)
        forward += images * sum(layer.tokens * 2.0 * layer.in_features * layer.out_features for layer in writers)
        grams += images * sum(layer.tokens * 2.0 * layer.in_features * layer.out_features for layer in writers)
    solve = sum(2.0 * layer.in_features ** 3 for layer in shapes.layers)
    costs = [_decomposition_cost(layer, method, False) for layer in shapes.layers]  # H_c is kept whole
    flops, calls = sum(c[0] for c in costs) + solve, sum(c[1] for c in costs) + len(shapes.layers)
    seconds = (_gemm_seconds(forward, spec, gemm) + _gemm_seconds(grams, spec, precision)
               + _eig_seconds(flops, calls, spec))
    caches = 2 * images * max((layer.tokens * layer.in_features for layer in shapes.layers), default=0) * 4
    caches += images * _widest_block_inputs(shapes.layers) * 4  # the dense block's layer inputs, recorded at once
    if anchored:  # and, beside them, its last layer's outputs
        caches += images * max((layer.tokens * layer.out_features for layer in writers), default=0) * 4
    widest = max((layer.in_features for layer in shapes.layers), default=0)
    memory = 2 * params_gib + (caches + 3 * 8.0 * widest ** 2) / GIB  # the dense copy beside the compressed model
    return Stage("refit", forward + grams + flops, seconds, memory,
                 f"{REFIT_FORWARDS:g} forwards of {images} images{', each block anchored' if anchored else ''}, "
                 f"{2 * len(shapes.layers)} Gram matrices, {calls} solves and eigendecompositions")


def _distillation(shapes: ModelShapes, compression: CompressionConfig, spec: DeviceSpec, images: int, gemm: str,
                  params_gib: float) -> Stage:
    """``CompressionConfig.distill_steps``: every step the dense model's forward and the compressed model's forward
    and backward over ``distill_batch_size`` images (:data:`SEARCH_STEP_FORWARDS` forwards each), the loss on the
    calibration images before and after (both models) and the layers' errors on them. Memory: the dense model,
    the compressed one, its saved weights, its gradients and AdamW's two moments, and one micro-batch's activations
    (``distill_micro_batch`` images; dense parameters as the bound: the compressed model is smaller)."""
    steps, batch = compression.distill_steps, compression.distill_batch_size
    forwards = SEARCH_STEP_FORWARDS * steps * batch + 5 * images
    flops = forwards * shapes.forward_flops
    memory = 6 * params_gib + min(batch, compression.distill_micro_batch) * 3 * shapes.activation_bytes / GIB
    return Stage("distillation", flops, _gemm_seconds(flops, spec, gemm), memory,
                 f"{steps} steps of {batch} images (teacher forward, forward and backward), {gemm}")


def _compensation(shapes: ModelShapes, compression: CompressionConfig, spec: DeviceSpec, method: Any,
                  params_gib: float) -> Stage:
    if not get_z_kind(compression.compensation).fitted:
        return Stage("compensation", 0.0, 0.0, 0.0, "no Z")
    z_params = [compression.z_fraction * layer.in_features * layer.out_features for layer in shapes.layers]
    if compression.solver == "sgd":  # every layer's Z fitted on stored tokens: forward, backward and Adam per step
        sgd = settings_of(compression, SgdSettings)
        rows = sgd.sgd_batch_size * sgd.sgd_tokens_per_image
        flops = sgd.sgd_iterations * 6.0 * rows * sum(z_params)
        memory = compression.calib_samples * sgd.sgd_tokens_per_image * sum(
            layer.in_features + layer.out_features for layer in shapes.layers) * 4 / GIB
        return Stage("compensation", flops, _gemm_seconds(flops, spec, "fp32"), params_gib + memory,
                     f"SGD, {sgd.sgd_iterations} steps (a lower bound: small kernels run below the GEMM "
                     f"efficiency)")
    if get_z_kind(compression.compensation).is_more_rank and method.tail_is_lowrank_z:  # the SVD's next triplets
        flops = sum(2.0 * z for z in z_params)
        return Stage("compensation", flops, _gemm_seconds(flops, spec, "fp64"), params_gib,
                     "low-rank Z from the SVD's tail")
    flops = sum(eigh_flops(layer.in_features) + svd_flops(layer.in_features, layer.out_features)
                for layer in shapes.layers)
    calls = 2 * len(shapes.layers)
    return Stage("compensation", flops, _eig_seconds(flops, calls, spec), params_gib,
                 f"closed-form {compression.compensation} Z, fp64")


def finetune_stage(shapes: ModelShapes, cfg: RunConfig, device: str, devices: int, kept: float) -> Stage:
    """The partial fine-tune: every epoch a forward and a backward (input gradients through the whole model, even
    where its weights are frozen, and the trainable weights' gradients: ~3x the forward) over the training set, and
    with distillation the dense teacher's forward on the same images (and its weights in memory)."""
    finetune, spec = cfg.finetune, get_device(device)
    train, _ = data_sizes(cfg)
    steps_per_epoch = math.ceil(train / (finetune.batch_size * devices))
    steps = finetune.epochs * steps_per_epoch
    if finetune.max_steps is not None:
        steps = min(steps, finetune.max_steps)
    forward = shapes.forward_flops - shapes.compressible_flops * (1.0 - kept)
    teacher = shapes.forward_flops if finetune.distill > 0 else 0.0
    flops = (3.0 * forward + teacher) * steps * finetune.batch_size * devices
    memory = (shapes.params * (16 + (4 if teacher else 0))  # weights, grads, Adam (and the teacher's weights)
              + finetune.batch_size * shapes.activation_bytes) / GIB
    seconds = _gemm_seconds(flops, spec, gemm_precision(device)) / devices
    epochs = steps / steps_per_epoch
    return Stage("fine-tune", flops, seconds, memory,
                 f"{epochs:g} epoch(s) x {train:,} images, batch {finetune.batch_size} per device, "
                 + ("distilled from the dense model, " if teacher else "") +
                 f"{seconds / epochs if epochs else 0.0:.0f} s per epoch",
                 data_parallel=True, extra={"epochs": epochs, "steps": steps,
                                            "seconds_per_epoch": seconds / epochs if epochs else 0.0})


def vmeanba_stage(shapes: ModelShapes, cfg: RunConfig, device: str) -> Stage:
    """VMeanba's block choice: the dense reference, one pass per scan block switched alone (the impact scores) and
    the final KL over the calibration images, then (when it times) the dense and the switched model side by side at
    the latency batch. The scans themselves are elementwise work the FLOP count leaves out."""
    v, spec = cfg.vmeanba, get_device(device)
    images = v.calib_samples * (shapes.scan_blocks + 2)
    if v.timing or v.target_speedup is not None:
        images += 2 * v.repeats * v.latency_batch * 2  # each block's mixer (about a model's worth), then the model
    flops = images * shapes.forward_flops
    batch = max(256, 2 * cfg.data.batch_size)
    memory = (shapes.params * 4 + batch * 2 * shapes.peak_output_bytes) / GIB
    return Stage("vmeanba", flops, _gemm_seconds(flops, spec, gemm_precision(device)), memory,
                 f"{shapes.scan_blocks + 2} passes over {v.calib_samples:,} images"
                 + (f", timed {v.repeats}x at batch {v.latency_batch}" if images > v.calib_samples * (
                     shapes.scan_blocks + 2) else ""))


PRUNING_OPS_PER_WEIGHT = 10.0
"""Elementwise operations per pruned weight: its magnitude, the selection of the threshold (linear time), two
comparisons, a cumulative sum over the ties and the write of the zero."""


def pruning_stage(shapes: ModelShapes, cfg: RunConfig, device: str) -> Stage:
    """Magnitude pruning of the block linear weights: no pass over images, a few elementwise operations per weight
    (counted as FLOPs at the product rate, which flatters memory-bound work, but the stage is a fraction of a second
    either way). Memory: the weights, and beside them a float32 magnitude, a mask and an int64 running count of
    ties per pruned weight (all layers at once with one global threshold)."""
    p, spec = cfg.pruning, get_device(device)
    weights = sum(layer.in_features * layer.out_features for layer in shapes.layers)
    flops = PRUNING_OPS_PER_WEIGHT * weights
    largest = max((layer.in_features * layer.out_features for layer in shapes.layers), default=0)
    working = weights if p.scope == "global" else largest
    memory = (shapes.params * 4 + working * (4 + 1 + 8)) / GIB
    return Stage("pruning", flops, _gemm_seconds(flops, spec, gemm_precision(device)), memory,
                 f"{100 * p.sparsity:g}% of {weights:,} block weights by magnitude, {p.scope} scope")


def evaluation_stages(shapes: ModelShapes, cfg: RunConfig, device: str, kept: float,
                      dense_evaluated: bool) -> list[Stage]:
    """The runner's evaluations on rank zero: the dense model (unless an earlier row of the same model and data
    already did: it is cached per output directory), the compressed one before fine-tuning (when both happen), and
    the final model."""
    spec = get_device(device)
    _, val = data_sizes(cfg)
    batch = max(256, 2 * (cfg.finetune.batch_size if cfg.finetune is not None else cfg.data.batch_size))
    compressed = shapes.forward_flops - shapes.compressible_flops * (1.0 - kept)
    which = [] if dense_evaluated else [("evaluation dense", shapes.forward_flops)]
    if cfg.compression is not None and cfg.finetune is not None:
        which.append(("evaluation compressed", compressed))
    which.append(("evaluation final", compressed))
    memory = (shapes.params * 4 + batch * 2 * shapes.peak_output_bytes) / GIB
    return [Stage(name, val * f, _gemm_seconds(val * f, spec, gemm_precision(device)), memory,
                  f"{val:,} images") for name, f in which]


def estimate_row(exp: Experiment, scale: str = "full", *, device: str = "a100", devices: int = 1,
                 overrides: Iterable[str] = (), dense_evaluated: bool = False) -> dict[str, Any]:
    """The estimated cost of one row: its stages (each with ``flops``, ``seconds``, ``memory_gib``), the total and
    the warnings (float64 statistics dominating the compression, a stage above the device's memory).

    Raises:
        ValueError: an unknown device, ``devices`` below 1, data of unknown size, or a malformed override.
    """

    spec = get_device(device)
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        raise ValueError(f"--devices must be a positive integer, got {devices!r}")
    cfg = row_config(exp, scale, overrides)
    shapes = model_shapes(cfg.model)
    kept = 1.0 if cfg.compression is None else _kept_fraction(shapes, cfg.compression)
    stages: list[Stage] = []
    if cfg.vmeanba is not None:
        stages.append(vmeanba_stage(shapes, cfg, device))
    if cfg.pruning is not None:
        stages.append(pruning_stage(shapes, cfg, device))
    if cfg.compression is not None:
        stages += compress_stages(shapes, cfg, device)
    if cfg.finetune is not None:
        stages.append(finetune_stage(shapes, cfg, device, devices, kept))
    stages += evaluation_stages(shapes, cfg, device, kept, dense_evaluated)
    compress_seconds = sum(s.seconds for s in stages if s.name in COMPRESS_STAGES)
    out = {"name": exp.name, "scale": scale, "device": device, "device_label": spec.label, "devices": devices,
           "estimate": True, "model": cfg.model.name, "params": shapes.params,
           "forward_gflops_per_image": shapes.forward_flops / 1e9,
           "stages": [s.to_dict() for s in stages], "compress_seconds": compress_seconds,
           "total_seconds": sum(s.seconds for s in stages), "warnings": []}
    stats = next((s for s in stages if s.name == "statistics"), None)
    # the products' share: the hooks' host time does not depend on the precision
    if stats is not None and stats.extra["precision"] == "float64" and \
            stats.extra["products_seconds"] > F64_SHARE_WARNING * compress_seconds:
        share = stats.extra["products_seconds"] / compress_seconds
        out["warnings"].append(
            f"{exp.name}: float64 statistics are an estimated {100 * share:.0f}% of the "
            f"compression on {spec.label} (float64 at {spec.peak_tflops['fp64'] / spec.peak_tflops['fp32']:.3g}x "
            f"float32): consider --set compression.gram_precision=float32")
    for stage in stages:
        if stage.memory_gib > spec.memory_gib:
            out["warnings"].append(f"{exp.name}: {stage.name} needs an estimated {stage.memory_gib:.1f} GiB, more "
                                   f"than the {spec.memory_gib:g} GiB of {spec.label}")
    return out


COMPRESS_STAGES = ("vmeanba", "pruning", "calibration forward", "calibration backward", "statistics", "decomposition",
                   "allocation", "allocation probes", "search", "compensation", "report", "refit", "distillation")


def estimate_rows(exps: list[Experiment], scale: str = "full", *, device: str = "a100", devices: int = 1,
                  overrides: Iterable[str] = ()) -> dict[str, Any]:
    """Every row's estimate and the total, as ``reproduce`` would run them: one dense evaluation per model and data
    (the runner caches it in the output directory for the rows that follow)."""
    overrides = list(overrides)
    seen: set[str] = set()
    rows = []

    for exp in exps:
        cfg = row_config(exp, scale, overrides)
        key = json.dumps([cfg.to_dict()["model"], cfg.data.name, cfg.data.path], sort_keys=True, default=str)
        rows.append(estimate_row(exp, scale, device=device, devices=devices, overrides=overrides,
                                 dense_evaluated=key in seen and cfg.model.pretrained))
        seen.add(key)
    spec = get_device(device)
    return {"estimate": True, "device": device, "device_label": spec.label, "devices": devices, "scale": scale,
            "rows": rows, "total_seconds": sum(r["total_seconds"] for r in rows),
            "warnings": [w for r in rows for w in r["warnings"]]}


__all__ = [
    "DATASET_SIZES",
    "DEVICES",
    "DeviceSpec",
    "ModelShapes",
    "count_shapes",
    "estimate_row",
    "estimate_rows",
    "format_row",
    "format_rows",
    "get_device",
    "model_shapes",
    "statistics_precision",
]
