"""``make demo`` / ``lowrank-vit demo``: a miniature Table 2 that runs offline on a laptop CPU.

The smoke-scale DeiT-S stand-in (pretrained once on the embedded MNIST digits and cached) is compressed by our
method and by vanilla SVD + FT at -40/-50/-60%, each row fine-tuned the same short way, and the results are printed
beside the paper's ImageNet numbers, written to ``results/demo/table2.json`` and drawn (the paper's Fig. 1 and
Fig. 3, and the greedy allocation's ranks).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from lowrank_vit.core.calibration import collect_statistics
from lowrank_vit.core.decompose import plain_svd, weighted_error, whitened_svd, whitening
from lowrank_vit.nn.adapters import get_adapter
from lowrank_vit.repro.models import build_model
from lowrank_vit.repro.registry import Experiment, get_experiment, method_label
from lowrank_vit.repro.rows import read_result
from lowrank_vit.repro.runner import run_row
from lowrank_vit.repro.standins import COMMITTED_STANDINS, build_standin, install_standin, pretrain_standin

DEMO_ROWS = (
    "table2/deit_s/baseline",
    "table2/deit_s/vanilla-svd-ft-40",
    "table2/deit_s/ours-40",
    "table2/deit_s/loss-aware-40",
    "ablation/deit_s/vanilla-svd-ft-50",
    "table2/deit_s/ours-50",
    "table2/deit_s/loss-aware-50",
    "ablation/deit_s/vanilla-svd-ft-60",
    "table2/deit_s/ours-60",
    "table2/deit_s/loss-aware-60",
    "ablation/deit_s/vanilla-svd-ft-table3",
    "table3/deit_s/ours",
    "table3/deit_s/loss-aware",
)
"""Vanilla SVD + FT, the paper's recipe ("ours") and the library's loss-aware default at -40/-50/-60% and at Table 3's
DeiT-S target (-77%). The paper prints vanilla SVD + FT for DeiT-S at -40% only; the others are ablation rows."""
DEFAULT_OUTPUT = Path("results") / "demo"
PUBLISHED = Path("experiments") / "results" / "demo_table2"

"""``.json`` and ``.txt``: the committed copy of the demo's table (``make demo-refresh`` writes it); the README's
demo excerpt is the ``.txt`` between :data:`README_MARKERS`, and a test keeps the two equal."""
README_MARKERS = ("<!-- demo-table: made by `make demo-refresh`; do not edit by hand -->", "<!-- /demo-table -->")
REFRESH_COMMAND = "make demo-refresh"
METHOD_NAMES = {"baseline": "baseline", "ours": "ours", "vanilla": "vanilla", "loss-aware": "loss-aware"}
FIGURE_METHODS = ("ours", "vanilla", "loss-aware")
"""The methods whose per-layer errors and ranks the demo's figures draw (labels: ``registry.method_label``)."""


def _say(message: str, enabled: bool = True) -> None:
    if enabled:
        print(message, file=sys.stderr, flush=True)


def short_name(layer: str) -> str:
    """One naming of layers in every figure: ``blocks.6.attn.qkv`` -> ``b6.attn.qkv``."""
    return layer.replace("blocks.", "b", 1) if layer.startswith("blocks.") else layer


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s"


def demo_row(exp: Experiment, result: dict[str, Any]) -> dict[str, Any]:
    """One row of ``table2.json``: method "baseline" | "ours" | "vanilla" | "loss-aware", reduction a fraction, top-1
    in percent after fine-tuning and before it (``top1_noft``, None for the baseline), the mean eq. 5 residual
    error over the compressed layers right after compression (None for the baseline), parameter counts as
    integers, paper fields None where the paper has no such row."""
    paper = exp.paper
    compressed = result.get("compressed") or {}
    residual = result.get("residual_error")
    return {"name": exp.name, "method": METHOD_NAMES.get(exp.method, exp.method),
            "reduction": float(exp.reduction or 0.0), "params": int(result["params"]), "top1": float(result["top1"]),
            "top1_noft": None if compressed.get("top1") is None else float(compressed["top1"]),
            "residual": None if residual is None else float(residual),
            "paper_params": None if paper.params_m is None else round(paper.params_m * 1e6),
            "paper_top1": paper.top1}


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows laid out like the paper's Table 2 (one line per method and ratio), paper beside measured."""
    labels = ["baseline" if r["method"] == "baseline" else
              f"{method_label(r['method'])} -{round(100 * r['reduction'])}%" for r in rows]
    width = max([len("method"), *map(len, labels)])
    header = (f"{'method':<{width}s} {'paper params':>12s} {'paper top-1':>11s} | {'params':>9s} {'no FT':>6s} "
              f"{'top-1':>6s} {'vs baseline':>11s} {'residual':>9s}")
    base = next((r["top1"] for r in rows if r["method"] == "baseline"), None)
    lines = ["DeiT-S, Tables 2 and 3 (paper: ImageNet; measured: the smoke stand-in on MNIST-5k).",
             "\"no FT\": top-1 right after compression; top-1: after the partial fine-tune; residual: mean eq. 5 "
             "output error", "of the compressed layers on the calibration images, right after compression.",
             header, "-" * len(header)]
    for label, r in zip(labels, rows, strict=True):
        paper_params = "—" if r["paper_params"] is None else f"{r['paper_params'] / 1e6:.1f}M"
        paper_top1 = "—" if r["paper_top1"] is None else f"{r['paper_top1']:.2f}"
        noft = "" if r.get("top1_noft") is None else f"{r['top1_noft']:.2f}"
        delta = "" if base is None or r["method"] == "baseline" else f"{r['top1'] - base:+.2f}"
        residual = "" if r.get("residual") is None else f"{r['residual']:.2e}"
        lines.append(f"{label:<{width}s} {paper_params:>12s} {paper_top1:>11s} | {r['params']:>9,d} {noft:>6s} "
                     f"{r['top1']:>6.2f} {delta:>11s} {residual:>9s}".rstrip())
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- figures


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: works without a display
    import matplotlib.pyplot as plt

    return plt


