"""Wall time of every compression stage against the forward-pass floor, and peak memory against the number of images.

    python benchmarks/compress_time.py --model deit_small --calib 256 --gram-precision float64 float32 \\
        --json benchmarks/results/compress_time_deit_small.json
    python benchmarks/compress_time.py --model deit_small --peak-memory 256 1024

The forward pass over the calibration images is the floor no method can beat: every method must at least look at
every image once. It is timed here as a plain ``torch.no_grad()`` forward over the same lazily generated images, in
the same process, right before and right after ``compress`` (their mean is reported, so drift in a shared machine's
load cancels to first order). Then:

* ``statistics_s``: the calibration stage of ``compress`` minus that forward, i.e. what the hooks add (Gram products,
  per-image output energies, finiteness checks, the SGD solver's token samples);
* ``decomposition_s``, ``allocation_s``, ``compensation_s``, ``refit_s`` (0 without ``refit``), ``block_s`` (the
  block reconstruction; 0 without it), ``distill_s`` (the distillation, over ``distill_steps`` steps; 0 without it):
  ``CompressionReport.stage_seconds``;
* ``report_s``: the rest of ``compress`` (per-layer eq. 5 errors of the report, the layer swap);
* ``overhead_ratio``: (whole ``compress`` - forward) / forward;
* ``overhead_ratio_cpu``: the same ratio from the process's CPU time (all threads) instead of wall time: on a machine
  shared with other jobs it moves much less with their load than the wall-clock ratio (both are reported).

``--gram-space`` sets ``CompressionConfig.gram_space``: "auto" (the default) lets layers with fewer outputs than
inputs (fc2) accumulate their output Gram W^T H W instead of H where that gives the same decomposition, low-rank Z
and errors (see ``lowrank_vit/core/calibration.py``); "input" always accumulates H.

Sub-timings inside the stages (the whitening a Z needs, closed-form Z, SGD steps, the report's error evaluations)
are the report's own ``substage_seconds``; the decompositions
themselves (one call of the method's ``decompose`` per layer) are ``decomposition_s``. With ``--peak-memory N ...``
each N runs in a fresh subprocess that reads its own peak resident memory (``ru_maxrss``); the images are generated
one batch at a time, so the data set itself never counts.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    ArgumentParser,
    ImageStream,
    LabelledStream,
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
    synchronize,
    write_json,
)

from lowrank_vit import CompressionConfig, compress  # noqa: E402
from lowrank_vit.config import RECIPES, recipe, resolve_gram_precision  # noqa: E402
from lowrank_vit.methods.decompositions import get_method  # noqa: E402

STAGES = ("statistics", "decomposition", "allocation", "compensation", "refit", "block", "report")
"""Everything ``compress`` does besides the calibration forward, in order; their sum is the overhead."""

SUBTIMERS = {
    "whitening_for_z": "whitening",
    "closed_form_z": "closed_form_z",
    "svd_tail_z": "svd_tail_z",
    "sgd_fit": "sgd_fit",
    "report_errors": "report_errors",
    "swap": "swap",
}
"""Sub-timer name in the results -> its key in ``CompressionReport.substage_seconds`` (0 where not used)."""


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="compress_time.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="timm model name or alias (deit_small, deit_base, ...)")
    parser.add_argument("--model-kwargs", default=None,
                        help="JSON object of extra timm.create_model arguments, e.g. a tiny ViT for tests")
    parser.add_argument("--calib", type=positive_int, default=256, help="calibration images")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="calibration batch size")
    parser.add_argument("--reduction", type=fraction, default=0.5, help="fraction of the parameters removed")
    parser.add_argument("--recipe", nargs="+", default=["loss-aware", "paper"], choices=(*RECIPES, *VARIANTS),
                        help="named recipes timed side by side (lowrank_vit.config.RECIPES, and the VARIANTS below "
                             "such as loss-aware-bf16); default: the library's default and the paper's")
    parser.add_argument("--solver", nargs="+", default=["closed_form"], choices=("closed_form", "sgd"),
                        help="compensation solver(s); each is a row")
    parser.add_argument("--gram-precision", nargs="+", default=["recipe"], choices=("recipe", "float64", "float32"),
                        help="precision(s) of the Gram products; each is a row (default: each recipe's own)")
    parser.add_argument("--gram-space", nargs="+", default=["auto"], choices=("input", "auto"),
                        help="statistics of wide-input layers: their input Gram H, or (auto) their output Gram; "
                             "each is a row")
    parser.add_argument("--sgd-iterations", type=positive_int, default=2000,
                        help="SGD solver steps (its per-step time is reported, so fewer steps can be extrapolated)")
    parser.add_argument("--repeats", type=positive_int, default=1, help="repeats of every row (median reported)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--peak-memory", type=positive_int, nargs="+", default=None, metavar="N",
                        help="instead of timing: peak memory of compress for each number of images N, "
                             "each in a fresh subprocess")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, metavar="PATH", help="write the results here")
    parser.add_argument("--peak-child", default=None, help=argparse.SUPPRESS)
    return parser


def forward_floor(model: nn.Module, images: ImageStream, device: str) -> tuple[float, float]:
    """Wall and process-CPU seconds of a plain no-grad forward over every calibration image (image generation
    included, as in ``compress``)."""
    synchronize(device)
    start, cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        for batch in images:
            model(batch.to(device))
    synchronize(device)
    return time.perf_counter() - start, time.process_time() - cpu


VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "loss-aware-bf16": ("loss-aware", {"loss_pass_dtype": "bfloat16"}),
    "loss-aware-fast-bf16": ("loss-aware-fast", {"loss_pass_dtype": "bfloat16"}),
    # the default's pass under another likelihood of the same output (docs/any_output.md, Cost): one backward per
    # image whatever the likelihood, so the same time is expected
    "loss-aware-gaussian": ("loss-aware", {"likelihood": "gaussian"}),
    "loss-aware-bernoulli": ("loss-aware", {"likelihood": "bernoulli"}),
    # the block stage at a quarter of its steps, three times the step size (docs/loss_aware.md, "The Fisher metric")
    "loss-aware-block-short": ("loss-aware-block", {"block_steps": 25, "block_lr": 0.03}),
    # the distillation stage at an eighth and a quarter of its steps: every step does the same work, so the two rows'
    # difference is 16 steps' time, and what is left of the shorter one the stage's fixed part (its check's passes)
    # (docs/loss_aware.md, "Distillation on augmented calibration images")
    "loss-aware-distill-16": ("loss-aware-distill", {"distill_steps": 16}),
    "loss-aware-distill-32": ("loss-aware-distill", {"distill_steps": 32}),
}
"""Benchmark-only names for a library recipe with settings changed, timed beside the recipes themselves."""


def make_config(args: Any, solver: str, precision: str, calib: int, space: str = "input",
                recipe_name: str = "loss-aware") -> CompressionConfig:
    own = {} if precision == "recipe" else {"gram_precision": precision}
    if solver == "sgd":  # the SGD solver's own setting (a closed-form solver refuses it)
        own["sgd_iterations"] = args.sgd_iterations
    base, changed = VARIANTS.get(recipe_name, (recipe_name, {}))
    return recipe(base, reduction=args.reduction, calib_samples=calib, solver=solver, gram_space=space,
                  device=args.device, seed=args.seed, progress=False, **changed, **own)


def settings_of(args: Any) -> list[tuple[str, str, str, str]]:
    """Every (recipe, solver, gram precision, gram space) the command line asks for, in a stable order."""
    return [(name, solver, precision, space) for name in dict.fromkeys(args.recipe)
            for solver in dict.fromkeys(args.solver) for space in dict.fromkeys(args.gram_space)
            for precision in dict.fromkeys(args.gram_precision)]


def calibration_data(images: ImageStream, model: nn.Module, config: CompressionConfig) -> Any:
    """``images``, labelled where the config's method calibrates on labels (FWSVD, KFAC-SVD)."""
    if get_method(config.decomposition).needs_labels(config):
        return LabelledStream(images, model.num_classes)
    return images


