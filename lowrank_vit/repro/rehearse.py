"""``lowrank-vit rehearse``: a full-scale row run on a CPU before anyone spends GPU hours on it.

Each row runs its full-scale config through ``lowrank-vit run`` in its own process, as ``reproduce`` runs it, with
only these changes: the weights are random (the same timm architecture, written to a safetensors file and loaded
through ``model.checkpoint``, so timm's pretrained config of the tagged name still decides the preprocessing), the
data is generated in one of the three ImageNet layouts at the model's input size, and calibration, fine-tuning and
evaluation are cut to a few images and steps (``data.calib_samples``, ``finetune.max_steps`` and
``finetune.batch_size``, and ``compression.sgd_iterations`` for the rows whose Z is fitted by SGD: 2,000 steps of a
sparse Z take hours on a CPU; ``run.skip_baseline_guard``, since random weights score nothing).

This module holds, in order:

- what a rehearsal cuts and generates: its settings (:class:`RehearsalSettings`), the error a broken hand-over raises
  (:class:`RehearsalError`), and the generated data, ``images_per_class`` training images for every one of the
  head's classes and ``val_images`` validation images whose labels span the first to the last class (a validation
  image per class would make each evaluation of a full-size model cost minutes on a CPU), written in one of the
  ImageNet layouts (:data:`LAYOUTS`: the hub's parquet files, an image folder, a flat validation folder with its
  ground truth) with timm's ImageNet synsets as class names;
- the hand-over checks: the data module's preprocessing against timm's pretrained config, the input shape against the
  model, the class count and order against the pretrained head's, the run's result.json, the saved model loaded back
  and scoring what the run recorded, and the results table rendering the row;
- a row's rehearsal and the record of outcomes. The command's arguments are in :mod:`lowrank_vit.cli.main`.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from lowrank_vit import __version__
from lowrank_vit.core.allocate import get_policy
from lowrank_vit.io.surgery import load_compressed
from lowrank_vit.methods.prune import measure_sparsity
from lowrank_vit.methods.vmeanba import scan_blocks
from lowrank_vit.nn.adapters import TimmViTAdapter, timm_with_our_models
from lowrank_vit.repro.models import head_classes, input_shape
from lowrank_vit.repro.registry import RunConfig, list_experiments
from lowrank_vit.repro.rows import evaluate, read_result
from lowrank_vit.repro.runner import MODEL_DIR
from lowrank_vit.repro.tables import render_table

LAYOUTS: dict[str, Callable[..., dict[str, Any]]] = {}
"""Layout name -> writer of a generated dataset in that layout (returns the ``data.*`` overrides that read it)."""


def register_layout(name: str) -> Callable:
    def wrap(fn: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
        LAYOUTS[name] = fn
        return fn
    return wrap


class RehearsalError(AssertionError):
    """A hand-over between two stages is not what the next stage needs; the message says which."""


@dataclass
class RehearsalSettings:
    """How far a rehearsal cuts the row (everything else is the row's full-scale config)."""

    layout: str = "hub-parquet"
    devices: int = 1
    """Processes per row (>1: DDP), each on one CPU or one GPU."""
    accelerator: str = "cpu"
    """``"cpu"`` or ``"gpu"``: where the rows run (``lowrank-vit run --accelerator``)."""
    images_per_class: int = 2
    val_images: int = 8
    calib_samples: int = 4
    finetune_steps: int = 2
    batch_size: int = 4
    sgd_steps: int = 5
    """Steps of the SGD solver of Z, for the rows that fit Z by SGD (the loop is the same at any count)."""
    depth: int | None = None
    """Blocks per stage of a shrunk model (None: the full architecture, the default and the point)."""

    def __post_init__(self) -> None:
        if self.accelerator not in ("cpu", "gpu"):
            raise ValueError(f"accelerator must be 'cpu' or 'gpu', got {self.accelerator!r}")
        if self.accelerator == "gpu" and torch.cuda.device_count() < self.devices:
            raise ValueError(f"--accelerator gpu with --devices {self.devices} needs {self.devices} CUDA device(s); "
                             f"torch sees {torch.cuda.device_count()}: use fewer devices or --accelerator cpu")


# ------------------------------------------------------------------------------------------------ generated data


def class_names(num_classes: int) -> list[str]:
    """The synsets of the head's classes in its order: timm's ImageNet-1k table (n01440764 ... n15075141)."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    if num_classes != info.num_classes():
        raise RehearsalError(f"the head predicts {num_classes} classes, not ImageNet-1k's {info.num_classes()}")
    return [info.index_to_label_name(i) for i in range(num_classes)]


def _jpeg(rng: np.random.Generator, size: tuple[int, int]) -> bytes:
    """A smooth random RGB image (noise upsampled), JPEG-encoded."""
    from PIL import Image

    low = rng.integers(0, 256, (max(size[0] // 16, 2), max(size[1] // 16, 2), 3), dtype=np.uint8)
    image = Image.fromarray(low).resize((size[1], size[0]), Image.BILINEAR)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=85)
    return out.getvalue()


def val_labels(num_classes: int, n: int) -> list[int]:
    """``n`` labels spread from the first class to the last (both ends of the class order are exercised)."""
    return sorted({round(i * (num_classes - 1) / max(n - 1, 1)) for i in range(n)})


@register_layout("hub-parquet")
def _write_hub_parquet(root: Path, num_classes: int, size: tuple[int, int], s: RehearsalSettings) -> dict[str, Any]:
    """The hub's ``ILSVRC/imagenet-1k`` as downloaded: ``data/{train,validation}-*.parquet``, integer labels in the
    synset order (the hub names its classes by description, some of which repeat in timm's table, so the generated
    ``ClassLabel`` names are the synsets)."""
    import datasets

    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=class_names(num_classes))})
    rng = np.random.default_rng(0)
    (root / "data").mkdir(parents=True)
    train = [c for c in range(num_classes) for _ in range(s.images_per_class)]
    for split, labels in (("train", train), ("validation", val_labels(num_classes, s.val_images))):
        images = [{"bytes": _jpeg(rng, size), "path": None} for _ in labels]
        datasets.Dataset.from_dict({"image": images, "label": labels}, features=features).to_parquet(
            str(root / "data" / f"{split}-00000-of-00001.parquet"))
    return {"data.path": str(root)}


def _write_folder(folder: Path, labels: list[int], synsets: list[str], rng: np.random.Generator,
                  size: tuple[int, int]) -> None:
    for i, label in enumerate(labels):
        (folder / synsets[label]).mkdir(parents=True, exist_ok=True)
        (folder / synsets[label] / f"{synsets[label]}_{i}.JPEG").write_bytes(_jpeg(rng, size))


@register_layout("imagefolder")
def _write_imagefolder(root: Path, num_classes: int, size: tuple[int, int], s: RehearsalSettings) -> dict[str, Any]:
    """``train/<synset>/*.JPEG`` and ``val/<synset>/*.JPEG``."""
    synsets = class_names(num_classes)
    rng = np.random.default_rng(0)
    _write_folder(root / "train", [c for c in range(num_classes) for _ in range(s.images_per_class)], synsets, rng,
                  size)
    _write_folder(root / "val", val_labels(num_classes, s.val_images), synsets, rng, size)
    return {"data.path": str(root)}


@register_layout("flat-val")
def _write_flat_val(root: Path, num_classes: int, size: tuple[int, int], s: RehearsalSettings) -> dict[str, Any]:
    """``train/<synset>/*.JPEG`` beside a flat ``val/ILSVRC2012_val_NNNNNNNN.JPEG`` and its ground truth, one
    0-based label per line in sorted file name order."""
    synsets = class_names(num_classes)
    rng = np.random.default_rng(0)
    _write_folder(root / "train", [c for c in range(num_classes) for _ in range(s.images_per_class)], synsets, rng,
                  size)
    (root / "val").mkdir()
    labels = val_labels(num_classes, s.val_images)
    for i in range(len(labels)):
        (root / "val" / f"ILSVRC2012_val_{i + 1:08d}.JPEG").write_bytes(_jpeg(rng, size))
    truth = root / "val_ground_truth.txt"
    truth.write_text("".join(f"{label}\n" for label in labels))
    return {"data.path": str(root), "data.val_labels": str(truth)}


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
            # a policy that lands under its target by design (COMCAT's argmax ranks) must only not exceed it
            gap = exp.reduction - result["measured_reduction"]
            under = get_policy(cfg.compression.allocation).under_target
            check_handover(gap <= 5e-3 if under else abs(gap) <= 5e-3,
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
    if cfg.pruning is not None:
        pruning = result.get("pruning") or {}
        reached, asked = pruning.get("sparsity"), result["config"]["pruning"]["sparsity"]
        # each layer's count is rounded to a whole weight: at most half a weight per layer off the fraction asked
        slack = 0.5 * len(pruning.get("layers") or {}) / max(pruning.get("weights") or 1, 1) + 1e-12
        check_handover(reached is not None and abs(reached - asked) <= slack,
                       f"the pruning left {reached!r} of the block weights zero, the row asks {asked}")
    if cfg.compression is None and cfg.quantization is None and cfg.vmeanba is None and cfg.pruning is None:
        check_handover(result["top1"] == result["dense"]["top1"], "a baseline's final top-1 differs from its dense one")


def check_saved_model(exp: Any, out: Path, result: dict[str, Any], dm: Any, device: str = "cpu") -> None:
    """The saved model loads back and scores on the validation images exactly what the run recorded (evaluated on
    the kind of device the row ran on: a GPU's float32 products round differently from a CPU's); a pruned one holds
    the zeros the run recorded."""

    if exp.full.compression is None and exp.full.vmeanba is None and exp.full.pruning is None:
        return
    model = load_compressed(out / exp.name / MODEL_DIR)
    if exp.full.pruning is not None:
        zeros = measure_sparsity(model).zeros
        check_handover(zeros == (result.get("pruning") or {}).get("zeros"),
                       f"the saved model holds {zeros} zero block weights, the run recorded "
                       f"{(result.get('pruning') or {}).get('zeros')}")
    top1 = evaluate(model.to(device), dm.val_dataloader(), torch.device(device), progress=False)["top1"]
    check_handover(abs(top1 - result["top1"]) < 1e-6,
                   f"the saved model scores {top1:.2f}% on the validation images, the run recorded "
                   f"{result['top1']:.2f}%")


def check_table(exp: Any, out: Path, result: dict[str, Any]) -> None:
    """The results table of the row's table renders it with its measured top-1."""

    text = render_table(exp.table, [exp], "full", out)
    check_handover(f"{result['top1']:.2f}" in text and "Not run yet" not in text,
                   f"the {exp.table} table does not render {exp.name}'s result")


def _run_command(exp: Any, out: Path, overrides: dict[str, Any], settings: RehearsalSettings) -> list[str]:
    command = [sys.executable, "-m", "lowrank_vit.cli.main", "run", exp.name, "--scale", "full",
               "--output", str(out), "--accelerator", settings.accelerator, "--devices", str(settings.devices),
               "--wandb", "disabled", "--quiet"]
    for key, value in overrides.items():
        command += ["--set", f"{key}={value if isinstance(value, str) else json.dumps(value)}"]
    return command


def rehearse_row(exp: Any, work: Path, settings: RehearsalSettings) -> str:
    """Rehearse one row in ``work``; returns a note on what was cut. Raises on the first broken hand-over."""

    timm = timm_with_our_models()

    from lowrank_vit.stages.data import build_datamodule

    cfg = exp.full
    kwargs = dict(cfg.model.kwargs)
    note = "full size"
    torch.manual_seed(0)
    model = timm.create_model(cfg.model.name, pretrained=False, **kwargs)
    if settings.depth is not None:
        kwargs.update(TimmViTAdapter().shrunk_kwargs(model, settings.depth))
        note = f"SHRUNK to {kwargs} (not the full architecture)"
        model = timm.create_model(cfg.model.name, pretrained=False, **kwargs)
    weights = work / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    shape = input_shape(model)
    data = LAYOUTS[settings.layout](work / "data", int(model.num_classes), shape[1:], settings)
    overrides: dict[str, Any] = {"model.checkpoint": str(weights), **data, "data.calib_samples": settings.calib_samples,
                                 "data.num_workers": 0, "data.cache_dir": str(work / "hf_cache"),
                                 "run.skip_baseline_guard": True}
    if kwargs != cfg.model.kwargs:
        overrides["model.kwargs"] = kwargs
    if cfg.compression is not None:
        overrides["compression.calib_samples"] = settings.calib_samples
        if cfg.compression.fits_z_by_sgd:
            overrides["compression.sgd_iterations"] = settings.sgd_steps
        if settings.depth is not None and cfg.compression.target_params is not None:
            fraction = 1.0 - cfg.compression.target_params / sum(p.numel() for p in timm.create_model(
                cfg.model.name, pretrained=False, **cfg.model.kwargs).parameters())
            overrides.update({"compression.target_params": None, "compression.reduction": round(fraction, 6)})
            note += f"; target {cfg.compression.target_params:,} parameters as the fraction {fraction:.4f}"
    if cfg.finetune is not None:
        overrides.update({"finetune.max_steps": settings.finetune_steps, "finetune.batch_size": settings.batch_size})
    if cfg.vmeanba is not None:  # the impact scores over a few images, one timing repeat at the rehearsal's batch
        overrides.update({"vmeanba.calib_samples": settings.calib_samples, "vmeanba.repeats": 1,
                          "vmeanba.latency_batch": settings.batch_size})

        blocks = len(scan_blocks(model))
        if cfg.vmeanba.num_blocks is not None and cfg.vmeanba.num_blocks > blocks:  # only a shrunk model has fewer
            overrides["vmeanba.num_blocks"] = blocks
            note += f"; VMeanba in all {blocks} blocks of the shrunk model, not {cfg.vmeanba.num_blocks}"
    run_cfg: RunConfig = cfg.override(f"{k}={v if isinstance(v, str) else json.dumps(v)}"
                                      for k, v in overrides.items())
    dm = build_datamodule(run_cfg.data, model)
    check_data(model, dm)

    out = work / "results"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}  # a rehearsal needs no network
    proc = subprocess.run(_run_command(exp, out, overrides, settings), check=False, capture_output=True, text=True,
                          env=env)
    if proc.returncode < 0:  # a signal: no traceback to quote; SIGKILL is most often the out-of-memory killer
        name = signal.Signals(-proc.returncode).name if -proc.returncode in signal.valid_signals() else "?"
        hint = " (on Linux most often the out-of-memory killer: try --devices 1 or more memory)" if (
            name == "SIGKILL") else ""
        raise RehearsalError(f"`lowrank-vit run` was killed by {name}{hint}")
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        raise RehearsalError(f"`lowrank-vit run` exited with {proc.returncode}: {lines[-1] if lines else '?'}")
    result = read_result(out / exp.name)
    check_handover(result is not None, "the run wrote no readable result.json")
    assert result is not None
    check_result(exp, result, settings, model)
    check_saved_model(exp, out, result, dm, "cuda" if settings.accelerator == "gpu" else "cpu")
    check_table(exp, out, result)
    return note


def _same_settings(line: dict[str, Any], settings: RehearsalSettings) -> bool:
    # records written before the accelerator was an option ran on the CPU
    return (line.get("layout"), line.get("devices"), line.get("depth"), line.get("accelerator", "cpu")) == (
        settings.layout, settings.devices, settings.depth, settings.accelerator)


def read_record(record: str | os.PathLike, settings: RehearsalSettings) -> dict[str, dict[str, Any]]:
    """The last recorded outcome of each row rehearsed with the same layout, devices, accelerator and depth as
    ``settings``.

    Raises:
        ValueError: a line of ``record`` is not a JSON object (the file is not a rehearsal record).
    """
    path = Path(record)
    last: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return last
    for number, text in enumerate(path.read_text().splitlines(), 1):
        if not text.strip():
            continue
        try:
            line = json.loads(text)
        except json.JSONDecodeError:
            line = None
        if not isinstance(line, dict) or "name" not in line:
            raise ValueError(f"{path}:{number} is not a rehearsal record line (a JSON object with a name)")
        if _same_settings(line, settings):
            last[line["name"]] = line
    return last


def _append_record(record: Path, outcome: dict[str, Any], settings: RehearsalSettings) -> None:
    record.parent.mkdir(parents=True, exist_ok=True)
    line = {**outcome, "layout": settings.layout, "devices": settings.devices, "accelerator": settings.accelerator,
            "depth": settings.depth, "version": __version__,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with record.open("a") as f:  # appended, never rewritten: the record of earlier runs stays
        f.write(json.dumps(line) + "\n")


def _check_paths(keep: str | os.PathLike | None, record: str | os.PathLike | None) -> None:
    """Refuse a ``keep`` that is not a directory and a ``record`` that could not be appended to, before any row
    runs: the first row's temporary folder, and the record once the row has ended, would otherwise fail with a bare
    OSError, the latter after the row's minutes of work."""
    if keep is not None and not Path(keep).is_dir():
        raise ValueError(f"--workdir {keep}: {'not a directory' if Path(keep).exists() else 'no such directory'}")
    if record is None:
        return
    path = Path(record)
    if path.is_dir():
        raise ValueError(f"--record {record} is a directory; it must name a file (e.g. {path / 'rehearse.jsonl'})")
    parent = next(a for a in path.absolute().parents if a.exists())  # _append_record creates the missing ones
    if not parent.is_dir():
        raise ValueError(f"--record {record}: {parent} is a file, not a directory")


def rehearse(patterns: str | list[str], settings: RehearsalSettings, *, keep: str | os.PathLike | None = None,
             echo: Callable[[str], None] = print, record: str | os.PathLike | None = None,
             resume: bool = False) -> list[dict[str, Any]]:
    """Rehearse every row matching one of ``patterns`` (each row once); one line per row through ``echo``. Returns
    each row's outcome (``name``, ``ok``, ``message``, ``seconds``, and ``recorded`` for a row taken from the
    record).

    ``record``: a JSON-lines file each row's outcome is appended to as soon as the row ends (with the layout,
    devices, depth, package version and time), so a run of hours that stops keeps what it found. ``resume``: rows
    whose last outcome in ``record`` (same layout, devices and depth) is ok are not run again.

    Raises:
        ValueError: a pattern matches no row, an unknown layout, ``resume`` without ``record``, a record that
            is not one or cannot be written, or a ``keep`` that is not a directory.
    """
    if resume and record is None:
        raise ValueError("--resume needs --record FILE (the outcomes of the run to resume)")
    _check_paths(keep, record)
    prior = read_record(record, settings) if record is not None else {}  # checked first: never append to a non-record
    done = {name: line for name, line in prior.items() if line.get("ok")} if resume else {}

    if settings.layout not in LAYOUTS:
        raise ValueError(f"unknown layout {settings.layout!r}; layouts: {', '.join(LAYOUTS)}")
    import datasets

    datasets.disable_progress_bars()  # the rows' lines are the output
    exps: dict[str, Any] = {}
    for pattern in [patterns] if isinstance(patterns, str) else patterns:
        matched = list_experiments(pattern)
        if not matched:
            raise ValueError(f"no experiment matches {pattern!r}")
        exps.update((e.name, e) for e in matched)
    outcomes = []
    for exp in exps.values():
        if exp.name in done:
            line = done[exp.name]
            echo(f"{exp.name}: ok, recorded {line.get('finished', '?')} ({line.get('seconds', '?')} s, version "
                 f"{line.get('version', '?')}); not run again (--resume)")
            outcomes.append({"name": exp.name, "ok": True, "message": line.get("message", "ok"),
                             "seconds": float(line.get("seconds", 0.0)), "recorded": True})
            continue
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="rehearse-", dir=keep) as tmp:
            try:
                note = rehearse_row(exp, Path(tmp), settings)
                ok, message = True, f"ok ({note})"
            except Exception as err:  # noqa: BLE001 - every failure is a finding, reported on the row's line
                ok, message = False, f"BROKEN: {type(err).__name__}: {' '.join(str(err).split())[:400]}"
        seconds = time.perf_counter() - started
        echo(f"{exp.name}: {message} [{seconds:.0f} s, layout {settings.layout}]")
        outcomes.append({"name": exp.name, "ok": ok, "message": message, "seconds": round(seconds, 1)})
        if record is not None:
            _append_record(Path(record), outcomes[-1], settings)
    return outcomes


__all__ = ["LAYOUTS", "RehearsalError", "RehearsalSettings", "check_data",
           "check_preprocessing", "check_result", "read_record", "rehearse", "rehearse_row", "register_layout"]