@torch.no_grad()
def energy_curves(model: torch.nn.Module, calib: Iterable, num_images: int, block: int | None = None,
                  damping: float = 1e-4) -> dict[str, dict[str, list[float]]]:
    """Fig. 1's data for the four linears of one block (default: the middle one): per rank r, the fraction of
    energy kept by plain SVD of W and by the activation-aware (whitened) SVD, and the eq. 5 output error each
    truncation leaves on the calibration images."""

    blocks = list(get_adapter(model).layers_by_block(model).values())
    layers = blocks[len(blocks) // 2 if block is None else block]
    stats = collect_statistics(model, layers, calib, num_images, progress=False)
    out = {}
    for name, layer in layers.items():
        W = layer.weight.detach().double().T  # (in, out) as in the paper
        s = stats[name]
        curves: dict[str, list[float]] = {}
        for kind, dec in (("plain", plain_svd(W)), ("whitened", whitened_svd(W, whitening(s.gram, damping)))):
            curves[f"{kind}_energy_kept"] = (1 - dec.energy_losses()).tolist()
            errors = [weighted_error(W, s.gram, s.num_images)]
            for rank in range(1, dec.max_rank + 1):
                U, V = dec.factors(rank)
                errors.append(weighted_error(W - U @ V.T, s.gram, s.num_images))
            curves[f"{kind}_output_error"] = errors
        out[name] = curves
    return out


def plot_energy(curves: dict[str, dict[str, list[float]]], path: Path) -> Path:
    plt = _pyplot()
    fig, axes = plt.subplots(2, len(curves), figsize=(3.6 * len(curves), 6.4), squeeze=False)
    for col, (name, c) in enumerate(curves.items()):
        top, bottom = axes[0][col], axes[1][col]
        for kind, style, label in (("plain", "--", "plain SVD of W"), ("whitened", "-", "activation-aware SVD")):
            top.plot(c[f"{kind}_energy_kept"], style, label=label)
            bottom.semilogy([max(v, 1e-12) for v in c[f"{kind}_output_error"]], style, label=label)
        top.set_title(short_name(name), fontsize=9)
        top.set_ylabel("energy kept (own spectrum)")
        bottom.set_ylabel("output error, eq. 5")
        bottom.set_xlabel("rank")
        top.grid(alpha=0.3)
        bottom.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"Energy vs rank in {short_name(next(iter(curves))).split('.')[0]} (cf. the paper's Fig. 1)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _per_layer_axes(layers: list[dict[str, Any]]):
    """A figure wide enough for one tick per layer, labelled with the layers' short names."""
    plt = _pyplot()
    names = [short_name(layer["name"]) for layer in layers]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(names)) + 2.5, 4.0))  # + the legend's width
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=90, fontsize=7)
    return fig, ax


def _save(fig, ax, path: Path, title: str) -> Path:
    ax.set_title(title, fontsize=10, wrap=True)
    # beside the axes, not over the data: tight_layout makes room for it
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


