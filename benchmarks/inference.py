"""Inference latency and throughput of a factorized model against the same dense model.

    python benchmarks/inference.py --model deit_base --batch-size 1 32 --json results/inference_deit_base.json

The dense model (random weights: speed does not depend on the values) is compressed by ``lowrank_vit.compress`` at
every ``--reduction`` and every ``--rank-multiple`` (1: the paper's free ranks; 8: ranks aligned for fast matrix
products, ``CompressionConfig.rank_multiple``); then all models are timed in one process, interleaved (each repeat
visits every model, in a rotating order), after warm-up, and the median of the repeats is reported.
``flop_speedup`` is Appendix A's multiplication-count ratio over the compressed block linears,
``sum n k m / sum n (k + m)(r + q)`` (n tokens, the layers left dense counted at ``n k m``); ``model_flop_speedup``
is the same ratio for the whole forward pass (attention products, patch embedding and head included), from
``torch.utils.flop_counter``.

``fused_ms`` times the model after ``lowrank_vit.fold_lowrank_z_``: every low-rank Z folded into the main factors,
``[U G] [V Y]^T``, the same function with two matrix products per layer instead of four.

``--onnxruntime`` also exports the dense model and every compressed variant (folded where it has a low-rank Z) to
ONNX (``lowrank_vit.io.export``) and times them in onnxruntime on the CPU, interleaved the same way, with as many
intra-op threads as torch uses: ``ort_dense_ms``, ``ort_factorized_ms`` and ``ort_speedup`` beside PyTorch's.
"""

from __future__ import annotations

import copy
import math
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    ArgumentParser,
    ImageStream,
    UsageError,
    check_device,
    command_line,
    create_model,
    environment,
    format_table,
    fraction,
    input_shape,
    median,
    parse_model_kwargs,
    positive_int,
    resolve_model_name,
    smooth_images,
    timed,
    write_json,
)

from lowrank_vit import (  # noqa: E402
    CompressionConfig,
    FactorizedLinear,
    LowRankZ,
    RowSparseZ,
    SparseZ,
    compress,
    count_params,
    fold_lowrank_z_,
    get_adapter,
)
from lowrank_vit.config import ALLOCATIONS, DECOMPOSITIONS  # noqa: E402

DEFAULT_REDUCTIONS = (0.4, 0.5, 0.6)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="inference.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="timm model name or alias (deit_small, deit_base, ...)")
    parser.add_argument("--model-kwargs", default=None,
                        help="JSON object of extra timm.create_model arguments, e.g. a tiny ViT for tests")
    parser.add_argument("--reduction", type=fraction, nargs="+", default=list(DEFAULT_REDUCTIONS),
                        help="fractions of the parameters removed (default: 0.4 0.5 0.6)")
    parser.add_argument("--batch-size", type=positive_int, nargs="+", default=None,
                        help="batch sizes (default: 1 32 on cpu, 256 on cuda)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--repeats", type=positive_int, default=7, help="timed repeats per model (median reported)")
    parser.add_argument("--warmup", type=positive_int, default=2, help="untimed forward passes per model first")
    parser.add_argument("--min-time", type=float, default=0.3,
                        help="seconds each timed sample lasts at least (short forwards are looped)")
    parser.add_argument("--rank-multiple", type=positive_int, nargs="+", default=[1, 8],
                        help="compress once per value, every rank a multiple of it (default: 1 8, side by side)")
    parser.add_argument("--calib", type=positive_int, default=32, help="calibration images used to compress")
    parser.add_argument("--decomposition", default="whitened", choices=DECOMPOSITIONS,
                        help="how the factors are computed (default: the paper's whitened SVD, as in the recorded "
                             "results; speed depends on the ranks, not on how they were found)")
    parser.add_argument("--allocation", default="greedy", choices=ALLOCATIONS)
    parser.add_argument("--compensation", default="lowrank",
                        choices=("none", "lowrank", "diagonal", "sparse", "structured"))
    parser.add_argument("--threads", type=positive_int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--no-fused", action="store_true", help="skip the fused [U G][V Y]^T variant")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--onnxruntime", action="store_true",
                        help="also time the ONNX exports of the dense and compressed models in onnxruntime (CPU)")
    parser.add_argument("--json", default=None, metavar="PATH", help="write the results here")
    return parser