def measure(dense: nn.Module, images: ImageStream, config: CompressionConfig,
            device: str) -> tuple[dict[str, float], nn.Module]:
    """One measurement: forward floor, compress a copy of ``dense``, forward floor again.

    Returns:
        The figures of one row, and the compressed copy.
    """
    model = copy.deepcopy(dense)
    with torch.no_grad():  # warm-up, so that one-time setup costs fall on neither side
        dense(next(iter(images)).to(device))
    before, before_cpu = forward_floor(dense, images, device)
    synchronize(device)
    data = calibration_data(images, dense, config)
    start, cpu = time.perf_counter(), time.process_time()
    report = compress(model, data, config)
    synchronize(device)
    total, total_cpu = time.perf_counter() - start, time.process_time() - cpu
    sub = {name: report.substage_seconds.get(key, 0.0) for name, key in SUBTIMERS.items()}
    after, after_cpu = forward_floor(dense, images, device)
    floor, floor_cpu = (before + after) / 2, (before_cpu + after_cpu) / 2
    stages = report.stage_seconds
    out = {
        "calibration_forward_s": floor,
        "calibration_forward_before_s": before,
        "calibration_forward_after_s": after,
        "statistics_s": stages["calibration"] - floor,
        "decomposition_s": stages["decomposition"],
        "allocation_s": stages["allocation"],
        "compensation_s": stages["compensation"],
        "refit_s": stages.get("refit", 0.0),
        "block_s": stages.get("block_reconstruction", 0.0),
        "distill_s": stages.get("distillation", 0.0),
        "distill_steps": config.distill_steps,
        "report_s": total - sum(stages.values()),
        "total_s": total,
        "overhead_ratio": (total - floor) / floor,
        "calibration_forward_cpu_s": floor_cpu,
        "total_cpu_s": total_cpu,
        "overhead_ratio_cpu": (total_cpu - floor_cpu) / floor_cpu,
        "params_after": report.params_after,
        "achieved_reduction": report.reduction,
        "mean_output_error": sum(layer.output_error for layer in report.layers) / len(report.layers),
    }
    out.update({f"{name}_s": seconds for name, seconds in sub.items()})
    if config.solver == "sgd" and sub["sgd_fit"] > 0:
        iterations = config.resolved_settings()["sgd_iterations"]
        out["sgd_s_per_iteration"] = sub["sgd_fit"] / iterations
        out["compensation_s_at_2000_iterations"] = stages["compensation"] + out["sgd_s_per_iteration"] * (
            2000 - iterations)
        out["overhead_ratio_at_2000_iterations"] = (total - floor + out["compensation_s_at_2000_iterations"]
                                                    - stages["compensation"]) / floor
    return out, model


