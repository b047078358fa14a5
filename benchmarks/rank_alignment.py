"""How the speed of a factorized product depends on the rank itself, not only on the FLOP count.

    python benchmarks/rank_alignment.py [--tokens 6304] [--dim-in 768] [--dim-out 768] [--ranks 184 189 192 ...]
                                        [--repeats 15] [--device cpu|cuda] [--json PATH]

Times ``x W`` (dense, ``dim_in x dim_out``) against ``(x V) U`` at every rank, interleaved, medians of ``--repeats``.
The default ``--tokens`` is one DeiT batch of 32 images (32 x 197). The greedy allocation picks any rank; GEMM kernels
are tiled, and ranks off the tile multiples run far below their FLOP ratio. This is the evidence for allocating ranks
in multiples of 8 (``CompressionConfig(rank_multiple=8)``; see "Performance" in docs/results.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    ArgumentParser,
    check_device,
    command_line,
    environment,
    format_table,
    median,
    timed,
    write_json,
)

from lowrank_vit.cli.args import positive_int  # noqa: E402

DEFAULT_RANKS = [176, 184, 185, 189, 192, 200, 230, 232, 236, 240, 250, 256]


def measure(tokens: int, dim_in: int, dim_out: int, ranks: list[int], repeats: int, device: str,
            seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, dim_in, generator=g).to(device)
    cases = {None: (torch.randn(dim_in, dim_out, generator=g).to(device),)}
    for r in ranks:
        cases[r] = (torch.randn(dim_in, r, generator=g).to(device), torch.randn(r, dim_out, generator=g).to(device))

    def run(mats: tuple[torch.Tensor, ...]) -> torch.Tensor:
        out = x
        for m in mats:
            out = out @ m
        return out

    samples: dict[int | None, list[float]] = {key: [] for key in cases}
    for mats in cases.values():  # warm-up
        run(mats)
    for _ in range(repeats):  # interleaved: every case sees the same machine state
        for key, mats in cases.items():
            samples[key].append(timed(lambda mats=mats: run(mats), device))
    dense_ms = 1e3 * median(samples[None])
    rows = []
    for r in ranks:
        ms = 1e3 * median(samples[r])
        rows.append({"rank": r, "multiple_of_8": r % 8 == 0, "dense_ms": dense_ms, "factorized_ms": ms,
                     "speedup": dense_ms / ms, "flop_speedup": dim_in * dim_out / (r * (dim_in + dim_out))})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="rank_alignment.py", description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=positive_int, default=32 * 197, help="rows of x (default: 32 x 197)")
    parser.add_argument("--dim-in", type=positive_int, default=768)
    parser.add_argument("--dim-out", type=positive_int, default=768)
    parser.add_argument("--ranks", type=positive_int, nargs="+", default=DEFAULT_RANKS)
    parser.add_argument("--repeats", type=positive_int, default=15, help="timed samples per case (median reported)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    try:
        device = check_device(args.device)
    except ValueError as err:
        parser.error(str(err))
    env = environment(device)
    rows = measure(args.tokens, args.dim_in, args.dim_out, args.ranks, args.repeats, device)
    print(f"x ({args.tokens} x {args.dim_in}) times a {args.dim_in} x {args.dim_out} matrix on {device}, "
          f"median of {args.repeats} interleaved samples")
    print(format_table(rows, [("rank", "rank", "d"), ("dense_ms", "dense ms", ".1f"),
                              ("factorized_ms", "factorized ms", ".1f"), ("speedup", "speedup", ".2f"),
                              ("flop_speedup", "flop speedup", ".2f")]))
    if args.json:
        write_json(args.json, {"benchmark": "rank_alignment", "command": command_line(), "environment": env,
                               "tokens": args.tokens, "dim_in": args.dim_in, "dim_out": args.dim_out,
                               "repeats": args.repeats, "rows": rows})
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
