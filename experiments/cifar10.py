"""The comparison table on real natural images: a small DeiT trained here on CIFAR-10, then compressed by every method.

    python -m experiments.cifar10 --data PATH/TO/cifar10 [--output results/cifar10] [--rows 'compare/deit_s/*']

``PATH/TO/cifar10`` is a local copy of the hub dataset ``uoft-cs/cifar10`` (``train.parquet`` and ``test.parquet``, or
any layout :func:`lowrank_vit.stages.data.build_datamodule` reads; ``--data uoft-cs/cifar10`` downloads it).

1. Train: a DeiT (timm's ``deit_small_patch16_224`` class, shrunk to 32x32 inputs on 4x4 patches) from scratch on the
   50,000 training images, evaluated on the 10,000 test images. The weights go to ``OUTPUT/model.safetensors`` beside
   ``OUTPUT/model.json`` (recipe, data, top-1, seconds); a later call with the same recipe and the same images
   (wherever they lie) reuses them.
2. Compare: ``lowrank-vit reproduce compare`` on the chosen rows with overrides that swap the MNIST stand-in for this
   model (``model.checkpoint``) and the digits for CIFAR-10 (``data.path``), and a fine-tune of ``--finetune-steps``
   steps. Every row is one process and one wandb run of the group ``compare-cifar10``; finished rows are skipped, so an
   interrupted comparison resumes. ``OUTPUT/compare.md`` is the table.

Sized for a CPU: the default recipe trains in about 20 minutes on two cores, and one comparison row takes about a
minute. On a GPU, raise ``--epochs`` and the width for a stronger starting model.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

TIMM_NAME = "deit_small_patch16_224"


@dataclass(frozen=True)
class Recipe:
    """How the starting model is built and trained; every field enters the fingerprint of the cached weights."""

    model_kwargs: dict[str, Any] = field(default_factory=lambda: {
        "img_size": 32, "in_chans": 3, "num_classes": 10, "patch_size": 4, "embed_dim": 128, "depth": 4,
        "num_heads": 2, "mlp_ratio": 4.0, "global_pool": "avg", "class_token": False})
    epochs: int = 6
    lr: float = 2e-3
    batch_size: int = 128
    weight_decay: float = 0.05
    warmup_fraction: float = 0.05
    label_smoothing: float = 0.1
    max_shift: int = 4
    """Random translation by up to this many pixels (CIFAR's usual 4-pixel padded crop), plus horizontal flips."""
    seed: int = 0
    timm_name: str = TIMM_NAME
    """The timm architecture that ``model_kwargs`` shrink."""

    def fingerprint(self, data: str) -> str:
        """The recipe and ``data`` (:func:`data_identity`'s string; records written before it existed hashed the
        path as given, which :func:`train` still accepts)."""
        # the architecture enters beside the recipe, as it always has: models trained before the field existed keep
        # their fingerprints (and are not trained again)
        recipe = {k: v for k, v in asdict(self).items() if k != "timm_name"}
        payload = json.dumps({"recipe": recipe, "timm_name": self.timm_name, "data": data}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def data_identity(data: str) -> str:
    """What ``data`` holds, wherever it lies: ``sha256:`` of a local copy's parquet files (their paths inside it and
    their bytes; an image folder: its files' paths and sizes), or a hub dataset's name. The same CIFAR-10 under
    another path, or named relatively rather than absolutely, is the same data: its committed models are not trained
    again (and overwritten), and no machine's path is written into a record."""
    local = Path(data).expanduser()
    if not local.exists():
        return data
    files = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file())
    parquet = [p for p in files if p.suffix == ".parquet"]
    digest = hashlib.sha256()
    for path in parquet or files:
        digest.update(f"{path.relative_to(local) if local.is_dir() else path.name}\0".encode())
        if parquet:
            with path.open("rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
        else:
            digest.update(f"{path.stat().st_size}\0".encode())
    return f"sha256:{digest.hexdigest()[:16]}"


def _data_config(data: str, **kwargs: Any):
    from lowrank_vit.stages.data_config import DataConfig

    local = Path(data).expanduser()
    return DataConfig(path=str(local.resolve()), **kwargs) if local.exists() else DataConfig(name=data, **kwargs)


def train(data: str, output: Path, recipe: Recipe, progress: bool = True) -> dict[str, Any]:
    """Train the starting model unless ``output`` already holds one of this recipe; returns its record."""
    from safetensors.torch import save_file

    from lowrank_vit.nn.adapters import timm_with_our_models
    from lowrank_vit.repro.tensortrain import evaluate_top1, random_shift, stack_dataset, train_classifier
    from lowrank_vit.stages.data import build_datamodule

    record_file, weights_file = output / "model.json", output / "model.safetensors"
    identity = data_identity(str(data))
    fingerprint = recipe.fingerprint(identity)
    if record_file.is_file() and weights_file.is_file():
        record = json.loads(record_file.read_text())
        if record.get("fingerprint") in (fingerprint, recipe.fingerprint(str(data))):  # the latter: older records
            print(f"starting model: {weights_file} (top-1 {record['top1']:.2f}%, trained before)", file=sys.stderr)
            return record
    start = time.perf_counter()
    torch.manual_seed(recipe.seed)
    model = timm_with_our_models().create_model(recipe.timm_name, pretrained=False, **recipe.model_kwargs)
    dm = build_datamodule(_data_config(data, augment=False, batch_size=256), model=model)
    dm.setup()
    print(f"decoding {len(dm.train_dataset):,} training and {len(dm.val_dataset):,} test images", file=sys.stderr)
    x_train, y_train = stack_dataset(dm.train_dataset, progress, "decoding training images")
    x_test, y_test = stack_dataset(dm.val_dataset, progress, "decoding test images")

    def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        flip = torch.rand(len(x), generator=generator) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return random_shift(x, recipe.max_shift, 0.0, generator)  # 0 is the mean colour after normalization

    history = train_classifier(model, x_train, y_train, epochs=recipe.epochs, lr=recipe.lr,
                               batch_size=recipe.batch_size, weight_decay=recipe.weight_decay,
                               warmup_fraction=recipe.warmup_fraction, label_smoothing=recipe.label_smoothing,
                               seed=recipe.seed, augment=augment, desc="training on CIFAR-10", progress=progress)
    top1 = evaluate_top1(model, x_test, y_test)
    output.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights_file))
    record = {"fingerprint": fingerprint, "timm_name": recipe.timm_name, "recipe": asdict(recipe), "data": identity,
              "top1": top1, "params": sum(p.numel() for p in model.parameters()),
              "seconds": time.perf_counter() - start, "threads": torch.get_num_threads(), **history}
    record_file.write_text(json.dumps(record, indent=2) + "\n")
    print(f"starting model: top-1 {top1:.2f}% on the test images -> {weights_file}", file=sys.stderr)
    return record


