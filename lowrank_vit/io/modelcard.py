"""The files that travel with a compressed model directory beside its weights: a model card (``README.md``, the
Hugging Face hub's format: YAML front matter, then Markdown) and a figure of the ranks kept per layer.

Both are rendered from ``report.json`` (written by ``lowrank-vit compress`` and ``finetune``), so a card never says
something the report does not.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

REPORT_FILE = "report.json"
CARD_FILE = "README.md"
RANKS_FIGURE = "ranks.png"


def _fmt_params(count: int | None) -> str:
    return "—" if count is None else f"{count:,}"


def _fmt(value: float | None, digits: int = 2, suffix: str = "") -> str:
    return "—" if value is None else f"{value:.{digits}f}{suffix}"


def top5_informative(metrics: dict[str, Any]) -> bool:
    """Whether a top-5 figure says anything: not with 5 classes or fewer, where it is 100% whatever the model
    (reports written before the class count was recorded count as informative)."""
    return int(metrics.get("classes") or 6) > 5


def _accuracy_rows(report: dict[str, Any]) -> list[str]:
    rows = []
    for label, key in (("starting model", "before"), ("after compression", "after"), ("after fine-tuning", "final")):
        metrics = report.get("accuracy", {}).get(key)
        if metrics:  # with 5 classes or fewer every image is in the top 5: no figure rather than a constant 100
            top5 = metrics["top5"] if top5_informative(metrics) else None
            rows.append(f"| {label} | {_fmt(metrics['top1'])} | {_fmt(top5)} | {metrics['images']:,} |")
    return rows


def _layer_rows(report: dict[str, Any]) -> list[str]:
    rows = []
    for layer in report.get("layers", []):
        rank = "dense" if layer["rank"] is None else str(layer["rank"])
        full = min(layer["in_features"], layer["out_features"])
        rows.append(f"| `{layer['name']}` | {layer['in_features']}→{layer['out_features']} | {rank} / {full} | "
                    f"{layer['factored_params']:,} / {layer['dense_params']:,} |")
    return rows


def render_card(report: dict[str, Any], directory_name: str) -> str:
    """The model card of a compressed directory, from its report (see ``lowrank-vit compress``)."""
    source = report.get("source", {})
    params, size = report.get("params", {}), report.get("size_mib", {})
    recipe = report.get("recipe", "?")
    lines = [
        "---",
        "library_name: lowrank_vit",
        "pipeline_tag: image-classification",
        "tags: [image-classification, timm, vision-transformer, low-rank, compression]",
        "---",
        "",
        f"# {directory_name}",
        "",
        f"`{source.get('architecture', '?')}` ({source.get('description', 'a timm model')}) compressed by "
        f"`lowrank_vit` with the **{recipe}** recipe: "
        + ("the selective scans of the blocks listed below run VMeanba's channel-mean scan; no weight changed."
           if report.get("vmeanba") and not report.get("layers") else
           "every linear layer inside the blocks that the allocation chose is a low-rank product `U Vᵀ` (plus a "
           "correction Z where the recipe has one)."),
        "",
        "| | parameters | MiB (float32) |",
        "|---|---|---|",
        f"| before | {_fmt_params(params.get('before'))} | {_fmt(size.get('before'), 1)} |",
        f"| after | {_fmt_params(params.get('after'))} | {_fmt(size.get('after'), 1)} |",
        "",
        f"Reduction: {_fmt(100 * report['reduction'] if report.get('reduction') is not None else None, 1, '%')} of "
        f"the parameters. Calibration: {report.get('calib_images', '?')} images of `{report.get('data', '?')}`.",
        "",
    ]
    return "\n".join(lines + _results(report) + _usage(report, directory_name))


def _results(report: dict[str, Any]) -> list[str]:
    """The card's middle: the scans switched, accuracy before and after, how it was fine-tuned."""
    lines: list[str] = []
    vmeanba = report.get("vmeanba")
    if vmeanba:  # a state-space model's scans: VMeanba's channel-mean scan in the listed blocks
        lines += [f"Selective scans: {len(vmeanba['chosen'])} block(s) run VMeanba's channel-mean scan "
                  f"({', '.join(f'`{name}`' for name in vmeanba['chosen'])}), KL to the model before "
                  f"{_fmt(vmeanba.get('kl'), 4)} on the calibration images.", ""]
    accuracy = _accuracy_rows(report)
    if accuracy:
        lines += ["## Accuracy (validation split)", "", "| model | top-1 % | top-5 % | images |", "|---|---|---|---|",
                  *accuracy, ""]
    else:
        lines += ["Accuracy: not evaluated.", ""]
    finetune = report.get("finetune")
    if finetune:
        what = "partial: norms, biases, head, patch embedding"
        if finetune.get("train_factors"):
            what = "all weights: the low-rank factors, norms, biases, head, patch embedding"
        loss = (f", distilled from the model before compression (weight {finetune['distill']}, temperature "
                f"{finetune.get('distill_temperature', 1.0)})" if finetune.get("distill") else "")
        lines += [f"Fine-tuned ({what}) for {finetune.get('epochs')} epoch(s), lr {finetune.get('lr')}, "
                  f"{finetune.get('steps', '?')} steps{loss}.", ""]
    return lines


def _usage(report: dict[str, Any], directory_name: str) -> list[str]:
    """The card's end: the preprocessing to feed, how to load and run it, the ranks kept per layer."""
    return [
        "## Preprocessing",
        "",
        "Feed the model images preprocessed exactly this way (saved in `lowrank_vit.json`, reused by "
        "`lowrank-vit evaluate`, `finetune` and `export`):",
        "",
        "```json",
        json.dumps(report.get("preprocessing", {}), indent=2),
        "```",
        "",
        "## How to load",
        "",
        "```python",
        "from lowrank_vit import load_compressed",
        "",
        f'model = load_compressed("{directory_name}")  # timm model with factorized layers, eval mode',
        "```",
        "",
        "```bash",
        f"lowrank-vit evaluate {directory_name} --data DATA",
        f"lowrank-vit export {directory_name} --format onnx --output model.onnx",
        "```",
        "",
        f"## Ranks per layer ([{RANKS_FIGURE}]({RANKS_FIGURE}))",
        "",
        "| layer | shape | rank / full | parameters / dense |",
        "|---|---|---|---|",
        *_layer_rows(report),
        "",
    ]


def plot_ranks(report: dict[str, Any], path: str | Path) -> Path:
    """Bar chart of the fraction of each layer's full rank that was kept (1.0: left dense)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = report.get("layers", [])
    names = [layer["name"] for layer in layers]
    kept = [1.0 if layer["rank"] is None else layer["rank"] / min(layer["in_features"], layer["out_features"])
            for layer in layers]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * len(names) + 2), 4))
    ax.bar(range(len(names)), kept, color="tab:blue")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=90, fontsize=6)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("rank kept / full rank")
    ax.set_title(f"{report.get('source', {}).get('architecture', '')}: ranks per layer ({report.get('recipe', '')})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


__all__ = ["CARD_FILE", "RANKS_FIGURE", "REPORT_FILE", "plot_ranks", "render_card"]