def layer_multiplications(layer: nn.Module, tokens: int) -> int:
    """Multiplications of one block linear on ``tokens`` input rows (Appendix A): ``n k m`` dense,
    ``n (k + m) r`` for U V^T plus the cost of Z for a factorized layer."""
    if isinstance(layer, nn.Linear):
        return tokens * layer.in_features * layer.out_features
    if not isinstance(layer, FactorizedLinear):
        raise TypeError(f"not a block linear: {type(layer).__name__}")
    k, m = layer.in_features, layer.out_features
    total = tokens * (k + m) * layer.rank
    z = layer.z
    if isinstance(z, LowRankZ):
        total += tokens * (k + m) * z.rank
    elif isinstance(z, SparseZ):
        total += tokens * z.nnz
    elif isinstance(z, RowSparseZ):
        total += tokens * z.rows.numel() * m
    return total


def tokens_per_layer(model: nn.Module, shape: tuple[int, int, int], device: str) -> dict[str, int]:
    """Input rows (tokens x batch) each compressible layer sees for one image (Swin stages differ)."""
    layers = get_adapter(model).compressible_layers(model)
    counts: dict[str, int] = {}
    handles = [layer.register_forward_hook(
        lambda mod, inputs, _out, name=name: counts.__setitem__(name, inputs[0].numel() // mod.in_features))
        for name, layer in layers.items()]
    try:
        with torch.inference_mode():
            model(smooth_images(1, shape, seed=0).to(device))
    finally:
        for handle in handles:
            handle.remove()
    return counts


def block_flop_speedup(dense: nn.Module, factorized: nn.Module, tokens: dict[str, int]) -> float:
    """Appendix A's ratio summed over every block linear: dense multiplications / factorized multiplications."""
    dense_layers = get_adapter(dense).compressible_layers(dense)
    before = sum(layer_multiplications(layer, tokens[name]) for name, layer in dense_layers.items())
    after = sum(layer_multiplications(factorized.get_submodule(name), tokens[name]) for name in dense_layers)
    return before / after


def model_flops(model: nn.Module, shape: tuple[int, int, int], device: str) -> int:
    """FLOPs of one image's forward pass as counted by ``torch.utils.flop_counter`` (matrix products, attention,
    convolutions)."""
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(smooth_images(1, shape, seed=0).to(device))
    return counter.get_total_flops()


def time_models(models: dict[str, nn.Module], images: torch.Tensor, device: str, repeats: int, warmup: int,
                min_time: float) -> dict[str, list[float]]:
    """Per-forward milliseconds of every model, ``repeats`` samples each, interleaved.

    Each sample loops the forward pass long enough to last ``min_time`` seconds (the loop count is chosen per
    model from the warm-up); repeat i visits the models starting from the i-th, so no model always runs first.
    """
    names = list(models)
    inner: dict[str, int] = {}
    with torch.inference_mode():
        for name, model in models.items():
            seconds = min(timed(lambda m=model: m(images), device) for _ in range(warmup))
            inner[name] = max(1, math.ceil(min_time / max(seconds, 1e-6)))
        samples: dict[str, list[float]] = {name: [] for name in names}
        for rep in range(repeats):
            for name in names[rep % len(names):] + names[: rep % len(names)]:
                model, loops = models[name], inner[name]

                def run(model: nn.Module = model, loops: int = loops) -> None:
                    for _ in range(loops):
                        model(images)

                samples[name].append(1000.0 * timed(run, device) / loops)
    return samples


def onnx_sessions(models: dict[str, nn.Module], shape: tuple[int, int, int], folder: str) -> dict[str, Any]:
    """onnxruntime sessions (CPU, torch's thread count) of the ONNX exports of ``models``, by the same names."""
    import onnxruntime as ort

    from lowrank_vit.io.export import export_onnx

    sessions = {}
    for name, model in models.items():
        path = export_onnx(model, Path(folder) / f"{name.replace('@', '_').replace('/', '_')}.onnx", shape)
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        sessions[name] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return sessions


def time_sessions(sessions: dict[str, Any], images: torch.Tensor, repeats: int, warmup: int,
                  min_time: float) -> dict[str, list[float]]:
    """Per-run milliseconds of every onnxruntime session, interleaved as :func:`time_models` does."""
    feed = {"images": images.detach().cpu().float().numpy()}
    names = list(sessions)
    inner = {}
    for name, session in sessions.items():
        seconds = min(timed(lambda s=session: s.run(None, feed), "cpu") for _ in range(warmup))
        inner[name] = max(1, math.ceil(min_time / max(seconds, 1e-6)))
    samples: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(repeats):
        for name in names[rep % len(names):] + names[: rep % len(names)]:
            session, loops = sessions[name], inner[name]

            def run(session: Any = session, loops: int = loops) -> None:
                for _ in range(loops):
                    session.run(None, feed)

            samples[name].append(1000.0 * timed(run, "cpu") / loops)
    return samples


def variant_key(reduction: float, multiple: int) -> str:
    """Name of one compressed variant in the timing table and in the JSON's ``layers``."""
    return f"{reduction}" if multiple == 1 else f"{reduction}/x{multiple}"


def run_benchmark(args: Any) -> dict[str, Any]:
    """Compress, time, and collect the rows of the result table."""
    device = check_device(args.device)
    model_name = resolve_model_name(args.model)
    kwargs = parse_model_kwargs(args.model_kwargs)
    if args.threads:
        torch.set_num_threads(args.threads)
    batch_sizes = args.batch_size or ([256] if device == "cuda" else [1, 32])
    variants = [(reduction, multiple) for reduction in dict.fromkeys(args.reduction)
                for multiple in dict.fromkeys(args.rank_multiple)]

    dense = create_model(model_name, kwargs, seed=args.seed, device=device)
    shape = input_shape(dense)
    params_dense = count_params(dense)
    tokens = tokens_per_layer(dense, shape, device)
    dense_flops = model_flops(dense, shape, device)

    models: dict[str, nn.Module] = {"dense": dense}
    info: dict[str, dict[str, Any]] = {}
    structures: dict[str, dict[str, Any]] = {}
    for reduction, multiple in variants:
        variant = variant_key(reduction, multiple)
        model = copy.deepcopy(dense)
        config = CompressionConfig(reduction=reduction, calib_samples=args.calib, decomposition=args.decomposition,
                                   allocation=args.allocation,
                                   compensation=args.compensation, gram_precision="float32", progress=False,
                                   seed=args.seed, rank_multiple=multiple)
        report = compress(model, ImageStream(args.calib, min(args.calib, 32), shape, seed=args.seed), config)
        models[f"factorized@{variant}"] = model
        structures[variant] = {
            name: {"in": layer.in_features, "out": layer.out_features, "rank": layer.rank,
                   "z_rank": layer.z.rank if isinstance(layer.z, LowRankZ) else None}
            if isinstance(layer, FactorizedLinear) else "dense"
            for name, layer in get_adapter(model).compressible_layers(model, include_factorized=True).items()}
        info[variant] = {
            "params_factorized": report.params_after,
            "achieved_reduction": report.reduction,
            "flop_speedup": block_flop_speedup(dense, model, tokens),
            "model_flop_speedup": dense_flops / model_flops(model, shape, device),
            "compress_s": sum(report.stage_seconds.values()),
        }
        if not args.no_fused and any(isinstance(getattr(m, "z", None), LowRankZ) for m in model.modules()):
            fused = copy.deepcopy(model)
            fold_lowrank_z_(fused)
            with torch.inference_mode():
                probe = smooth_images(2, shape, seed=1).to(device)
                info[variant]["fused_max_abs_diff"] = float((fused(probe) - model(probe)).abs().max())
            models[f"fused@{variant}"] = fused

    sessions: dict[str, Any] = {}
    if args.onnxruntime:
        deployed = {"dense": dense}
        for reduction, multiple in variants:  # the deployed form of each variant: folded where it has a low-rank Z
            variant = variant_key(reduction, multiple)
            deployed[f"factorized@{variant}"] = models.get(f"fused@{variant}", models[f"factorized@{variant}"])
        with tempfile.TemporaryDirectory(prefix="inference-onnx-") as onnx_dir:  # sessions keep the graphs
            sessions = onnx_sessions(deployed, shape, onnx_dir)
    rows = []
    for batch_size in batch_sizes:
        images = smooth_images(batch_size, shape, seed=args.seed + 1).to(device)
        samples = time_models(models, images, device, args.repeats, args.warmup, args.min_time)
        ort_samples = time_sessions(sessions, images, args.repeats, args.warmup, args.min_time) if sessions else {}
        dense_ms = median(samples["dense"])
        for reduction, multiple in variants:
            variant = variant_key(reduction, multiple)
            factorized_ms = median(samples[f"factorized@{variant}"])
            row: dict[str, Any] = {
                "model": model_name,
                "batch_size": batch_size,
                "reduction": reduction,
                "rank_multiple": multiple,
                "params_dense": params_dense,
                **{k: v for k, v in info[variant].items() if k != "compress_s"},
                "dense_ms": dense_ms,
                "factorized_ms": factorized_ms,
                "speedup": dense_ms / factorized_ms,
                "dense_img_per_s": 1000.0 * batch_size / dense_ms,
                "factorized_img_per_s": 1000.0 * batch_size / factorized_ms,
            }
            fused = samples.get(f"fused@{variant}")
            if fused:
                row["fused_ms"] = median(fused)
                row["fused_speedup"] = dense_ms / row["fused_ms"]
            if ort_samples:
                row["ort_dense_ms"] = median(ort_samples["dense"])
                row["ort_factorized_ms"] = median(ort_samples[f"factorized@{variant}"])
                row["ort_speedup"] = row["ort_dense_ms"] / row["ort_factorized_ms"]
            row["dense_samples_ms"] = samples["dense"]
            row["factorized_samples_ms"] = samples[f"factorized@{variant}"]
            rows.append(row)
    return {
        "benchmark": "inference",
        "command": command_line(),
        "environment": environment(device),
        "settings": {"repeats": args.repeats, "warmup": args.warmup, "min_time_s": args.min_time,
                     "calib_images": args.calib, "allocation": args.allocation, "compensation": args.compensation,
                     "model_kwargs": kwargs, "input_shape": list(shape), "seed": args.seed},
        "rows": rows,
        "layers": structures,
        "load_average_at_end": [round(v, 2) for v in os.getloadavg()],
    }


COLUMNS = [
    ("batch_size", "batch", "d"),
    ("reduction", "reduction", ".2f"),
    ("rank_multiple", "multiple", "d"),
    ("params_factorized", "params", ",d"),
    ("dense_ms", "dense ms", ".2f"),
    ("factorized_ms", "factorized ms", ".2f"),
    ("speedup", "speedup", ".2f"),
    ("flop_speedup", "flop speedup", ".2f"),
    ("model_flop_speedup", "model flop speedup", ".2f"),
    ("fused_ms", "fused ms", ".2f"),
    ("fused_speedup", "fused speedup", ".2f"),
    ("factorized_img_per_s", "img/s", ".1f"),
    ("ort_dense_ms", "ort dense ms", ".2f"),
    ("ort_factorized_ms", "ort factorized ms", ".2f"),
    ("ort_speedup", "ort speedup", ".2f"),
]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run from the command line; returns the JSON payload (for tests)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        payload = run_benchmark(args)
    except UsageError as exc:
        parser.error(str(exc))
    env = payload["environment"]
    print(f"{payload['rows'][0]['model']} on {env['device']} ({env['cpu']}, {env['torch_threads']} threads), "
          f"median of {args.repeats} interleaved repeats")
    print(format_table(payload["rows"], COLUMNS))
    if args.json:
        write_json(args.json, payload)
        print(f"wrote {args.json}")
    return payload


if __name__ == "__main__":
    main()
