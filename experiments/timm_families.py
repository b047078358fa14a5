"""Does every timm family the adapter finds blocks in compress, save without arguments and load as itself?

Each model is built by name with random weights and ten classes (at its own default size), compressed with a recipe
on random images of its input size, saved with ``save_compressed(model, dir)`` alone (the plan's arguments are the
adapter's reading, kept only where it rebuilds the model and computes the same) and loaded back; the loaded model's
outputs are compared with the compressed model's on other random images. A family the adapter finds no block in, or
whose target cannot be reached, is recorded with its one-line error. Random weights: that the path works, not what
accuracy it keeps.

    python -m experiments.timm_families --models pvt_v2_b0,davit_tiny --json experiments/results/timm_families.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from lowrank_vit import compress, count_params, load_compressed, save_compressed
from lowrank_vit.config import recipe
from lowrank_vit.io.surgery import read_plan
from lowrank_vit.nn.adapters import timm_with_our_models

FAMILIES = ("pvt_v2_b0", "tiny_vit_5m_224", "eva02_tiny_patch14_224", "beit_base_patch16_224", "twins_svt_small",
            "davit_tiny", "gcvit_xxtiny", "maxvit_nano_rw_256", "crossvit_tiny_240", "mvitv2_tiny",
            "swin_tiny_patch4_window7_224", "vit_small_patch14_reg4_dinov2", "vit_base_patch16_siglip_224",
            "deit_tiny_distilled_patch16_224", "coat_lite_tiny", "levit_128s")


def run_one(name: str, recipe_name: str, reduction: float, images: int) -> dict[str, Any]:
    """Build, compress, save without arguments, load and compare one model; errors are recorded, not raised."""
    start = time.perf_counter()
    row: dict[str, Any] = {"model": name}
    generator = torch.Generator().manual_seed(0)
    try:
        torch.manual_seed(0)
        model = timm_with_our_models().create_model(name, pretrained=False, num_classes=10).eval()
        shape = tuple(model.pretrained_cfg.get("input_size", (3, 224, 224)))
        calib = [torch.randn(4, *shape, generator=generator) for _ in range(-(-images // 4))]
        row["params_before"] = count_params(model)
        compress(model, calib, recipe(recipe_name, reduction=reduction, calib_samples=images, progress=False))
        row["params_after"] = count_params(model)
        with tempfile.TemporaryDirectory() as directory:
            save_compressed(model, Path(directory) / "m")
            row["saved_kwargs"] = read_plan(Path(directory) / "m")["model_kwargs"]
            loaded = load_compressed(Path(directory) / "m")
        probe = torch.randn(2, *shape, generator=generator)
        with torch.no_grad():
            want, got = model(probe), loaded(probe)
        row["max_abs_difference"] = float((want - got).abs().max())
        row["max_abs_output"] = float(want.abs().max())
    except Exception as exc:  # a family the library refuses: its message is the finding
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:400]}"
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(FAMILIES), help="comma-separated timm names")
    parser.add_argument("--recipe", default="loss-aware")
    parser.add_argument("--reduction", type=float, default=0.5)
    parser.add_argument("--images", type=int, default=16, help="calibration images (random)")
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args(argv)
    rows = []
    for name in args.models.split(","):
        row = run_one(name, args.recipe, args.reduction, args.images)
        rows.append(row)
        verdict = row.get("error") or (f"{row['params_before']:,} -> {row['params_after']:,} parameters, loaded "
                                       f"outputs {row['max_abs_difference']:.2g} from the compressed model's "
                                       f"(outputs up to {row['max_abs_output']:.2g})")
        print(f"{name}: {verdict} ({row['seconds']} s)", flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps({"command": "python -m experiments.timm_families " + " ".join(
            sys.argv[1:] if argv is None else argv), "about": __doc__.splitlines()[0], "study": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
