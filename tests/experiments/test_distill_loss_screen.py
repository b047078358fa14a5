"""Tests of experiments/distill_loss_screen.py."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import experiments.distill_loss_screen as screen
from lowrank_vit import compress
from tests.helpers import make_images, make_tiny_vit, refit_cfg


def _logits(seed: int) -> torch.Tensor:
    return 3 * torch.randn(6, 5, generator=torch.Generator().manual_seed(seed))


def test_each_loss_is_its_formula_written_out():
    """The losses against their definitions computed here by hand: the temperature-4 KL is 16 times the KL of the
    logits divided by 4 (teacher's distribution first, mean over images); the logit MSE the mean of the squared
    differences."""
    student, teacher = _logits(0), _logits(1)

    def kl(t: float) -> float:
        p, q = (torch.softmax(x.double() / t, dim=-1) for x in (teacher, student))
        return float((p * (p.log() - q.log())).sum(-1).mean()) * t * t

    assert float(screen.LOSSES["kl-t4"]("categorical")(student, teacher)) == pytest.approx(kl(4.0), rel=1e-5)
    assert float(screen.LOSSES["logit-mse"]("categorical")(student, teacher)) == pytest.approx(
        float(((student.double() - teacher.double()) ** 2).mean()), rel=1e-6)
    assert kl(4.0) != pytest.approx(kl(1.0), rel=0.05)  # the temperature matters on these logits


@pytest.mark.parametrize("loss", ["kl-t4", "logit-mse"])
def test_a_loss_for_class_logits_refuses_other_outputs(loss):
    with pytest.raises(ValueError, match="gaussian"):
        screen.LOSSES[loss]("gaussian")


@pytest.mark.parametrize("loss", ["kl", "logit-mse"])
def test_the_swapped_loss_is_the_one_the_compression_distils_under(loss):
    """Inside ``swapped_loss`` the pipeline's distillation measures its loss before the steps with the named loss:
    the report's ``loss_before`` equals that loss, computed here, between the dense model and the same compression
    without the distillation (the stages before it are deterministic), on the calibration images. Outside, the
    library's loss is back."""
    dense = make_tiny_vit(seed=5)
    images = make_images(24, seed=6)
    settings = dict(reduction=0.7, calib_samples=24)
    undistilled = copy.deepcopy(dense)
    compress(undistilled, [images], refit_cfg(**settings))
    with torch.no_grad():
        student, teacher = undistilled(images), dense(images)
    truth = {"kl": float(torch.nn.functional.kl_div(student.log_softmax(-1), teacher.log_softmax(-1),
                                                    log_target=True, reduction="batchmean")),
             "logit-mse": float(((student - teacher) ** 2).mean())}
    distill = dict(distill_steps=2, distill_lr=1e-4, distill_batch_size=8, distill_augment="none")
    with screen.swapped_loss(loss):
        report = compress(copy.deepcopy(dense), [images], refit_cfg(**settings, **distill))
    assert report.distillation["loss_before"] == pytest.approx(truth[loss], rel=1e-4)
    after = compress(copy.deepcopy(dense), [images], refit_cfg(**settings, **distill))
    assert after.distillation["loss_before"] == pytest.approx(truth["kl"], rel=1e-4)


def test_main_writes_every_losss_cells_and_refuses_bad_arguments(tmp_path, monkeypatch, capsys):
    """Each loss's cells under its name, run with the study's arguments and a scratch --output; an unknown loss or
    a --output of its own: exit status 2 and one line, no file."""
    seen = []

    def fake_study(argv):
        import lowrank_vit.pipeline as pipeline

        out = argv[argv.index("--output") + 1]
        seen.append((argv[:-2], pipeline._distillation_loss))
        with open(f"{out}/study.json", "w") as f:
            json.dump({"m": {"cells": {"r@0.7": {"top1": float(len(seen))}}}}, f)
        return 0

    import lowrank_vit.pipeline as pipeline

    library_loss = pipeline._distillation_loss
    monkeypatch.setattr("experiments.loss_aware_study.main", fake_study)
    target = tmp_path / "screen.json"
    assert screen.main(["--losses", "kl,logit-mse", "--models", "m", "--json", str(target)]) == 0
    record = json.loads(target.read_text())
    assert list(record["losses"]) == ["kl", "logit-mse"]
    assert record["losses"]["logit-mse"]["m"]["cells"]["r@0.7"]["top1"] == 2.0
    assert [argv for argv, _ in seen] == [["--models", "m"]] * 2
    assert seen[0][1] is library_loss and seen[1][1] is screen.LOSSES["logit-mse"]
    assert pipeline._distillation_loss is library_loss  # restored after the run
    for bad in (["--losses", "kl,huber"], ["--output", "x"]):
        missing = tmp_path / "no.json"
        assert screen.main([*bad, "--json", str(missing)]) == 2
        assert not missing.exists() and len(capsys.readouterr().err.strip().splitlines()) == 1
