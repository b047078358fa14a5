"""Screen of the distillation stage's loss for class logits: the KL divergence to the dense model's predictions (the
library's, the compression's own likelihood) against two losses common in distillation, on tuning images.

- "kl": the library's loss, ``KL(softmax(teacher) || softmax(student))``;
- "kl-t4": the same at temperature 4, times 16 (Hinton et al.'s softened targets);
- "logit-mse": the mean squared error of the logits themselves (Kim et al. 2021 found it ahead of the KL in
  distillation between differently sized networks).

Each loss runs the loss-aware study's cells (:mod:`experiments.loss_aware_study`) with the pipeline's distillation
loss replaced, so every other setting, image and seed is the study's; the check that keeps the trained weights only
where the loss on the calibration images fell uses the swapped loss too. Run on the first images of the seeded test
order (``--eval 2000``, no ``--eval-skip``): the images settings are chosen on, apart from the held-out ones. The
cells of every loss land in one JSON, ``{"command", "about", "losses": {loss: {model: study entry}}}``.

    python -m experiments.distill_loss_screen --losses kl,kl-t4,logit-mse --cifar10 PATH/TO/cifar10 \\
        --models cifar_vit4_wide_long,cifar_deit3_ls,cifar_swin_long,cifar_vit6_long --ratios 0.7,0.8 \\
        --recipes la-distill-long --calib 1024 --eval 2000 --json experiments/results/distill_loss_screen.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _kl(temperature: float) -> Callable[[str], LossFn]:
    def build(likelihood: str) -> LossFn:
        from lowrank_vit.stages.finetune import soft_distillation_loss

        _class_logits_only(likelihood)
        return lambda student, teacher: soft_distillation_loss(student, teacher, temperature)
    return build


def _logit_mse(likelihood: str) -> LossFn:
    _class_logits_only(likelihood)
    return lambda student, teacher: F.mse_loss(student.float(), teacher.detach().float())


def _class_logits_only(likelihood: str) -> None:
    if likelihood != "categorical":  # the screen is about class logits; other outputs already use a squared error
        raise ValueError(f"the loss screen compares losses for class logits; this model's likelihood is {likelihood!r}")


LOSSES: dict[str, Callable[[str], LossFn] | None] = {"kl": None, "kl-t4": _kl(4.0), "logit-mse": _logit_mse}
"""Loss name -> a builder of the stage's loss from the likelihood (as ``lowrank_vit.pipeline._distillation_loss``);
None: the library's own."""


def swapped_loss(loss: str) -> AbstractContextManager:
    """A context in which every compression distils under ``loss`` (of :data:`LOSSES`); "kl" changes nothing."""
    import lowrank_vit.pipeline as pipeline

    builder = LOSSES[loss]
    return mock.patch.object(pipeline, "_distillation_loss", builder) if builder else nullcontext()


def run_loss(loss: str, study_argv: list[str]) -> dict:
    """The study's cells with the distillation's loss ``loss``: ``study_argv`` run by the study's ``main`` in a
    scratch folder; returns its per-model entries."""
    from .loss_aware_study import main as study_main

    with tempfile.TemporaryDirectory() as scratch, swapped_loss(loss):
        if study_main([*study_argv, "--output", scratch]) != 0:
            raise SystemExit(2)
        return json.loads((Path(scratch) / "study.json").read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.distill_loss_screen",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--losses", default=",".join(LOSSES), help=f"comma-separated, of {', '.join(LOSSES)}")
    parser.add_argument("--json", required=True, help="where the cells of every loss are written")
    args, study_argv = parser.parse_known_args(argv)
    losses = [name for name in args.losses.split(",") if name]
    unknown = [name for name in losses if name not in LOSSES]
    if unknown or not losses:
        print(f"--losses: unknown {unknown}; known: {', '.join(LOSSES)}", file=sys.stderr)
        return 2
    if "--output" in study_argv:
        print("--output: the screen runs each loss in a scratch folder; use --json", file=sys.stderr)
        return 2
    record = {"command": "python -m experiments.distill_loss_screen " + " ".join(argv if argv is not None
                                                                                   else sys.argv[1:]),
              "about": __doc__.split("\n\n")[0].replace("\n", " "), "losses": {}}
    out = Path(args.json)
    for loss in losses:
        record["losses"][loss] = run_loss(loss, study_argv)
        out.write_text(json.dumps(record, indent=1) + "\n")  # after every loss, so a long run keeps what it has
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
