"""``lowrank-vit plan``: a registry row's ranks and sizes without running it (the model built, calibrated on a few
synthetic images, never fine-tuned)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from lowrank_vit.methods.decompositions import get_method
from lowrank_vit.nn.adapters import count_params
from lowrank_vit.nn.quantize import model_size_mib, quantize_
from lowrank_vit.pipeline import apply_plan_skeleton_, plan_compression
from lowrank_vit.repro.models import (
    build_model,
    input_shape,
    model_num_classes,
    synthetic_images,
    synthetic_labelled,
)
from lowrank_vit.repro.registry import (
    Experiment,
    ModelConfig,
    RunConfig,
)
from lowrank_vit.repro.runner import row_config


def plan_row(exp: Experiment, scale: str = "full", *, synthetic: bool = True, calib_images: int = 4,
             overrides: Iterable[str] = (), progress: bool = False) -> dict[str, Any]:
    """Allocate a row's ranks without computing factors or touching data: the row's model with random weights
    (``synthetic``) and ``calib_images`` synthetic calibration images. Returns the parameter counts (and, for rows
    with a size, the model size in MiB under Table 4's accounting)."""
    cfg = row_config(exp, scale, overrides)
    seed = cfg.compression.seed if cfg.compression is not None else 0
    # the random weights are drawn from a generator seeded here (and the caller's random state left as it was),
    # so two plans of one row give the same ranks and totals
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _plan(exp, cfg, scale, synthetic, calib_images, progress, seed)



def _plan(exp: Experiment, cfg: RunConfig, scale: str, synthetic: bool, calib_images: int, progress: bool,
          seed: int) -> dict[str, Any]:
    model_cfg = ModelConfig(cfg.model.source, cfg.model.name, pretrained=not synthetic, kwargs=cfg.model.kwargs)
    model = build_model(model_cfg, progress=progress)
    params_before = count_params(model)
    out: dict[str, Any] = {"name": exp.name, "scale": scale, "seed": seed, "params_before": params_before,
                           "params_after": params_before, "paper_params": _millions(exp.paper.params_m),
                           "reduction": 0.0, "ranks": {}, "layers": []}
    if cfg.compression is not None:
        compression = replace(cfg.compression, calib_samples=calib_images, progress=progress,
                               gram_precision="float32")
        batches: list = synthetic_images(calib_images, input_shape(model), seed=compression.seed)
        if get_method(compression.decomposition).needs_labels(compression):  # a labelled pass: random, seeded
            batches = synthetic_labelled(batches, model_num_classes(model), seed=compression.seed)
        plan = plan_compression(model, batches, compression)
        dense = {name: _module_params(model, name) for name in plan.ranks}
        apply_plan_skeleton_(model, plan)
        out.update(params_after=plan.params_after, target_params=plan.target_params,
                   reduction=1.0 - plan.params_after / params_before, ranks=plan.ranks,
                   layers=[{"name": name, "rank": rank, "dense_params": dense[name],
                            "params": _module_params(model, name)} for name, rank in plan.ranks.items()])
    if cfg.quantization is not None:
        quantize_(model, cfg.quantization.bits, cfg.quantization.include_dense)
    out["size_mib"] = model_size_mib(model, bits=cfg.size_bits)  # Table 4's accounting, for every row
    out["paper_size_mib"] = exp.paper.size_mib
    return out



def _module_params(model: nn.Module, name: str) -> int | None:
    """Parameters of one layer, or None for a unit that is not a module (COMCAT's ``blocks.0.attn.qk.3``)."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        return None
    return sum(p.numel() for p in module.parameters())



def _millions(value: float | None) -> int | None:
    return None if value is None else round(value * 1e6)