def overrides(data: str, output: Path, recipe: Recipe, finetune_steps: int) -> list[str]:
    """The ``--set`` assignments that turn a smoke-scale comparison row into its CIFAR-10 version."""
    data_cfg = _data_config(data)
    return [
        "model.source=timm", f"model.name={recipe.timm_name}", "model.pretrained=false",
        f"model.kwargs={json.dumps(recipe.model_kwargs)}",
        f"model.checkpoint={(output / 'model.safetensors').resolve()}",
        f"data.name={json.dumps(data_cfg.name)}", f"data.path={json.dumps(data_cfg.path)}",
        f"finetune.max_steps={finetune_steps}",
        # The model learned from shifted and flipped images; timm's ImageNet training transform (random-resized crops
        # down to 8% of a 32-pixel image, colour jitter) is another distribution: measured on ours-40, fine-tuning
        # through it took top-1 from 60.22% to 56.51%. Fewer than two epochs of steps need no augmentation.
        "data.augment=false",
    ]


def train_models(models: dict[str, Recipe], prog: str, description: str, argv: list[str] | None = None) -> int:
    """The command line of a script that trains named CIFAR-10 models (``--data``, ``--output``, ``--only``)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--data", required=True, help="local CIFAR-10 (train.parquet and test.parquet)")
    parser.add_argument("--output", default="experiments/models")
    parser.add_argument("--only", choices=sorted(models), default=None)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    for name, recipe in models.items():
        if args.only and name != args.only:
            continue
        record = train(args.data, Path(args.output) / name, recipe, progress=not args.quiet)
        print(f"{name}: top-1 {record['top1']:.2f}%", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.cifar10", description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="local CIFAR-10 (parquet files or image folders) or a hub name")
    parser.add_argument("--output", default="results/cifar10", help="where the model, the runs and the table go")
    parser.add_argument("--model-dir", default=None,
                        help="where the starting model is trained or found (default: --output); lets a variant of "
                             "the comparison go to its own --output without training again")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", dest="extra",
                        help="one more override for every row, e.g. --set compression.rank_multiple=8 (repeatable)")
    parser.add_argument("--rows", default="compare/deit_s/*", help="comparison rows to run (shell pattern)")
    parser.add_argument("--epochs", type=int, default=Recipe.epochs, help="training epochs of the starting model")
    parser.add_argument("--finetune-steps", type=int, default=150, help="steps of each row's partial fine-tune")
    parser.add_argument("--train-only", action="store_true", help="train the starting model, compare nothing")
    parser.add_argument("--wandb", choices=("online", "offline", "disabled"), default="offline")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    from lowrank_vit.repro.models import SetupError
    from lowrank_vit.repro.runner import reproduce

    recipe = Recipe(epochs=args.epochs)
    output = Path(args.output)
    model_dir = Path(args.model_dir) if args.model_dir else output
    try:
        train(args.data, model_dir, recipe, progress=not args.quiet)
        if args.train_only:
            return 0
        data = reproduce("compare", "smoke", rows=args.rows, output=output, wandb=args.wandb,
                         overrides=overrides(args.data, model_dir, recipe, args.finetune_steps) + args.extra,
                         progress=not args.quiet, group="compare-cifar10")
    except (SetupError, ValueError, OSError) as err:
        print(f"python -m experiments.cifar10: error: {err}", file=sys.stderr)
        return 2
    print(f"table: {output / 'compare.md'}", file=sys.stderr)
    return 1 if data.get("failed") else 0


if __name__ == "__main__":
    raise SystemExit(main())
