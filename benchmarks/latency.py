"""End-to-end speed of compressed models in their deploy form, parameter-targeted against latency-targeted, with
predicted beside measured latency.

    python benchmarks/latency.py --model deit_small --reduction 0.5 0.7 --target-speedup 1.5 2 \
        --batch-size 1 8 32 --runtime torch onnxruntime --json benchmarks/results/latency_deit_small_cpu.json

For every batch size and runtime (the library's: ``torch``, ``torch.compile``, ``onnxruntime``, as the CLI's
``--runtime``; :mod:`lowrank_vit.speed.runtimes`) the dense model (random weights: speed does not depend on the
values) is profiled first (``lowrank_vit.speed.cached_profile``: a layer latency table at that batch, in that runtime,
on this machine),
then compressed in three ways, all of them at ranks in multiples of 8:

* ``params@R``: the parameter target R alone, the allocation blind to speed (``latency_limit=False``);
* ``capped@R``: the same target with the table's cap, no layer given a rank slower than dense there;
* ``speed@S``: ``target_speedup=S``, the allocation spending its losses per millisecond saved.

The ranks come from plain SVD energies with the marginal allocation (no gradient pass: minutes instead of an hour
for DeiT-B on a CPU; speed depends on the ranks, not on how they were found). Every model is folded (a low-rank Z
into its factors; none here) and timed side by side with the dense one, interleaved, the median of ``--repeats``
with its quartiles. ``predicted_speedup`` is the table's prediction for the same model, ``flop_ratio`` Appendix A's
multiplication ratio over the block linears (``sum n k m / sum n (k + m) r``).
"""

from __future__ import annotations

import copy
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    ArgumentParser,
    ImageStream,
    UsageError,
    command_line,
    create_model,
    environment,
    format_table,
    fraction,
    input_shape,
    parse_model_kwargs,
    positive_int,
    resolve_model_name,
    write_json,
)

from lowrank_vit import CompressionConfig, FactorizedLinear, compress, count_params, get_adapter  # noqa: E402
from lowrank_vit.core.budget import LayerBudget  # noqa: E402
from lowrank_vit.core.latency import predicted_ms  # noqa: E402
from lowrank_vit.speed import RUNTIMES, cached_profile, time_models  # noqa: E402


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="latency.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="timm model name or alias (deit_small, deit_base, ...)")
    parser.add_argument("--model-kwargs", default=None, help="JSON object of extra timm.create_model arguments")
    parser.add_argument("--reduction", type=fraction, nargs="*", default=[0.5, 0.7],
                        help="parameter targets (default: 0.5 0.7)")
    parser.add_argument("--target-speedup", type=float, nargs="*", default=[1.5, 2.0],
                        help="latency targets (default: 1.5 2)")
    parser.add_argument("--batch-size", type=positive_int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--runtime", nargs="+", default=["torch"], choices=list(RUNTIMES),
                        help="what runs the models: the library's runtimes (lowrank_vit/speed/runtimes.py), as "
                             "lowrank-vit profile --runtime: torch (eager), torch.compile (inductor: every form "
                             "compiled once, slow to profile), cuda-graphs (eager captured in a CUDA graph), "
                             "onnxruntime (CPU)")
    parser.add_argument("--profile-runtime", default=None, choices=list(RUNTIMES),
                        help="the runtime of the layer profile that the latency-targeted allocations read "
                             "(default: each timed runtime's own; torch is far quicker to profile than "
                             "torch.compile, which compiles every form)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--repeats", type=positive_int, default=7, help="interleaved repeats (median reported)")
    parser.add_argument("--profile-repeats", type=positive_int, default=5, help="repeats of the layer profile")
    parser.add_argument("--min-time", type=float, default=0.2, help="seconds a timed sample lasts at least")
    parser.add_argument("--calib", type=positive_int, default=8, help="calibration images for compress")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch.set_num_threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, metavar="PATH")
    return parser


def flop_ratio(model: nn.Module, rows: dict[str, int]) -> float:
    """Appendix A over the block linears: dense multiplications / factorized ones (a folded Z is more rank)."""
    dense = factored = 0
    for name, layer in get_adapter(model).compressible_layers(model, include_factorized=True).items():
        k, m, n = layer.in_features, layer.out_features, rows[name]
        dense += n * k * m
        if isinstance(layer, FactorizedLinear):
            factored += n * (k + m) * (layer.rank + (getattr(layer.z, "rank", 0) if layer.z is not None else 0))
        else:
            factored += n * k * m
    return dense / factored


def budgets_of(model: nn.Module) -> tuple[list[LayerBudget], dict[str, int | None]]:
    """The compressed model's layers as the latency predictor sees them, and their ranks."""
    budgets, ranks = [], {}
    for name, layer in get_adapter(model).compressible_layers(model, include_factorized=True).items():
        z_rank = getattr(layer.z, "rank", 0) if isinstance(layer, FactorizedLinear) and layer.z is not None else 0
        budgets.append(LayerBudget(name, layer.in_features, layer.out_features,
                                   z_rank * (layer.in_features + layer.out_features), torch.zeros(1)))
        ranks[name] = layer.rank if isinstance(layer, FactorizedLinear) else None
    return budgets, ranks


