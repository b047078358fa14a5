"""The tables ``reproduce`` writes from finished rows: one per paper table (paper and measured side by side, JSON and
Markdown) and the comparison grid (every method at equal parameters, with and without the fine-tune)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from lowrank_vit.core.files import write_json
from lowrank_vit.repro.registry import (
    Experiment,
    arch_label,
    method_label,
)
from lowrank_vit.repro.rows import read_result


def table_row(exp: Experiment, result: dict[str, Any] | None) -> dict[str, Any]:
    """Paper and measured numbers of one row side by side (measured fields None when the row has not run)."""
    paper = exp.paper
    get = (result or {}).get
    measured_params = get("params")
    row = {"name": exp.name, "arch": exp.arch, "method": exp.method, "reduction": exp.reduction,
           "paper_params_m": paper.params_m, "params_m": None if measured_params is None else measured_params / 1e6,
           "paper_top1": paper.top1, "top1": get("top1"), "top5": get("top5"),
           "top1_compressed": (get("compressed") or {}).get("top1"), "top1_dense": (get("dense") or {}).get("top1"),
           "paper_size_mib": paper.size_mib, "size_mib": get("size_mib"),
           "paper_residual": paper.residual, "residual": _finite(get("residual_error")), "notes": list(exp.notes),
           "setup": _setup_label(get("config") or {}), "finished": result is not None}
    vmeanba = get("vmeanba") or {}  # a state-space model's switched blocks and the speedups measured with them
    row.update(vmeanba_blocks=len(vmeanba["chosen"]) if "chosen" in vmeanba else None,
               vmeanba_kl=vmeanba.get("kl"), scan_speedup=vmeanba.get("scan_speedup"),
               model_speedup=vmeanba.get("measured_speedup"))
    for key in ("params_m", "top1", "size_mib", "residual"):
        ours, theirs = row[key], row[f"paper_{key}"]
        row[f"diff_{key}"] = None if ours is None or theirs is None else ours - theirs
    # against the row's own starting model: what a smoke-scale row can be compared with
    row["diff_top1_dense"] = None if row["top1"] is None or row["top1_dense"] is None else \
        row["top1"] - row["top1_dense"]
    return row



def _finite(value: float | None) -> float | None:
    """None for a missing or non-finite number (older results stored an undefined mean as NaN)."""
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None



def _setup_label(config: dict[str, Any]) -> str | None:
    """"stand-in deit_s on mnist-5k", "deit_small_patch16_224 (model.safetensors) on cifar10": what a row ran on."""
    model, data = config.get("model") or {}, config.get("data") or {}
    if not model:
        return None
    what = f"stand-in {model.get('name')}" if model.get("source") == "standin" else str(model.get("name"))
    if model.get("checkpoint"):
        what += f" ({Path(model['checkpoint']).name})"
    where = Path(data["path"]).name if data.get("path") else data.get("name")
    return f"{what} on {where}"



def write_table(table: str, exps: list[Experiment], scale: str, output: Path) -> dict[str, Any]:
    """Write ``output/TABLE.json`` and ``output/TABLE.md``: every row's paper and measured numbers and their
    difference. At smoke scale the measured numbers are MNIST stand-ins: only their ordering compares."""
    data, text = _table(table, exps, scale, output)
    write_json(output / f"{table}.json", data)
    (output / f"{table}.md").write_text(text)
    return data



def render_table(table: str, exps: list[Experiment], scale: str, output: Path) -> str:
    """The markdown of :func:`write_table` for ``exps`` alone (``reproduce --rows``), without writing anything."""
    return _table(table, exps, scale, output)[1]



def _table(table: str, exps: list[Experiment], scale: str, output: Path) -> tuple[dict[str, Any], str]:
    rows = [table_row(exp, read_result(output / exp.name)) for exp in exps]
    if table == COMPARE_TABLE:  # one grid at equal parameters per column instead of one line per row
        for row, exp in zip(rows, exps, strict=True):
            row["finetune"] = exp.config(scale).finetune is not None
        data = {"table": table, "scale": scale, **compare_grid(rows), "rows": rows}
        text = compare_markdown(scale, data)
    else:
        data = {"table": table, "scale": scale, "rows": rows}
        text = markdown_table(table, scale, rows)
    return data, text



def _fmt(value: float | None, digits: int = 2, signed: bool = False) -> str:
    if value is None:
        return "—"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"



def _times(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}x"



def _sci(value: float | None) -> str:
    """A residual error: scientific notation, so that 4e-05 and 2e-03 do not both print as 0.000."""
    return "—" if value is None else f"{value:.2e}"



def markdown_table(table: str, scale: str, rows: list[dict[str, Any]]) -> str:
    """One line per row. Full scale: measured beside the paper, with their differences (a reproduction). Smoke
    scale: the stand-ins are not the paper's models and MNIST is not ImageNet, so a row is compared with its own
    starting model ("Δ vs dense") and the paper's figures stand beside it without a difference."""
    smoke = scale == "smoke"
    show_size = any(r["paper_size_mib"] is not None for r in rows)
    show_residual = any(r["paper_residual"] is not None or r["residual"] is not None for r in rows)
    if smoke:
        header = ["row", "params (paper)", "params", "top-1 (paper)", "dense top-1", "top-1 before FT", "top-1",
                  "Δ vs dense", "top-5"]
        header += ["MiB (paper)", "MiB"] if show_size else []
    else:
        header = ["row", "params (paper)", "params", "Δ", "top-1 (paper)", "top-1", "Δ", "top-1 before FT", "top-5"]
        header += ["MiB (paper)", "MiB", "Δ"] if show_size else []
    if show_residual:
        header += ["residual (paper)", "residual"]
    show_vmeanba = any(r.get("vmeanba_blocks") is not None for r in rows)
    if show_vmeanba:
        header += ["VMeanba blocks", "scan speedup", "model speedup"]
    lines = [f"# {table} ({scale} scale)", ""]
    if smoke:
        lines += ["Smoke scale: tiny stand-ins of each family on the embedded MNIST digits. Parameter ratios follow "
                  "the paper; accuracies are MNIST's, so each row is compared with its own dense model (Δ vs "
                  "dense) and with the other rows; the paper's ImageNet figures stand beside for reference only.", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    notes = []
    for r in rows:
        mark = ""
        if r["notes"]:  # rows sharing a caveat share its number
            if r["notes"] not in notes:
                notes.append(r["notes"])
            mark = f" [{notes.index(r['notes']) + 1}]"
        if smoke:
            cells = [f"`{r['name']}`{mark}", _fmt(r["paper_params_m"], 1), _fmt(r["params_m"], 3),
                     _fmt(r["paper_top1"]), _fmt(r["top1_dense"]), _fmt(r["top1_compressed"]), _fmt(r["top1"]),
                     _fmt(r["diff_top1_dense"], 2, True), _fmt(r["top5"])]
            cells += [_fmt(r["paper_size_mib"], 1), _fmt(r["size_mib"], 3)] if show_size else []
        else:
            cells = [f"`{r['name']}`{mark}", _fmt(r["paper_params_m"], 1), _fmt(r["params_m"], 3),
                     _fmt(r["diff_params_m"], 3, True), _fmt(r["paper_top1"]), _fmt(r["top1"]),
                     _fmt(r["diff_top1"], 2, True), _fmt(r["top1_compressed"]), _fmt(r["top5"])]
            if show_size:
                cells += [_fmt(r["paper_size_mib"], 1), _fmt(r["size_mib"], 1), _fmt(r["diff_size_mib"], 1, True)]
        if show_residual:
            cells += [_fmt(r["paper_residual"], 2), _sci(r["residual"])]
        if show_vmeanba:
            blocks = r.get("vmeanba_blocks")
            cells += ["—" if blocks is None else str(blocks), _times(r.get("scan_speedup")),
                      _times(r.get("model_speedup"))]
        lines.append("| " + " | ".join(cells) + " |")
    if notes:
        lines.append("")
        lines += [f"[{i}] " + "; ".join(n) for i, n in enumerate(notes, 1)]
    missing = [r["name"] for r in rows if not r["finished"]]
    if missing:
        lines += ["", f"Not run yet: {', '.join(missing)}."]
    return "\n".join(lines) + "\n"



COMPARE_TABLE = "compare"



PARAMS_TOLERANCE = 1e-3
"""Relative spread of a column's measured parameter counts above which the table flags the column."""



def compare_grid(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The comparison rows (:func:`table_row` dicts with a ``finetune`` flag) arranged as a grid: ``columns``
    (architecture x reduction, in registration order, with the measured parameter counts of the column's finished
    rows) and ``grid`` (one line per method and fine-tuning, its cells keyed by column)."""
    columns: dict[str, dict[str, Any]] = {}
    lines: dict[tuple[str, bool], dict[str, Any]] = {}
    for r in rows:
        pct = round(100 * (r["reduction"] or 0.0))
        key = f"{r['arch']}-{pct}"
        column = columns.setdefault(key, {"key": key, "arch": r["arch"], "reduction": r["reduction"],
                                          "label": f"{arch_label(r['arch'])} -{pct}%", "params_m": [],
                                          "top1_dense": None})
        if r["params_m"] is not None:
            column["params_m"].append(r["params_m"])
        if column["top1_dense"] is None:
            column["top1_dense"] = r["top1_dense"]
        line = lines.setdefault((r["method"], r["finetune"]), {
            "method": r["method"], "finetune": r["finetune"], "cells": {}})
        line["cells"][key] = {"name": r["name"], "top1": r["top1"], "paper_top1": r["paper_top1"],
                              "params_m": r["params_m"], "residual": r["residual"], "notes": r["notes"]}
    for column in columns.values():
        counts = column.pop("params_m")
        column["params_m_min"] = min(counts) if counts else None
        column["params_m_max"] = max(counts) if counts else None
        column["equal_params"] = not counts or (max(counts) - min(counts)) <= PARAMS_TOLERANCE * max(counts)
    return {"columns": list(columns.values()), "grid": list(lines.values())}



def compare_markdown(scale: str, data: dict[str, Any]) -> str:
    """``compare.md``: top-1 of every method (with and without the partial fine-tune) at equal parameters per
    column, the paper's number in parentheses where one exists; notes numbered below the table."""
    columns, grid = data["columns"], data["grid"]
    lines = [f"# compare ({scale} scale)", "",
             "Top-1 (%) at equal parameters per column (each column removes the same fraction of the model's "
             "parameters; a column whose rows differ by more than 0.1% is marked \"unequal!\"), the paper's number "
             "in parentheses where one exists. Between the paper's recipe and the comparison methods only the "
             "decomposition differs: greedy ranks on each method's own spectra and the closed-form low-rank Z; the "
             "loss-aware row (the library's default) also allocates its own way (marginal ranks on predicted loss) "
             "and takes no Z. \"+ FT\" adds the partial fine-tune.", ""]
    setups = sorted({r["setup"] for r in data["rows"] if r.get("finished") and r.get("setup")})
    if setups and not all(s.startswith("stand-in ") and s.endswith(" on mnist-5k") for s in setups):
        lines += [f"Measured with {'; '.join(setups)} (the registry's config with overrides); compare methods with "
                  f"each other, not with the paper's ImageNet numbers.", ""]
    elif scale == "smoke":
        lines += ["Smoke scale: tiny stand-ins on the embedded MNIST digits; compare methods with each other, not "
                  "with the paper's ImageNet numbers.", ""]
    header = ["method"] + [c["label"] for c in columns]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def params(c: dict[str, Any]) -> str:
        low, high = c["params_m_min"], c["params_m_max"]
        if low is None:
            return "—"
        text = f"{low:.3f}M" if high - low < 5e-4 else f"{low:.3f}-{high:.3f}M"
        return text if c["equal_params"] else text + " (unequal!)"

    lines.append("| parameters | " + " | ".join(params(c) for c in columns) + " |")
    lines.append("| dense model | " + " | ".join(_fmt(c["top1_dense"]) for c in columns) + " |")
    notes: list[str] = []

    def mark(texts: list[str]) -> str:
        numbers = []
        for text in texts:
            if text not in notes:
                notes.append(text)
            numbers.append(notes.index(text) + 1)
        return "".join(f" [{n}]" for n in sorted(set(numbers)))

    for line in grid:
        cells = [line["cells"].get(c["key"]) for c in columns]
        present = [cell for cell in cells if cell is not None]
        shared = [n for n in present[0]["notes"] if all(n in cell["notes"] for cell in present)] if present else []
        label = method_label(line["method"]) + (" + FT" if line["finetune"] else ", no FT")
        out = [label + mark(shared)]
        for cell in cells:
            if cell is None:
                out.append("")
                continue
            text = _fmt(cell["top1"])
            if cell["paper_top1"] is not None:
                text += f" ({_fmt(cell['paper_top1'])})"
            out.append(text + mark([n for n in cell["notes"] if n not in shared]))
        lines.append("| " + " | ".join(out) + " |")
    if notes:
        lines.append("")
        lines += [f"[{i}] {text}" for i, text in enumerate(notes, 1)]
    residual_lines = [line for line in grid if not line["finetune"]]
    # one grid of the no-FT lines: the residual is measured right after compression, the same for both lines
    if any(cell.get("residual") is not None for line in residual_lines for cell in line["cells"].values()):
        lines += ["", "Mean residual error of eq. 5 over the compressed layers, on the calibration images right "
                      "after compression (lower is better; — where a method has none, e.g. COMCAT's fused heads):",
                  "", "| method | " + " | ".join(c["label"] for c in columns) + " |", "|" + "---|" * len(header)]
        for line in residual_lines:
            cells = [line["cells"].get(c["key"]) or {} for c in columns]
            lines.append(f"| {method_label(line['method'])} | "
                         + " | ".join(_sci(cell.get("residual")) for cell in cells) + " |")
    missing = [r["name"] for r in data["rows"] if not r["finished"]]
    if missing:
        lines += ["", f"Not run yet ({len(missing)} of {len(data['rows'])}): {', '.join(missing)}."]
    return "\n".join(lines) + "\n"
