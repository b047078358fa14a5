"""The cost estimate (:mod:`lowrank_vit.harness.estimate`) as text: durations, one row stage by stage, several
rows and their total; every line labelled as an estimate, the warnings after."""

from __future__ import annotations

from typing import Any


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
