"""Prototype (not part of the package): cheaper estimators of the calibration statistics, against exact ones.

    python benchmarks/estimators.py --model deit_small --calib 256 --heldout 128 \\
        --json benchmarks/results/estimators_deit_small.json

The closed-form pipeline needs, per block linear, the weighted Gram matrix H = sum_i w_i X_i^T X_i (eq. 5). Its exact
accumulation costs more than the calibration forward itself: the fc2 input is 4x wider than the others, so its Gram
product alone outweighs the block's four linears. The estimators here are drop-in replacements of
``lowrank_vit.pipeline.collect_statistics``, patched in for one ``compress`` call:

* ``fast``: the same exact statistics (float32 products, float64 running sum) with cheaper arithmetic around them:
  only the upper block triangle of the symmetric product X^T X is computed (about half the flops for the wide fc2
  input), the per-image output energies come from a float32 norm instead of a float64 copy of the output, and the
  finiteness check runs on the (k, k) product instead of on every input; ``fast64``: the same with float64 products;
* ``bf16``: as ``fast`` with bfloat16 products (rounded inputs, float32 accumulation inside the product, float64
  running sum), which avx512_bf16/AMX CPUs and every GPU run several times faster than float32;
* ``+tokens:F``: every image contributes a random fraction F of its tokens (the same count per image, a fresh draw
  per layer and batch), scaled by 1/F so that H stays unbiased; the per-image weights w_i use all tokens;
* ``+reuse`` (not a statistics estimator: a proposed change to the compensation stage, see
  :func:`reuse_whitened_svd`): the closed-form low-rank Z taken from the whitened SVD already computed, instead of a
  second SVD per layer. Exact.

Each row reports the same stage timings as ``compress_time.py`` and the held-out eq. 5 error: the mean over block
linears of ``tr(dW^T H_test dW) / N_test`` with H_test the *exact* float64 statistics of ``--heldout`` images that
calibration never saw, and dW = W - (U V^T + Z) of the compressed layer; ``heldout_vs_exact`` is that error relative
to the exact float64 statistics' (the acceptance criterion: within 1%).
"""

from __future__ import annotations

import contextlib
import functools
import math
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

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
    write_json,
)
from compress_time import STAGES, measure  # noqa: E402

import lowrank_vit.pipeline as pipeline  # noqa: E402
from lowrank_vit import CompressionConfig, get_adapter  # noqa: E402
from lowrank_vit.calibration import LayerStats, collect_statistics, iter_calibration_images  # noqa: E402
from lowrank_vit.decompose import Decomposition, weighted_error  # noqa: E402
from lowrank_vit.factorized import LowRankZ  # noqa: E402

_MIN_ENERGY = 1e-30


def symmetric_gram_(accumulator: torch.Tensor, xs: torch.Tensor, block: int) -> None:
    """Add the upper block triangle of ``xs^T xs`` to ``accumulator`` (float64): for k = 4 blocks of columns only 10
    of the 16 block products are computed, and ``symmetrize`` mirrors them at the end. Exact, about half the flops
    of a full product for wide inputs (BLAS has ``syrk`` for this; torch does not expose it)."""
    k = xs.shape[1]
    for start in range(0, k, block):
        stop = min(start + block, k)
        accumulator[start:stop, start:] += (xs[:, start:stop].T @ xs[:, start:]).double()


def symmetrize(upper: torch.Tensor) -> torch.Tensor:
    """The full symmetric matrix from an accumulator whose upper block triangle (diagonal blocks whole) is valid."""
    return torch.triu(upper) + torch.triu(upper, 1).T


