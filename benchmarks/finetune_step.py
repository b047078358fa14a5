"""Time per optimizer step of the partial fine-tune, in each Lightning precision, side by side in one run.

    python benchmarks/finetune_step.py --model deit_base --device cuda --batch-size 128 \\
        --json benchmarks/results/finetune_step_deit_base_cuda.json

The model is compressed first (plain SVD at ``--reduction``: the step's cost depends on the ranks and on what trains,
not on how the ranks were found), then :func:`lowrank_vit.stages.finetune.finetune` runs ``--steps`` optimizer steps
on generated images for every precision in turn (``--repeats`` rounds, the precisions interleaved). A callback reads
the clock after every step (the GPU synchronized first); the first ``--warmup`` steps of every run are dropped
(kernel selection, allocator growth) and the median of the rest is reported, with the images per second it gives and
the speedup over the first precision listed.
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _common import (  # noqa: E402
    ArgumentParser,
    UsageError,
    check_device,
    command_line,
    create_model,
    environment,
    format_table,
    input_shape,
    median,
    parse_model_kwargs,
    resolve_model_name,
    smooth_images,
    synchronize,
    write_json,
)
from lightning.pytorch.callbacks import Callback  # noqa: E402

from lowrank_vit.cli.args import fraction, positive_int  # noqa: E402
from lowrank_vit.config import recipe  # noqa: E402
from lowrank_vit.stages.finetune_config import PRECISIONS  # noqa: E402


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="finetune_step.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="timm model name or alias (deit_small, deit_base, ...)")
    parser.add_argument("--model-kwargs", default=None, help="JSON object of extra timm.create_model arguments")
    parser.add_argument("--reduction", type=fraction, default=0.5, help="fraction of the parameters removed")
    parser.add_argument("--precision", nargs="+", default=["32-true", "bf16-mixed"], choices=PRECISIONS,
                        help="Lightning precisions, timed side by side (default: 32-true bf16-mixed)")
    parser.add_argument("--batch-size", type=positive_int, default=128, help="images per step")
    parser.add_argument("--steps", type=positive_int, default=30, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="steps dropped at the start of every run")
    parser.add_argument("--repeats", type=positive_int, default=1, help="rounds over the precisions")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, metavar="PATH", help="write the results here")
    return parser


class StepClock(Callback):
    """Reads the clock after every optimizer step (GPU work included)."""

    def __init__(self, device: str) -> None:
        self.device, self.times = device, []

    def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
        synchronize(self.device)
        self.times.append(time.perf_counter())


def run_steps(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, precision: str, steps: int,
              batch_size: int, device: str, seed: int) -> list[float]:
    """Seconds of each of ``steps`` fine-tune steps of a copy of ``model`` (the first is from the fit's start)."""
    from torch.utils.data import DataLoader, TensorDataset

    from lowrank_vit.stages.finetune import finetune
    from lowrank_vit.stages.finetune_config import FinetuneConfig

    clock = StepClock(device)
    loader = DataLoader(TensorDataset(images, labels), batch_size=batch_size, shuffle=False, drop_last=True,
                        pin_memory=device == "cuda")
    synchronize(device)
    start = time.perf_counter()
    finetune(copy.deepcopy(model), loader, config=FinetuneConfig(epochs=1, lr=1e-4, max_steps=steps, seed=seed,
                                                                 precision=precision),
             accelerator="gpu" if device == "cuda" else "cpu", devices=1, progress=False, callbacks=[clock],
             enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    stamps = [start, *clock.times]
    return [b - a for a, b in zip(stamps, stamps[1:], strict=False)]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        device = check_device(args.device)
        if args.warmup < 0 or args.warmup >= args.steps:
            raise UsageError(f"--warmup must lie in [0, --steps), got {args.warmup}")
        if "16-mixed" in args.precision and device != "cuda":
            raise UsageError("precision 16-mixed needs --device cuda")
        name = resolve_model_name(args.model)
        kwargs = parse_model_kwargs(args.model_kwargs)
        model = create_model(name, kwargs, seed=args.seed, device=device)
    except UsageError as exc:
        build_parser().error(str(exc))
    from lowrank_vit import compress

    shape = input_shape(model)
    compress(model, [smooth_images(8, shape, args.seed)], recipe("vanilla", reduction=args.reduction, calib_samples=8,
                                                                  progress=False))
    count = args.batch_size * args.steps
    images = smooth_images(count, shape, args.seed + 1)
    labels = torch.randint(0, int(model.num_classes), (count,), generator=torch.Generator().manual_seed(args.seed))
    samples: dict[str, list[float]] = {p: [] for p in args.precision}
    for _ in range(args.repeats):
        for precision in args.precision:
            steps = run_steps(model, images, labels, precision, args.steps, args.batch_size, device, args.seed)
            samples[precision] += steps[args.warmup:]
    rows = []
    for precision in args.precision:
        step = median(samples[precision])
        rows.append({"model": name, "precision": precision, "batch_size": args.batch_size, "step_ms": 1e3 * step,
                     "images_per_s": args.batch_size / step, "steps_timed": len(samples[precision]),
                     "step_samples_ms": [1e3 * s for s in samples[precision]]})
    for row in rows:
        row["speedup"] = rows[0]["step_ms"] / row["step_ms"]
    params = sum(p.numel() for p in model.parameters())
    print(f"{name} on {device}, -{100 * args.reduction:.0f}% ({params:,} parameters), batch {args.batch_size}, "
          f"median of {rows[0]['steps_timed']} steps per precision")
    print(format_table(rows, [("precision", "precision", "s"), ("step_ms", "step ms", ".1f"),
                              ("images_per_s", "img/s", ".1f"), ("speedup", "speedup", ".2f")]))
    if args.json:
        write_json(args.json, {"benchmark": "finetune_step", "command": command_line(),
                               "environment": environment(device),
                               "settings": {"reduction": args.reduction, "steps": args.steps, "warmup": args.warmup,
                                            "repeats": args.repeats, "seed": args.seed, "model_kwargs": kwargs},
                               "rows": rows})
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