def timing_rows(args: Any, model_name: str, kwargs: dict[str, Any]) -> list[dict[str, Any]]:
    """Every (solver, gram space, precision) setting, ``repeats`` times (each repeat visits every setting, so load
    drift on a shared machine spreads over all of them), medians of every figure."""
    dense = create_model(model_name, kwargs, seed=args.seed, device=args.device)
    shape = input_shape(dense)
    images = ImageStream(args.calib, args.batch_size, shape, seed=args.seed)
    settings = settings_of(args)
    runs: dict[tuple[str, str, str, str], list[dict[str, float]]] = {setting: [] for setting in settings}
    for _ in range(args.repeats):
        for name, solver, precision, space in settings:
            config = make_config(args, solver, precision, args.calib, space, name)
            figures = measure(dense, images, config, args.device)[0]
            figures["load_average_1min"] = os.getloadavg()[0]
            runs[(name, solver, precision, space)].append(figures)
    rows = []
    for (name, solver, precision, space), done in runs.items():
        row: dict[str, Any] = {"model": model_name, "recipe": name, "calib_images": args.calib,
                               "batch_size": args.batch_size, "solver": solver,
                               "gram_precision": resolve_gram_precision(
                                   make_config(args, solver, precision, args.calib, space, name),
                                   torch.device(args.device).type),
                               "gram_space": space, "reduction": args.reduction}
        if solver == "sgd":
            row["sgd_iterations"] = args.sgd_iterations
        row.update({key: median([run[key] for run in done]) for key in done[0]})
        for stage in STAGES:
            row[f"{stage}_x_forward"] = row[f"{stage}_s"] / row["calibration_forward_s"]
        row["repeats"] = args.repeats
        row["overhead_ratio_runs"] = [run["overhead_ratio"] for run in done]
        row["overhead_ratio_cpu_runs"] = [run["overhead_ratio_cpu"] for run in done]
        rows.append(row)
    return rows


