"""Prototype (not part of the package): cheaper estimators of the calibration statistics, against exact ones.

    python benchmarks/estimators.py --model deit_small --calib 256 --heldout 128 \\
        --estimator exact exact+f32 range range+f32 range+f32+tokens:0.5 \\
        --json benchmarks/results/estimators_deit_small.json

The closed-form pipeline needs, per block linear, the weighted Gram matrix H = sum_i w_i X_i^T X_i (eq. 5). An
estimator name is ``HEAD[+MOD...]``:

* HEAD ``exact``: the package's ``collect_statistics`` (every layer's input Gram H); ``range``: the package with
  ``gram_space="auto"`` (layers with fewer outputs than inputs, fc2, accumulate their output Gram W^T H W, 1/16 of
  the work for DeiT's fc2; exact for the whitened decomposition, the low-rank Z and the errors);
* ``+f32``: float32 products (float64 running sum); the default is float64 products;
* ``+tokens:F``: every image contributes a random fraction F of its tokens (the same count per image, a fresh draw
  per layer and batch), scaled by 1/F so that the Gram matrix stays unbiased; the per-image weights w_i and tr(H)
  use all tokens. An estimator;
* ``+bf16``: bfloat16 products (rounded inputs; on a CPU torch also rounds the product to bfloat16). An estimator;
* ``+eigh`` (a proposed change to the decomposition stage, see :func:`eigh_svd`): the whitened SVD of the
  (k, m) matrix A W from the eigendecomposition of its smaller Gram matrix instead of LAPACK's SVD. Exact in exact
  arithmetic; in float64 a singular value s_i loses ~1e-16 s_1^2 / s_i^2 of relative accuracy, far from any rank
  that is kept.

``+tokens`` and ``+bf16`` run :func:`estimated_statistics` (this file) in place of
``lowrank_vit.methods.decompositions.collect_statistics`` (what the activation-statistics methods call) for one
``compress`` call; the others run the package's function.

Each row reports the same stage timings as ``compress_time.py`` and the held-out eq. 5 error: the mean over block
linears of ``tr(dW^T H_test dW) / N_test`` with H_test the *exact* float64 statistics of ``--heldout`` images that
calibration never saw, and dW = W - (U V^T + Z) of the compressed layer; ``heldout_vs_exact`` is that error relative
to the ``exact`` row's (the acceptance criterion of an estimator: within 1%).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
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

import lowrank_vit.core.decompose as decompose_module  # noqa: E402
import lowrank_vit.methods.decompositions as decompositions  # noqa: E402
from lowrank_vit import get_adapter  # noqa: E402
from lowrank_vit.config import recipe  # noqa: E402
from lowrank_vit.core.calibration import (  # noqa: E402
    LayerStats,
    Scratch,
    collect_statistics,
    image_weights,
    iter_calibration_images,
    output_energies,
    range_gram,
    squared_norms,
    symmetrize_upper,
    upper_gram_,
)
from lowrank_vit.core.decompose import weighted_error  # noqa: E402


@torch.no_grad()
def estimated_statistics(model: nn.Module, layers: dict[str, nn.Linear], batches: Iterable, num_images: int, *,
                         token_fraction: float = 1.0, product_dtype: torch.dtype = torch.float32,
                         want_mean: bool = False, sample_tokens: int = 0,
                         device: torch.device | None = None, progress: bool = True, seed: int = 0,
                         gram_precision: str = "float64", gram_space: str = "input") -> dict[str, LayerStats]:
    """``collect_statistics`` with a random ``token_fraction`` of every image's tokens (scaled by 1/F, so the Gram
    matrix stays unbiased) and products in ``product_dtype``; ``gram_space`` as the package's. Built from
    the package's own pieces (weights from all tokens, symmetric block product, float64 running sum). The extras
    (mean input, SGD token samples) are not estimated: asking for them falls back to the package's function."""
    if want_mean or sample_tokens:
        return collect_statistics(model, layers, batches, num_images, want_mean=want_mean,
                                  sample_tokens=sample_tokens, device=device, progress=progress, seed=seed,
                                  gram_precision=gram_precision, gram_space=gram_space)
    device = device or next(model.parameters()).device
    generator = torch.Generator(device="cpu").manual_seed(seed)
    output_side = {name for name, layer in layers.items()
                   if gram_space == "auto" and layer.out_features < layer.in_features}
    widths = {name: layer.out_features if name in output_side else layer.in_features for name, layer in layers.items()}
    grams = {name: torch.zeros(widths[name], widths[name], dtype=torch.float64, device=device) for name in layers}
    traces = dict.fromkeys(output_side, 0.0)
    counts = dict.fromkeys(layers, 0)
    buffers = Scratch()
    state = {"batch": 0}

    def make_hook(name: str):
        def hook(module: nn.Linear, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            batch = int(state["batch"])
            x = inputs[0].reshape(batch, -1, module.in_features)
            energy, y = output_energies(output, module.bias, batch, buffers)
            weights = image_weights(energy)
            rows = y if name in output_side else x
            if name in output_side:
                traces[name] += float(weights @ squared_norms(x))
            tokens = rows.shape[1]
            keep = tokens if token_fraction >= 1.0 else max(1, round(token_fraction * tokens))
            if keep < tokens:
                idx = torch.rand(batch, tokens, generator=generator).argsort(dim=1)[:, :keep].to(rows.device)
                rows = torch.gather(rows, 1, idx[:, :, None].expand(-1, -1, rows.shape[2]))
            scale = (weights * (tokens / keep)).sqrt().to(product_dtype)
            xs = (rows.to(product_dtype) * scale[:, None, None]).reshape(-1, rows.shape[2])
            product = upper_gram_(torch.zeros(xs.shape[1], xs.shape[1], dtype=product_dtype, device=xs.device), xs)
            if not torch.isfinite(product.diagonal()).all():
                raise ValueError(f"non-finite activations (NaN or inf) reach layer {name} during calibration")
            grams[name] += product
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
    stats = {}
    for name, layer in layers.items():
        gram = symmetrize_upper(grams[name])
        if name in output_side:
            stats[name] = LayerStats(gram=range_gram(layer.weight.detach().T, gram, traces[name]),
                                     num_images=counts[name], output_gram=gram, input_trace=traces[name])
        else:
            stats[name] = LayerStats(gram=gram, num_images=counts[name])
    return stats


DEFAULT_ESTIMATORS = ("exact", "exact+f32", "range", "range+f32", "range+f32+tokens:0.5")


@dataclass(frozen=True)
class Estimator:
    """A parsed estimator name (see the module docstring)."""

    space: str
    """"input" (HEAD exact) or "auto" (HEAD range)."""
    precision: str
    """"float64", "float32" or "bfloat16": the products' dtype."""
    token_fraction: float
    eigh: bool = False

    @property
    def estimated(self) -> bool:
        """Whether the statistics are an estimate (this file's function) rather than the package's exact ones."""
        return self.token_fraction < 1.0 or self.precision == "bfloat16"


def parse_estimator(text: str) -> Estimator:
    """The :class:`Estimator` of a name ``exact|range[+f32][+bf16][+tokens:F][+eigh]``.

    Raises:
        UsageError: not such a name.
    """
    head, *parts = text.split("+")
    if head not in ("exact", "range"):
        raise UsageError(f"bad --estimator {text!r}: start with exact or range, then optionally +f32, +bf16, "
                         "+tokens:F, +eigh")
    precision, kept, eigh = "float64", 1.0, False
    for part in parts:
        if part == "eigh":
            eigh = True
        elif part == "f32":
            precision = "float32"
        elif part == "bf16":
            precision = "bfloat16"
        elif part.startswith("tokens:"):
            try:
                kept = float(part.split(":", 1)[1])
            except ValueError:
                kept = -1.0
            if not 0.0 < kept <= 1.0:
                raise UsageError(f"bad token fraction in --estimator {text!r}: need 0 < F <= 1")
        else:
            raise UsageError(f"bad --estimator {text!r}: unknown part {part!r}")
    return Estimator("input" if head == "exact" else "auto", precision, kept, eigh)


def eigh_svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``truncated_svd``'s thin SVD ``matrix = P diag(s) R^T`` (float64, s descending) from the eigendecomposition of
    the smaller Gram matrix: for a tall (k, m) matrix B, ``B^T B = R diag(s^2) R^T`` and ``P = B R / s``. Two
    matrix products and an m x m ``eigh`` instead of a bidiagonalization of B: several times faster on a CPU.
    Directions with s_i below ~1e-7 s_1 (no kept rank comes near) get P columns of lower accuracy or zero."""
    B = matrix.double()
    if B.shape[0] < B.shape[1]:
        R, s, P = eigh_svd(B.T)
        return P, s, R
    lam, R = torch.linalg.eigh(B.T @ B)
    lam, R = lam.flip(0).clamp_min(0.0), R.flip(1)
    s = lam.sqrt()
    tiny = float(s[0]) * 1e-12 if s.numel() else 0.0
    P = (B @ R) / torch.where(s > tiny, s, torch.ones_like(s))
    P = torch.where(s > tiny, P, torch.zeros_like(P))
    return P, s, R


@contextlib.contextmanager
def patched_statistics(estimator: Estimator) -> Iterator[None]:
    """Make ``compress`` run with ``estimator``'s statistics (and its compensation shortcut)."""
    with contextlib.ExitStack() as stack:
        if estimator.eigh:
            original_svd = decompose_module.truncated_svd
            decompose_module.truncated_svd = eigh_svd
            stack.callback(setattr, decompose_module, "truncated_svd", original_svd)
        if estimator.estimated:
            original = decompositions.collect_statistics
            decompositions.collect_statistics = functools.partial(
                estimated_statistics, token_fraction=estimator.token_fraction,
                product_dtype=getattr(torch, estimator.precision))
            stack.callback(setattr, decompositions, "collect_statistics", original)
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
                        help="exact|range[+f32][+bf16][+tokens:F][+eigh], each a row (see the module docstring)")
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
    ("overhead_ratio_cpu", "(cpu time)", ".2f"),
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

    names = list(dict.fromkeys(args.estimator))
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for _ in range(args.repeats):  # each repeat visits every estimator: load drift spreads over all of them
        for name in names:
            estimator = parse_estimator(name)
            # the estimators approximate eq. 5's H: the paper's recipe (whitened SVD) is the one built on it
            config = recipe("paper", reduction=args.reduction, calib_samples=args.calib,
                            gram_precision="float64" if estimator.precision == "float64" else "float32",
                            gram_space=estimator.space, device=args.device, seed=args.seed, progress=False)
            with patched_statistics(estimator):
                figures, compressed = measure(dense, images, config, args.device)
            figures["heldout_eq5"] = heldout_error(dense, compressed, heldout)
            figures["heldout_logit_err"] = heldout_logit_error(dense, compressed, heldout_images, args.device)
            figures["load_average_1min"] = os.getloadavg()[0]
            runs[name].append(figures)
    rows = []
    for name, done in runs.items():
        estimator = parse_estimator(name)
        row: dict[str, Any] = {"model": model_name, "calib_images": args.calib, "heldout_images": args.heldout,
                               "estimator": name, "gram_space": estimator.space, "gram_precision": estimator.precision,
                               "token_fraction": estimator.token_fraction,
                               "exact_statistics": not estimator.estimated}
        row.update({key: median([run[key] for run in done]) for key in done[0]})
        for stage in STAGES:
            row[f"{stage}_x_forward"] = row[f"{stage}_s"] / row["calibration_forward_s"]
        row["overhead_ratio_runs"] = [run["overhead_ratio"] for run in done]
        rows.append(row)
    reference = next((r for r in rows if r["estimator"] == "exact"), rows[0])  # the package's default
    for row in rows:
        row["heldout_vs_exact"] = row["heldout_eq5"] / reference["heldout_eq5"] - 1.0
        row["within_1_percent"] = math.isfinite(row["heldout_vs_exact"]) and row["heldout_vs_exact"] <= 0.01
    payload = {"benchmark": "estimators", "command": command_line(), "environment": environment(args.device),
               "reference": reference["estimator"], "repeats": args.repeats, "rows": rows,
               "load_average_at_end": [round(v, 2) for v in os.getloadavg()]}
    print(f"{model_name}: {args.calib} calibration images, {args.heldout} held-out, reduction {args.reduction}")
    print(format_table(rows, COLUMNS))
    if args.json:
        write_json(args.json, payload)
        print(f"wrote {args.json}")
    return payload


if __name__ == "__main__":
    main()
