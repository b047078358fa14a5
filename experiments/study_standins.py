"""The MNIST stand-ins of the loss-aware study, pretrained into the repository so that its cells reproduce anywhere.

    python -m experiments.study_standins [--output experiments/models/standins] [--only ARCH] [--force]

The study's three MNIST models are the library's stand-ins (:data:`lowrank_vit.repro.standins.STANDINS`: the
DeiT-S, ViT-L and Swin-B shapes, seed 0), which the library otherwise pretrains at first use into the user's cache.
Pretrained on another CPU they come out as other weights (the same recipe and seed; floating-point rounding differs
and thousands of steps amplify it), and the study's cells move with them: by up to 0.7 points between the AMD and
the Intel machine this project was measured on. So the weights the committed study used are committed too
(``ARCH.safetensors`` with the record ``ARCH.json``: recipe fingerprint, validation top-1, seconds, versions), and
:mod:`experiments.loss_aware_study` loads them read-only.

An entry whose recipe is unchanged is kept unless ``--force``; ``--force`` retrains (the record says on which
torch; expect other weights on another CPU).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .loss_aware_study import MODELS

STUDY_STANDINS = tuple(name.removeprefix("mnist_") for name in MODELS if name.startswith("mnist_"))
"""The stand-ins of the study (its models ``mnist_deit_s``, ``mnist_vit_l``, ``mnist_swin_b``)."""


def main(argv: list[str] | None = None) -> int:
    from lowrank_vit.repro.standins import load_standin, pretrain_standin

    parser = argparse.ArgumentParser(prog="python -m experiments.study_standins", description=__doc__.split("\n")[0])
    parser.add_argument("--output", default="experiments/models/standins")
    parser.add_argument("--only", choices=STUDY_STANDINS, default=None)
    parser.add_argument("--force", action="store_true", help="retrain even where the stored entry is current")
    args = parser.parse_args(argv)
    output = Path(args.output)
    for arch in [args.only] if args.only else STUDY_STANDINS:
        if not args.force:
            try:
                _, info = load_standin(arch, output)
            except (FileNotFoundError, ValueError) as err:
                print(f"{arch}: {err}; pretraining", file=sys.stderr)
            else:
                print(f"{arch}: kept ({info['fingerprint']}, top-1 {info['top1']:.2f}%)")
                continue
        _, info = pretrain_standin(arch, cache_dir=output, progress=True)
        (output / f"{arch}.lock").unlink(missing_ok=True)  # the trainer's file lock has no business in git
        print(f"{arch}: pretrained in {info['seconds']:.0f} s, top-1 {info['top1']:.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
