"""The hand-over checks of a rehearsal (:mod:`lowrank_vit.harness.rehearse`): the data module's preprocessing
against timm's pretrained config, the input shape against the model, the class count and order against the
pretrained head's (timm's ImageNet synsets), the run's result.json, the saved model loaded back and scoring what the
run recorded, and the results table rendering the row. Each raises
:class:`~lowrank_vit.harness.rehearsaldata.RehearsalError` saying which hand-over broke."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowrank_vit.harness.rehearsaldata import RehearsalError, RehearsalSettings, class_names, val_labels


def check_handover(condition: bool, message: str) -> None:
    if not condition:
        raise RehearsalError(message)


def _labelled_features(dataset: Any) -> Any:
    """The Hugging Face features behind a split (through ``Subset``\\ s), or None."""
    while hasattr(dataset, "dataset") and not hasattr(dataset, "label_column"):
        dataset = dataset.dataset
    inner = getattr(dataset, "dataset", None)
    return None if inner is None else inner.features[dataset.label_column]


def check_preprocessing(model: nn.Module, pre: dict[str, Any], where: str) -> None:
    """``pre`` (a data module's, or the one a run recorded) is timm's pretrained config of the model's tagged name
    at the model's input shape."""
    from lowrank_vit.harness.models import input_shape

    cfg = model.pretrained_cfg
    for key in ("mean", "std", "interpolation", "crop_pct"):
        got, want = pre.get(key), cfg.get(key)
        same = got == want or (isinstance(want, (tuple, list)) and isinstance(got, (tuple, list))
                               and tuple(got) == tuple(want))
        check_handover(same, f"{where}: preprocessing {key} is {got!r}, timm's pretrained config of "
                             f"{cfg.get('architecture')} says {want!r}")
    shape = input_shape(model)
    check_handover(tuple(pre.get("input_size") or ()) == shape,
                   f"{where}: the data makes {pre.get('input_size')} images, the model takes {shape}")


def check_data(model: nn.Module, dm: Any) -> None:
    """What the data module hands calibration, fine-tuning and evaluation: timm's pretrained preprocessing, images
    of the model's input shape, the head's class count and class order."""
    from lowrank_vit.harness.models import head_classes, input_shape

    check_preprocessing(model, dm.preprocessing, "the data module")
    shape = input_shape(model)
    classes = head_classes(model)
    check_handover(dm.num_classes == classes, f"the data has {dm.num_classes} classes, the head predicts {classes}")
    expected = class_names(classes)
    for split, dataset in (("training", dm.train_dataset), ("validation", dm.val_dataset)):
        feature = _labelled_features(dataset)
        names = list(getattr(feature, "names", []) or [])
        check_handover(names == expected, f"the {split} split's class order differs from the pretrained head's "
                                          f"(first {names[:2]}, expected {expected[:2]})")
    for loader in (dm.calibration_dataloader(), dm.val_dataloader()):
        images, labels = next(iter(loader))
        check_handover(tuple(images.shape[1:]) == shape, f"a batch holds {tuple(images.shape[1:])} images, not {shape}")
        check_handover(int(labels.min()) >= 0 and int(labels.max()) < classes, "labels outside the head's classes")


def check_result(exp: Any, result: dict[str, Any], settings: RehearsalSettings, model: nn.Module) -> None:
    """result.json: every stage's figures present, the run's preprocessing timm's, the budget met, the fine-tune
    cut where it was asked to be."""
    cfg = exp.full
    for key in ("top1", "top5", "params", "params_before", "size_mib", "dense", "config", "stage_seconds",
                "preprocessing"):
        check_handover(key in result, f"result.json lacks {key!r}")
    check_preprocessing(model, result["preprocessing"], "the run")
    expected_val = len(val_labels(int(result["config"]["model"].get("kwargs", {}).get("num_classes", 1000)),
                                  settings.val_images))
    check_handover(result["val_images"] == expected_val,
                   f"the final evaluation saw {result['val_images']} images, the validation split has {expected_val}")
    if cfg.compression is not None:
        check_handover(result["params"] < result["params_before"], "compression removed no parameter")
        if exp.reduction is not None and settings.depth is None and cfg.compression.reduction is not None:
            check_handover(abs(result["measured_reduction"] - exp.reduction) <= 5e-3,
                           f"removed {100 * result['measured_reduction']:.2f}% of the parameters, the row asks "
                           f"{100 * exp.reduction:.0f}%")
        check_handover("report" in result, "result.json lacks the compression report")
        if cfg.compression.fits_z_by_sgd:
            ran = result["report"]["config"].get("settings", {}).get("sgd_iterations")
            check_handover(ran == settings.sgd_steps and result["report"].get("sgd_loss"),
                           f"the SGD solver of Z was set to {ran} steps, not {settings.sgd_steps}, or reported no loss")
    if cfg.finetune is not None:
        steps, world = ((result.get("finetune") or {}).get(k) for k in ("steps", "world_size"))
        check_handover(steps == settings.finetune_steps,
                       f"the fine-tune ran {steps} steps, not {settings.finetune_steps}")
        check_handover(world == settings.devices, f"the fine-tune ran in {world} process(es), not {settings.devices}")
        check_handover("compressed" in result, "no evaluation between compression and fine-tuning")
    if cfg.vmeanba is not None:
        chosen = (result.get("vmeanba") or {}).get("chosen")
        wanted = result["config"]["vmeanba"]["num_blocks"]
        check_handover(chosen is not None and (wanted is None or len(chosen) == wanted),
                       f"VMeanba switched {chosen!r} blocks, the row asks {wanted}")
    if cfg.compression is None and cfg.quantization is None and cfg.vmeanba is None:
        check_handover(result["top1"] == result["dense"]["top1"], "a baseline's final top-1 differs from its dense one")


def check_saved_model(exp: Any, out: Path, result: dict[str, Any], dm: Any, device: str = "cpu") -> None:
    """The saved model loads back and scores on the validation images exactly what the run recorded (evaluated on
    the kind of device the row ran on: a GPU's float32 products round differently from a CPU's)."""
    from lowrank_vit.harness.runner import MODEL_DIR, evaluate
    from lowrank_vit.io.surgery import load_compressed

    if exp.full.compression is None and exp.full.vmeanba is None:
        return
    model = load_compressed(out / exp.name / MODEL_DIR)
    top1 = evaluate(model.to(device), dm.val_dataloader(), torch.device(device), progress=False)["top1"]
    check_handover(abs(top1 - result["top1"]) < 1e-6,
                   f"the saved model scores {top1:.2f}% on the validation images, the run recorded "
                   f"{result['top1']:.2f}%")


def check_table(exp: Any, out: Path, result: dict[str, Any]) -> None:
    """The results table of the row's table renders it with its measured top-1."""
    from lowrank_vit.harness.tables import render_table

    text = render_table(exp.table, [exp], "full", out)
    check_handover(f"{result['top1']:.2f}" in text and "Not run yet" not in text,
                   f"the {exp.table} table does not render {exp.name}'s result")