def plot_layer_errors(methods: dict[str, list[dict[str, Any]]], path: Path, title: str) -> Path:
    """Each method's eq. 5 output error per layer at one ratio (log scale); where a method adds Z, its error
    before compensation too (dashed), the paper's Fig. 3. A layer a method left dense has no point."""
    first = next(iter(methods.values()))
    fig, ax = _per_layer_axes(first)
    order = [layer["name"] for layer in first]
    for i, (label, layers) in enumerate(methods.items()):
        by_name = {layer["name"]: layer for layer in layers}
        color = f"C{i}"

        def series(key: str, _by_name: dict = by_name) -> list[float]:
            return [_by_name[n][key] if _by_name.get(n, {}).get("rank") is not None else float("nan") for n in order]

        after, before = series("output_error"), series("output_error_lowrank")
        ax.plot(range(len(order)), after, "o-", color=color, markersize=3, label=label)
        changed = any(abs(b - a) > 1e-3 * a for a, b in zip(after, before, strict=True) if a == a)  # a == a: not NaN
        if changed:  # this method's Z lowered the error: show the error before it
            ax.plot(range(len(order)), before, ":", color=color, label=f"{label}: U Vᵀ alone, before Z")
    ax.set_yscale("log")
    ax.set_ylabel("normalized output error, eq. 10")
    ax.grid(alpha=0.3)
    return _save(fig, ax, path, title)


def plot_ranks(methods: dict[str, list[dict[str, Any]]], path: Path, title: str) -> Path:
    """Grouped bars: the rank every method kept in every layer (its full rank behind, in grey)."""
    first = next(iter(methods.values()))
    fig, ax = _per_layer_axes(first)
    full = [min(layer["in_features"], layer["out_features"]) for layer in first]
    ax.bar(range(len(first)), full, color="0.88", label="full rank")
    width = 0.8 / max(1, len(methods))
    for i, (label, layers) in enumerate(methods.items()):
        by_name = {layer["name"]: layer for layer in layers}
        ranks = [by_name[layer["name"]]["rank"] if by_name.get(layer["name"], {}).get("rank") is not None else f
                 for layer, f in zip(first, full, strict=True)]
        ax.bar([x - 0.4 + width * (i + 0.5) for x in range(len(first))], ranks, width=width, label=label)
    ax.set_ylabel("rank kept")
    return _save(fig, ax, path, title)


