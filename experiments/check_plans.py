"""Plan every compressed row of Tables 2-4 (and the Table 4 baselines' sizes) at full size with random weights and
synthetic calibration inputs, and check the issue's criteria:

* Table 2 rows (and the comparison rows, ``--rows 'compare/*'``) remove their stated fraction of the timm model's
  own count (params_after / params_before within 0.1% of 1 - reduction);
* Table 3 rows land on the paper's absolute counts (86.0M, 21.7M, 5.0M) within 0.1M;
* Table 4 sizes fall within 3% of the paper's MiB.

Prints one line per row and writes the JSON (default results/plans.json). Exit status 1 when a row fails.
``python -m experiments.check_plans [--rows PATTERN] [--json PATH]``
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import sys
import time
from pathlib import Path

from lowrank_vit.repro.planning import plan_row
from lowrank_vit.repro.registry import list_experiments


def check(plan: dict, exp) -> list[str]:
    problems = []
    if exp.table in ("table2", "compare"):  # a fraction of timm's own count
        ratio = plan["params_after"] / plan["params_before"]
        if abs(ratio - (1 - exp.reduction)) > 1e-3:
            problems.append(f"kept {ratio:.5f} of the parameters, not {1 - exp.reduction:.3f}")
    if exp.table == "table3" and exp.method != "baseline":
        if abs(plan["params_after"] - plan["paper_params"]) > 100_000:
            problems.append(f"{plan['params_after']:,} parameters, paper {plan['paper_params']:,}")
    if exp.table == "table4":
        if abs(plan["size_mib"] - exp.paper.size_mib) > 0.03 * exp.paper.size_mib:
            problems.append(f"{plan['size_mib']:.2f} MiB, paper {exp.paper.size_mib} (more than 3% apart)")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="table[234]/*", help="shell pattern of the rows to plan")
    parser.add_argument("--json", default="results/plans.json")
    parser.add_argument("--calib-images", type=int, default=4)
    args = parser.parse_args(argv)
    rows = [e for e in list_experiments() if fnmatch.fnmatchcase(e.name, args.rows)
            and (e.method != "baseline" or e.paper.size_mib is not None)]
    out, failed = [], 0
    for exp in rows:
        start = time.perf_counter()
        plan = plan_row(exp, "full", calib_images=args.calib_images)
        plan["seconds"] = round(time.perf_counter() - start, 1)
        plan["problems"] = check(plan, exp)
        plan.pop("ranks")
        failed += bool(plan["problems"])
        size = f" {plan['size_mib']:7.2f} MiB (paper {plan['paper_size_mib']})" if "size_mib" in plan else ""
        print(f"{'FAIL' if plan['problems'] else 'ok  '} {exp.name:34s} {plan['params_before']:>12,d} -> "
              f"{plan['params_after']:>12,d} (paper {plan['paper_params'] or 0:>11,d}){size} {plan['seconds']:6.1f} s"
              + ("  " + "; ".join(plan["problems"]) if plan["problems"] else ""), flush=True)
        out.append(plan)
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"{len(rows) - failed}/{len(rows)} rows meet their targets; {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