def run_benchmark(args: Any) -> dict[str, Any]:
    model_name = resolve_model_name(args.model)
    kwargs = parse_model_kwargs(args.model_kwargs)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.reduction and not args.target_speedup:
        raise UsageError("give at least one --reduction or --target-speedup")
    for target in args.target_speedup:
        if not target > 1:
            raise UsageError(f"--target-speedup must be above 1, got {target}")
    dense = create_model(model_name, kwargs, seed=args.seed)
    shape = input_shape(dense)
    calib = ImageStream(args.calib, args.calib, shape, seed=args.seed)
    base = dict(decomposition="plain", allocation="marginal", compensation="none", rank_multiple=8,
                calib_samples=args.calib, progress=False, seed=args.seed)
    rows: list[dict[str, Any]] = []
    for runtime in args.runtime:
        for batch in args.batch_size:
            try:
                table, path, _ = cached_profile(dense, batch=batch, input_size=shape, device=args.device,
                                                runtime=args.profile_runtime or runtime, dtype=args.dtype,
                                                name=model_name,
                                                repeats=args.profile_repeats, progress=True)
            except ValueError as exc:
                raise UsageError(str(exc)) from None
            print(f"{runtime} batch {batch}: table {path}", file=sys.stderr)
            variants: dict[str, CompressionConfig] = {}
            for reduction in args.reduction:
                variants[f"params@{reduction:g}"] = CompressionConfig(
                    reduction=reduction, latency_table=str(path), latency_limit=False, **base)
                variants[f"capped@{reduction:g}"] = CompressionConfig(
                    reduction=reduction, latency_table=str(path), **base)
            for target in args.target_speedup:
                variants[f"speed@{target:g}"] = CompressionConfig(target_speedup=target, latency_table=str(path),
                                                                  **base)
            models: dict[str, nn.Module] = {"dense": dense}
            info: dict[str, dict[str, Any]] = {}
            for name, config in variants.items():
                model = copy.deepcopy(dense)
                try:
                    report = compress(model, calib, config)
                except ValueError as exc:  # an unreachable target on this table: recorded, not timed
                    info[name] = {"error": str(exc)}
                    continue
                models[name] = model
                budgets, ranks = budgets_of(model)
                info[name] = {"params": count_params(model), "reduction": report.reduction,
                              "flop_ratio": flop_ratio(model, {n: table.shape_of(n).rows for n in table.layers}),
                              "predicted_speedup": table.model_ms.median / predicted_ms(budgets, table, ranks),
                              "ranks": ranks}
            times = time_models(models, batch=batch, input_size=shape, device=args.device, runtime=runtime,
                                dtype=args.dtype, repeats=args.repeats, min_time=args.min_time)
            for name in variants:
                row = {"model": model_name, "runtime": runtime, "profile_runtime": args.profile_runtime or runtime,
                       "dtype": args.dtype, "batch_size": batch,
                       "variant": name, "table": path.name, "profiled_dense_ms": table.model_ms.median,
                       "dense_ms": times["dense"].median, **{k: v for k, v in info[name].items() if k != "ranks"}}
                if name in times:
                    t = times[name]
                    row.update(ms=t.median, ms_q1=t.low, ms_q3=t.high, repeats=t.repeats,
                               speedup=times["dense"].median / t.median)
                    row["predicted_error"] = row["predicted_speedup"] / row["speedup"] - 1
                    row["flop_efficiency"] = row["speedup"] / row["flop_ratio"]
                    row["ranks"] = info[name]["ranks"]
                rows.append(row)
    return {"benchmark": "latency", "command": command_line(), "environment": environment(args.device),
            "settings": {"repeats": args.repeats, "profile_repeats": args.profile_repeats, "min_time_s": args.min_time,
                         "calib_images": args.calib, "model_kwargs": kwargs, "input_shape": list(shape),
                         "seed": args.seed, "params_dense": count_params(dense), "compression": base},
            "rows": rows, "load_average_at_end": [round(v, 2) for v in os.getloadavg()]}


COLUMNS = [
    ("runtime", "runtime", "s"),
    ("batch_size", "batch", "d"),
    ("variant", "variant", "s"),
    ("reduction", "reduction", ".3f"),
    ("dense_ms", "dense ms", ".2f"),
    ("ms", "ms", ".2f"),
    ("speedup", "speedup", ".2f"),
    ("predicted_speedup", "predicted", ".2f"),
    ("flop_ratio", "flop ratio", ".2f"),
    ("flop_efficiency", "of flops", ".2f"),
]


def _ms(value: float) -> str:
    return f"{value:.2f}" if value < 10 else f"{value:.1f}" if value < 1000 else f"{value:.0f}"


def markdown(payload: dict[str, Any]) -> str:
    """The result as the Markdown table docs/speed.md shows (a test keeps the two equal)."""
    lines = ["| runtime | batch | variant | params removed | dense ms | ms (IQR) | speedup | predicted | FLOP ratio |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in payload["rows"]:
        head = f"| {row['runtime']} | {row['batch_size']} | {row['variant']} |"
        if "speedup" not in row:
            lines.append(f"{head} - | {_ms(row['dense_ms'])} | not reachable on this table | - | - | - |")
            continue
        lines.append(f"{head} {100 * row['reduction']:.1f}% | {_ms(row['dense_ms'])} | {_ms(row['ms'])} "
                     f"({_ms(row['ms_q1'])}-{_ms(row['ms_q3'])}) | **{row['speedup']:.2f}x** | "
                     f"{row['predicted_speedup']:.2f}x | {row['flop_ratio']:.2f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        payload = run_benchmark(args)
    except UsageError as exc:
        parser.error(str(exc))
    env = payload["environment"]
    print(f"{payload['rows'][0]['model']} on {env['device']} ({env['cpu']}, {env['torch_threads']} threads), "
          f"median of {args.repeats} interleaved repeats, deploy form")
    print(format_table(payload["rows"], COLUMNS))
    for row in payload["rows"]:
        if "error" in row:
            print(f"{row['runtime']} batch {row['batch_size']} {row['variant']}: {row['error']}")
    if args.json:
        write_json(args.json, payload)
        print(f"wrote {args.json}")
    return payload


if __name__ == "__main__":
    main()