def make_figures(output: Path, rows: Sequence[str], scale: str = "smoke", overrides: Iterable[str] = ()) -> list[Path]:
    """The three PNGs; the allocation and error figures come from the first "ours" row that finished."""
    from lowrank_vit.stages.data import build_datamodule

    paths = []
    ours = [name for name in rows if get_experiment(name).method == "ours" and read_result(output / name)]
    base_exp = get_experiment(ours[0] if ours else rows[0])
    cfg = base_exp.config(scale).override(overrides)
    model = build_model(cfg.model, progress=False)
    dm = build_datamodule(cfg.data, model)
    dm.setup("fit")
    calib = cfg.compression.calib_samples if cfg.compression else cfg.data.calib_samples
    curves = energy_curves(model, dm.calibration_dataloader(), calib)
    (output / "energy_vs_rank.json").write_text(json.dumps(curves))
    paths.append(plot_energy(curves, output / "energy_vs_rank.png"))
    if ours:
        # -60% when there are the demo's ratios (ours-40/50/60, Table 3's): the ratio where the methods separate
        name = ours[len(ours) // 2]
        ratio = get_experiment(name).reduction
        methods = {}  # the same ratio's rows of every method that finished
        for row in rows:
            exp, result = get_experiment(row), read_result(output / row)
            if exp.method in FIGURE_METHODS and exp.reduction == ratio and result and result.get("report"):
                methods[method_label(exp.method)] = result["report"]["layers"]
        pct = round(100 * ratio)
        paths.append(plot_layer_errors(methods, output / "output_error_per_layer.png",
                                       f"Output error per layer at -{pct}% (cf. the paper's Fig. 3)"))
        paths.append(plot_ranks(methods, output / "ranks_per_layer.png", f"Ranks kept per layer at -{pct}%"))
    return paths


# ------------------------------------------------------------------------------------------------------- demo


def run_demo(output: str | os.PathLike = DEFAULT_OUTPUT, *, rows: Sequence[str] = DEMO_ROWS,
             overrides: Iterable[str] = (), wandb: str = "offline", force: bool = False, figures: bool = True,
             progress: bool = True, standins: str | os.PathLike | None = COMMITTED_STANDINS,
             retrain: bool = False) -> dict[str, Any]:
    """Run the demo rows (skipping those already finished with the same config), then write the table, the JSON
    and the figures. The stand-in is the one in ``standins`` (the project's committed weights) when it is there,
    else the cached or a newly trained one; ``retrain`` trains it anew whatever is there. Returns ``{"rows": [...],
    "table": str, "figures": [...], "seconds": float, "standin": "committed" | "cached" | "retrained"}``."""
    output = Path(output)
    overrides = list(overrides)
    exps = [get_experiment(name) for name in rows]
    started = time.perf_counter()
    standin = None
    if any(e.smoke.model.pretrained for e in exps) and "model.pretrained=false" not in overrides:
        standin, changed = _prepare_standin(exps[0].smoke.model.name, standins, retrain, progress)
        force = force or changed  # rows finished with other weights of the same recipe: their results are stale
    results = []
    done_times: dict[bool, list[float]] = {True: [], False: []}  # rows with / without compression and fine-tune

    def expected(e: Experiment) -> float | None:
        same = done_times[e.smoke.compression is not None]
        return sum(same) / len(same) if same else None

    for i, exp in enumerate(exps, 1):
        remaining = [expected(e) for e in exps[i - 1:]]
        eta = "" if None in remaining else f", about {_clock(sum(remaining))} left"
        _say(f"demo: row {i}/{len(exps)} {exp.name} ({_clock(time.perf_counter() - started)} elapsed{eta})", progress)
        t = time.perf_counter()
        result = run_row(exp, "smoke", output=output, overrides=overrides, wandb=wandb, force=force,
                         progress=progress, group="demo")
        done_times[exp.smoke.compression is not None].append(time.perf_counter() - t)
        results.append(demo_row(exp, result))
    table = format_table(results)
    (output / "table2.json").write_text(json.dumps(results, indent=2) + "\n")
    (output / "table2.txt").write_text(table + "\n")
    paths = make_figures(output, rows, overrides=overrides) if figures else []
    seconds = time.perf_counter() - started
    print(table)
    _say(f"demo: {len(results)} rows in {_clock(seconds)}; table {output / 'table2.json'}, figures "
         f"{', '.join(p.name for p in paths) or 'none'} in {output}; wandb runs (group 'demo') under "
         f"{output}/<row>/wandb" + (f" — `find {output} -type d -name 'offline-run-*' -exec wandb sync {{}} +` "
                                    f"uploads them" if wandb == "offline" else ""), progress)
    return {"rows": results, "table": table, "figures": [str(p) for p in paths], "seconds": seconds,
            "standin": standin}


def _prepare_standin(arch: str, standins: str | os.PathLike | None, retrain: bool,
                     progress: bool) -> tuple[str, bool]:
    """Which stand-in the demo starts from, and whether the cache's weights changed for it."""

    if retrain:
        _say(f"demo: training the {arch} stand-in anew (--retrain): the table will differ from the README's", progress)
        pretrain_standin(arch, progress=progress)
        return "retrained", True
    if standins is not None and (Path(standins) / f"{arch}.safetensors").is_file():
        changed = install_standin(arch, standins)
        _say(f"demo: the {arch} stand-in committed in {standins}"
             + (" (installed into the cache; rows finished with other weights run again)" if changed else ""),
             progress)
        return "committed", changed
    _say(f"demo: no committed {arch} stand-in under {standins}: the cached one, trained on this machine if missing "
         "(its table may differ from the README's)", progress)
    build_standin(arch, progress=progress)
    return "cached", False


# ---------------------------------------------------------------------------------------------------- publish


def readme_excerpt(readme_text: str) -> str | None:
    """The demo table in the README: the fenced block between :data:`README_MARKERS` (None when absent)."""
    start, end = README_MARKERS
    if start not in readme_text or end not in readme_text:
        return None
    block = readme_text.split(start, 1)[1].split(end, 1)[0].strip()
    return block.removeprefix("```").removesuffix("```").strip("\n")


def publish(summary: dict[str, Any], dest: str | os.PathLike = PUBLISHED,
            readme: str | os.PathLike = "README.md") -> list[Path]:
    """Record a demo run in the repository: ``DEST.json`` (the rows, the run's wall time and the command) and
    ``DEST.txt`` (the printed table), and the README's excerpt between :data:`README_MARKERS` replaced by that
    table. Every number the README's demo section quotes then comes from a committed file made by one command.

    Raises:
        ValueError: the README lacks the markers (nothing is written then).
    """
    readme, dest = Path(readme), Path(dest)
    text = readme.read_text()
    if readme_excerpt(text) is None:
        raise ValueError(f"{readme} has no demo excerpt between {README_MARKERS[0]!r} and {README_MARKERS[1]!r}")
    start, end = README_MARKERS
    before, rest = text.split(start, 1)
    after = rest.split(end, 1)[1]
    dest.parent.mkdir(parents=True, exist_ok=True)
    json_path, txt_path = dest.with_suffix(".json"), dest.with_suffix(".txt")
    record = {"command": REFRESH_COMMAND, "seconds": round(summary["seconds"], 1), "rows": summary["rows"]}
    json_path.write_text(json.dumps(record, indent=2) + "\n")
    txt_path.write_text(summary["table"] + "\n")
    readme.write_text(f"{before}{start}\n```\n{summary['table']}\n```\n{end}{after}")
    return [json_path, txt_path, readme]


__all__ = ["DEMO_ROWS", "demo_row", "energy_curves", "format_table", "make_figures", "publish", "readme_excerpt",
           "run_demo", "short_name"]
