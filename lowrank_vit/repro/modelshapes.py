"""What the cost model (:mod:`lowrank_vit.repro.estimate`) reads off a row's model, per image: the forward's
FLOPs, the compressible linears with the tokens each sees, the parameter count, the activations' sizes and the
selective-scan blocks. The model is built with timm on the meta device (no weights, no memory), so this module, like
the estimate, imports torch and timm only, never Lightning."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lowrank_vit.nn.adapters import get_adapter
from lowrank_vit.repro.models import build_model, input_shape
from lowrank_vit.repro.registry import ModelConfig


@dataclass(frozen=True)
class LinearShape:
    name: str
    in_features: int
    out_features: int
    tokens: int
    """Tokens per image the layer sees (Swin's stages differ)."""
    block: str = ""
    """The block the adapter puts it in (``layers_by_block``): what the refit records at once."""


@dataclass(frozen=True)
class ModelShapes:
    """What the cost model reads off a model, per image."""

    forward_flops: float
    """Every matrix product and convolution of one image's forward, attention's products included."""
    layers: tuple[LinearShape, ...]
    """The compressible linears (the adapter's), in forward order."""
    params: int
    activation_bytes: float
    """Sum of every leaf module's float32 output: what a training step keeps for its backward, per image."""
    peak_output_bytes: float
    """The largest single float32 output: what an inference pass holds at once, per image (times two)."""
    scan_blocks: int = 0
    """Selective-scan blocks (vision state-space models): VMeanba's candidates."""

    @property
    def compressible_flops(self) -> float:
        return float(sum(2 * layer.tokens * layer.in_features * layer.out_features for layer in self.layers))


def count_shapes(model: nn.Module, input_shape: tuple[int, int, int]) -> ModelShapes:
    """Count one image's forward on ``model`` (meta device or not) with torch's FLOP counter, and record the
    compressible linears' token counts and the activations' sizes from forward hooks."""


    device = next(model.parameters()).device
    compressible = get_adapter(model).compressible_layers(model)
    names = {id(module): name for name, module in compressible.items()}
    tokens: dict[str, int] = {}
    outputs: list[int] = []

    def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        if isinstance(output, torch.Tensor):
            outputs.append(output.numel())
        if id(module) in names:
            tokens[names[id(module)]] = inputs[0].numel() // module.in_features

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model.eval()(torch.zeros(1, *input_shape, device=device))
    finally:
        for handle in handles:
            handle.remove()
    block_of = {layer: block for block, layers in get_adapter(model).layers_by_block(model).items() for layer in layers}
    layers = tuple(LinearShape(name, m.in_features, m.out_features, tokens[name], block_of.get(name, ""))
                   for name, m in compressible.items() if name in tokens)
    return ModelShapes(float(counter.get_total_flops()), layers, sum(p.numel() for p in model.parameters()),
                       4.0 * sum(outputs), 4.0 * max(outputs, default=0),
                       scan_blocks=len(get_adapter(model).scan_modules(model)))


@functools.lru_cache(maxsize=16)
def _shapes(source: str, name: str, kwargs_json: str) -> ModelShapes:
    with torch.device("meta"):  # shapes only: no weights are drawn or downloaded
        model = build_model(ModelConfig(source, name, pretrained=False, kwargs=json.loads(kwargs_json)),
                            progress=False)
    return count_shapes(model, input_shape(model))


def model_shapes(cfg: ModelConfig) -> ModelShapes:
    """The shapes of a row's model, built with random weights on the meta device (cached per model)."""
    return _shapes(cfg.source, cfg.name.split(".")[0] if cfg.source == "timm" else cfg.name,
                   json.dumps(cfg.kwargs, sort_keys=True))