def peak_child(args: Any, model_name: str, kwargs: dict[str, Any]) -> None:
    """Inside a fresh subprocess: compress once and write the peak resident memory to ``args.peak_child``."""
    dense = create_model(model_name, kwargs, seed=args.seed, device=args.device)
    shape = input_shape(dense)
    images = ImageStream(args.calib, args.batch_size, shape, seed=args.seed)
    with torch.no_grad():
        dense(next(iter(images)).to(args.device))
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    space = args.gram_space[0]
    config = make_config(args, args.solver[0], args.gram_precision[0], args.calib, space, args.recipe[0])
    compress(dense, calibration_data(images, dense, config), config)
    result = {"calib_images": args.calib, "recipe": args.recipe[0], "solver": args.solver[0],
              "gram_precision": args.gram_precision[0],
              "gram_space": space,
              "baseline_rss_mib": baseline,
              "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "compress_s": time.perf_counter() - start}
    result["compress_extra_rss_mib"] = result["peak_rss_mib"] - baseline
    if args.device == "cuda":
        result["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    Path(args.peak_child).write_text(json.dumps(result))


def memory_rows(args: Any, argv: Sequence[str]) -> list[dict[str, Any]]:
    """Run :func:`peak_child` in a fresh interpreter for every N and setting."""
    rows = []
    base = list(argv)
    for name, solver, precision, space in settings_of(args):
        for n in args.peak_memory:
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "peak.json"
                command = [sys.executable, str(Path(__file__).resolve()), *strip_options(base),
                           "--calib", str(n), "--recipe", name, "--solver", solver, "--gram-precision", precision,
                           "--gram-space", space, "--peak-child", str(out)]
                done = subprocess.run(command, capture_output=True, text=True)
                if done.returncode != 0:
                    raise RuntimeError(f"peak-memory run for N={n} failed:\n{done.stderr[-2000:]}")
                row = json.loads(out.read_text())
            rows.append({"model": args.model, **row})
    return rows


def memory_growth(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Peak at the largest N over peak at the smallest, per setting (1.0: memory does not grow with N)."""
    out = []

    def setting(r: dict[str, Any]) -> tuple[str, str, str, str]:
        return r.get("recipe", "paper"), r["solver"], r["gram_precision"], r.get("gram_space", "input")

    for key in dict.fromkeys(setting(r) for r in rows):
        same = [r for r in rows if setting(r) == key]
        if len(same) < 2:
            continue
        small = min(same, key=lambda r: r["calib_images"])
        large = max(same, key=lambda r: r["calib_images"])
        out.append({"recipe": key[0], "solver": key[1], "gram_precision": key[2], "gram_space": key[3],
                    "n_small": small["calib_images"],
                    "n_large": large["calib_images"], "peak_ratio": large["peak_rss_mib"] / small["peak_rss_mib"],
                    "extra_mib_small": small["compress_extra_rss_mib"],
                    "extra_mib_large": large["compress_extra_rss_mib"]})
    return out


def strip_options(argv: Sequence[str]) -> list[str]:
    """``argv`` without the options a peak-memory child sets itself (and without their values)."""
    drop = {"--calib", "--recipe", "--solver", "--gram-precision", "--gram-space", "--peak-memory", "--json",
            "--repeats", "--peak-child"}
    out: list[str] = []
    skipping = False
    for token in argv:
        if token.startswith("--"):
            name = token.split("=", 1)[0]
            skipping = name in drop
            if skipping:
                continue
        elif skipping:
            continue
        out.append(token)
    return out


TIME_COLUMNS = [
    ("recipe", "recipe", "s"),
    ("solver", "solver", "s"),
    ("gram_space", "space", "s"),
    ("gram_precision", "gram", "s"),
    ("calib_images", "images", "d"),
    ("calibration_forward_s", "forward s", ".1f"),
    ("statistics_s", "statistics s", ".1f"),
    ("decomposition_s", "decomposition s", ".1f"),
    ("allocation_s", "allocation s", ".2f"),
    ("compensation_s", "compensation s", ".1f"),
    ("refit_s", "refit s", ".1f"),
    ("block_s", "block s", ".1f"),
    ("distill_s", "distill s", ".1f"),
    ("report_s", "report s", ".1f"),
    ("total_s", "compress s", ".1f"),
    ("overhead_ratio", "overhead ratio", ".2f"),
    ("overhead_ratio_cpu", "(cpu time)", ".2f"),
    ("load_average_1min", "load", ".1f"),
]

MEMORY_COLUMNS = [
    ("solver", "solver", "s"),
    ("gram_space", "space", "s"),
    ("gram_precision", "gram", "s"),
    ("calib_images", "images", "d"),
    ("baseline_rss_mib", "RSS before MiB", ".0f"),
    ("peak_rss_mib", "peak RSS MiB", ".0f"),
    ("compress_extra_rss_mib", "compress extra MiB", ".0f"),
    ("compress_s", "compress s", ".1f"),
]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run from the command line; returns the JSON payload (for tests)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_device(args.device)
        model_name = resolve_model_name(args.model)
        kwargs = parse_model_kwargs(args.model_kwargs)
    except UsageError as exc:
        parser.error(str(exc))
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.peak_child:
        peak_child(args, model_name, kwargs)
        return {}
    payload: dict[str, Any] = {"benchmark": "compress_time", "command": command_line(),
                               "environment": environment(args.device),
                               "settings": {"model_kwargs": kwargs, "seed": args.seed, "device": args.device}}
    if args.peak_memory:
        rows = memory_rows(args, argv)
        payload["memory"] = rows
        print(f"{model_name}: peak resident memory of compress, one fresh process per row")
        print(format_table(rows, MEMORY_COLUMNS))
        payload["memory_growth"] = memory_growth(rows)
        for growth in payload["memory_growth"]:
            setting = f"{growth['recipe']}/{growth['solver']}/{growth['gram_space']}/{growth['gram_precision']}"
            print(f"{setting}: peak RSS at N={growth['n_large']} / "
                  f"N={growth['n_small']} = {growth['peak_ratio']:.3f} "
                  f"({growth['extra_mib_large'] - growth['extra_mib_small']:+.0f} MiB of compress's own memory)")
    else:
        rows = timing_rows(args, model_name, kwargs)
        payload["rows"] = rows
        env = payload["environment"]
        print(f"{model_name} on {env['device']} ({env['cpu']}, {env['torch_threads']} threads), "
              f"reduction {args.reduction}, median of {args.repeats} run(s)")
        print(format_table(rows, TIME_COLUMNS))
        for row in rows:
            if row["solver"] == "sgd" and row["sgd_iterations"] != 2000:
                print(f"sgd: {row['sgd_s_per_iteration'] * 1000:.1f} ms/step; at 2000 steps compensation would take "
                      f"{row['compensation_s_at_2000_iterations']:.0f} s, overhead ratio "
                      f"{row['overhead_ratio_at_2000_iterations']:.2f}")
    payload["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    if args.json:
        write_json(args.json, payload)
        print(f"wrote {args.json}")
    return payload


if __name__ == "__main__":
    main()