@torch.no_grad()
def estimated_statistics(model: nn.Module, layers: dict[str, nn.Linear], batches: Iterable, num_images: int, *,
                         token_fraction: float = 1.0, product_dtype: torch.dtype = torch.float32, block: int = 384,
                         want_mean: bool = False, sample_tokens: int = 0, device: torch.device | None = None,
                         progress: bool = True, seed: int = 0, gram_precision: str = "float64",
                         ) -> dict[str, LayerStats]:
    """``collect_statistics`` with cheaper arithmetic (see the module docstring); same return value.

    Always: per-image output energies from a float32 norm (relative error ~1e-6, instead of a float64 copy of the
    output), the symmetric block product, and the finiteness check on the (k, k) product instead of every input.
    Optionally: a random ``token_fraction`` of every image's tokens (scaled by 1/F, so H stays unbiased) and a
    bfloat16 or float64 product. The extras (mean input, SGD token samples) are not estimated: asking for them falls
    back to the package's function.
    """
    if want_mean or sample_tokens:
        return collect_statistics(model, layers, batches, num_images, want_mean=want_mean,
                                  sample_tokens=sample_tokens, device=device, progress=progress, seed=seed,
                                  gram_precision=gram_precision)
    device = device or next(model.parameters()).device
    generator = torch.Generator(device="cpu").manual_seed(seed)
    state = {"batch": 0}
    grams = {name: torch.zeros(layer.in_features, layer.in_features, dtype=torch.float64, device=device)
             for name, layer in layers.items()}
    counts = dict.fromkeys(layers, 0)

    def make_hook(name: str):
        def hook(module: nn.Linear, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            batch = int(state["batch"])
            x = inputs[0].reshape(batch, -1, module.in_features)
            y = output if module.bias is None else output - module.bias
            energy = torch.linalg.vector_norm(y.reshape(batch, -1).float(), dim=1).double().pow(2)
            weights = torch.where(energy > _MIN_ENERGY, 1.0 / energy.clamp_min(_MIN_ENERGY), torch.zeros_like(energy))
            tokens = x.shape[1]
            keep = tokens if token_fraction >= 1.0 else max(1, round(token_fraction * tokens))
            if keep < tokens:
                idx = torch.rand(batch, tokens, generator=generator).argsort(dim=1)[:, :keep].to(x.device)
                x = torch.gather(x, 1, idx[:, :, None].expand(-1, -1, x.shape[2]))
            scale = (weights * (tokens / keep)).sqrt().to(product_dtype)
            xs = (x.to(product_dtype) * scale[:, None, None]).reshape(-1, module.in_features)
            before = grams[name].diagonal().sum()
            symmetric_gram_(grams[name], xs, block)
            if not torch.isfinite(grams[name].diagonal().sum() - before):
                raise ValueError(f"non-finite activations (NaN or inf) reach layer {name} during calibration")
            counts[name] += batch
        return hook

    was_training = model.training
    handles = [layer.register_forward_hook(make_hook(name)) for name, layer in layers.items()]
    try:
        model.eval()
        for images in iter_calibration_images(batches, num_images):
            state["batch"] = images.shape[0]
            model(images.to(device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {name: LayerStats(gram=symmetrize(grams[name]), num_images=counts[name]) for name in layers}


DEFAULT_ESTIMATORS = ("exact", "fast", "fast+tokens:0.5", "bf16", "bf16+tokens:0.5")

ESTIMATOR_DTYPES = {"exact": None, "fast": torch.float32, "fast64": torch.float64, "bf16": torch.bfloat16}
"""First part of an estimator name: the product's dtype ("exact": the package's own function; the others use the
symmetric product and float32 norms)."""


def parse_estimator(text: str) -> tuple[torch.dtype | None, float, bool]:
    """(product dtype or None for the package's function, token fraction, reuse the SVD for Z) of a name
    "exact|fast|fast64|bf16[+tokens:F][+reuse]".

    Raises:
        UsageError: not such a name.
    """
    head, *parts = text.split("+")
    if head not in ESTIMATOR_DTYPES:
        raise UsageError(f"bad --estimator {text!r}: use exact, fast, fast64 or bf16, optionally +tokens:F, +reuse")
    kept, reuse = 1.0, False
    for part in parts:
        if part == "reuse":
            reuse = True
        elif part.startswith("tokens:") and head != "exact":
            try:
                kept = float(part.split(":", 1)[1])
            except ValueError:
                kept = -1.0
            if not 0.0 < kept <= 1.0:
                raise UsageError(f"bad token fraction in --estimator {text!r}: need 0 < F <= 1")
        else:
            raise UsageError(f"bad --estimator {text!r}: unknown part {part!r}")
    return ESTIMATOR_DTYPES[head], kept, reuse


@contextlib.contextmanager
def reuse_whitened_svd() -> Iterator[None]:
    """Make ``compress`` take the closed-form low-rank Z from the decomposition it already has, instead of a second
    SVD: with A^T A = H_d and ``U V^T`` the rank-r truncation of ``A^-1 SVD(A W)``, ``A R = A W - A U V^T`` is the
    tail ``sum_{i>r} p_i s_i r_i^T`` of the same SVD, so its best rank-q part is triplets r+1..r+q and
    ``G = A^-1 P[:, r:r+q] sqrt(s)``, ``Y = R[:, r:r+q] sqrt(s)``: exactly what ``closed_form_z`` computes.

    Prototype wiring from outside the package: ``_decompose`` results are remembered by their Whitening (the same
    object reaches ``CompensationProblem``) and ``Decomposition.factors`` remembers the rank it was cut at.
    """
    by_whitening: dict[int, Decomposition] = {}
    cut: dict[int, int] = {}
    original_decompose, original_z = pipeline._decompose, pipeline.closed_form_z
    original_factors = Decomposition.factors

    def decompose(cfg: Any, weight: torch.Tensor, stats: Any, white: Any) -> Decomposition:
        result = original_decompose(cfg, weight, stats, white)
        if cfg.decomposition == "whitened" and white is not None:
            by_whitening[id(white)] = result
        return result

    def factors(self: Decomposition, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        cut[id(self)] = rank
        return original_factors(self, rank)

    def closed_form_z(kind: str, problem: Any, z_params: int) -> nn.Module:
        decomposition = by_whitening.get(id(problem.white))
        rank = cut.get(id(decomposition))
        k, m = problem.residual.shape
        q = z_params // (k + m)
        if kind != "lowrank" or rank is None or rank + q > decomposition.max_rank:
            return original_z(kind, problem, z_params)
        root = decomposition.singular_values[rank: rank + q].clamp_min(0).sqrt()
        z = LowRankZ(k, m, q)
        with torch.no_grad():
            z.G.copy_(decomposition.left[:, rank: rank + q] * root)
            z.Y.copy_(decomposition.right[:, rank: rank + q] * root)
        return z

    pipeline._decompose, pipeline.closed_form_z, Decomposition.factors = decompose, closed_form_z, factors
    try:
        yield
    finally:
        pipeline._decompose, pipeline.closed_form_z = original_decompose, original_z
        Decomposition.factors = original_factors


@contextlib.contextmanager
def patched_statistics(estimator: str) -> Iterator[None]:
    """Make ``compress`` run with ``estimator`` (see :func:`parse_estimator`)."""
    dtype, kept, reuse = parse_estimator(estimator)
    with contextlib.ExitStack() as stack:
        if reuse:
            stack.enter_context(reuse_whitened_svd())
        if dtype is not None:
            original = pipeline.collect_statistics
            pipeline.collect_statistics = functools.partial(estimated_statistics, token_fraction=kept,
                                                            product_dtype=dtype)
            stack.callback(setattr, pipeline, "collect_statistics", original)
        yield


@torch.no_grad()
def heldout_error(dense: nn.Module, compressed: nn.Module, heldout: dict[str, LayerStats]) -> float:
    """Mean over block linears of eq. 5 on held-out images: ``tr(dW^T H_test dW) / N_test``."""
    errors = []
    for name, stats in heldout.items():
        weight = dense.get_submodule(name).weight.detach().double().T
        layer = compressed.get_submodule(name)
        approx = layer.weight.detach().double().T if isinstance(layer, nn.Linear) else layer.dense_weight().double()
        errors.append(weighted_error(weight - approx.to(weight.device), stats.gram, stats.num_images))
    return sum(errors) / len(errors)


def heldout_logit_error(dense: nn.Module, compressed: nn.Module, images: ImageStream, device: str) -> float:
    """Mean over held-out images of ||f_c(x) - f(x)||^2 / ||f(x)||^2 on the model's output."""
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in images:
            batch = batch.to(device)
            reference, approx = dense(batch).double(), compressed(batch).double()
            total += float(((approx - reference).pow(2).sum(1) / reference.pow(2).sum(1).clamp_min(1e-30)).sum())
            count += batch.shape[0]
    return total / count


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="estimators.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--model-kwargs", default=None)
    parser.add_argument("--calib", type=positive_int, default=256)
    parser.add_argument("--heldout", type=positive_int, default=128, help="held-out images for the eq. 5 error")
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument("--reduction", type=fraction, default=0.5)
    parser.add_argument("--estimator", nargs="+", default=list(DEFAULT_ESTIMATORS),
                        help='"exact" (the package, once per --gram-precision), "fast", "fast64" or "bf16", '
                             'each optionally "+tokens:F"')
    parser.add_argument("--gram-precision", nargs="+", default=["float64", "float32"],
                        choices=("float64", "float32"), help='precision(s) tried with the "exact" estimator')
    parser.add_argument("--repeats", type=positive_int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, metavar="PATH")
    return parser


COLUMNS = [
    ("estimator", "statistics", "s"),
    ("calibration_forward_s", "forward s", ".1f"),
    ("statistics_s", "statistics s", ".1f"),
    ("decomposition_s", "decomposition s", ".1f"),
    ("compensation_s", "compensation s", ".1f"),
    ("report_s", "report s", ".1f"),
    ("overhead_ratio", "overhead ratio", ".2f"),
    ("statistics_x_forward", "statistics x fwd", ".2f"),
    ("heldout_eq5", "held-out eq.5", ".5f"),
    ("heldout_vs_exact", "vs exact", "+.2%"),
    ("heldout_logit_err", "held-out logits", ".5f"),
]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_device(args.device)
        for estimator in args.estimator:
            parse_estimator(estimator)
        model_name = resolve_model_name(args.model)
        kwargs = parse_model_kwargs(args.model_kwargs)
    except UsageError as exc:
        parser.error(str(exc))
    dense = create_model(model_name, kwargs, seed=args.seed, device=args.device)
    shape = input_shape(dense)
    images = ImageStream(args.calib, args.batch_size, shape, seed=args.seed)
    heldout_images = ImageStream(args.heldout, args.batch_size, shape, seed=args.seed + 7919)
    layers = get_adapter(dense).compressible_layers(dense)
    heldout = collect_statistics(dense, layers, heldout_images, args.heldout, progress=False,
                                 device=torch.device(args.device), gram_precision="float64")

    settings = []
    for estimator in dict.fromkeys(args.estimator):
        if estimator.split("+")[0] == "exact":
            settings += [(estimator, precision) for precision in args.gram_precision]
        else:
            settings.append((estimator, "float32"))
    rows = []
    for estimator, precision in settings:
        config = CompressionConfig(reduction=args.reduction, calib_samples=args.calib, gram_precision=precision,
                                   device=args.device, seed=args.seed, progress=False)
        runs = []
        for _ in range(args.repeats):
            with patched_statistics(estimator):
                figures, compressed = measure(dense, images, config, args.device)
            figures["heldout_eq5"] = heldout_error(dense, compressed, heldout)
            figures["heldout_logit_err"] = heldout_logit_error(dense, compressed, heldout_images, args.device)
            runs.append(figures)
        row: dict[str, Any] = {"model": model_name, "calib_images": args.calib, "heldout_images": args.heldout,
                               "estimator": f"{estimator} {precision}" if estimator.startswith("exact") else estimator,
                               "gram_precision": precision}
        row.update({key: median([run[key] for run in runs]) for key in runs[0]})
        for stage in STAGES:
            row[f"{stage}_x_forward"] = row[f"{stage}_s"] / row["calibration_forward_s"]
        rows.append(row)
    reference = next((r for r in rows if r["estimator"] == "exact float64"), rows[0])  # the package's default
    for row in rows:
        row["heldout_vs_exact"] = row["heldout_eq5"] / reference["heldout_eq5"] - 1.0
        row["within_1_percent"] = math.isfinite(row["heldout_vs_exact"]) and row["heldout_vs_exact"] <= 0.01
    payload = {"benchmark": "estimators", "command": command_line(), "environment": environment(args.device),
               "reference": reference["estimator"], "rows": rows}
    print(f"{model_name}: {args.calib} calibration images, {args.heldout} held-out, reduction {args.reduction}")
    print(format_table(rows, COLUMNS))
    if args.json:
        write_json(args.json, payload)
        print(f"wrote {args.json}")
    return payload


if __name__ == "__main__":
    main()
