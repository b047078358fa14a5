"""lowrank_vit: activation-aware mixed-rank compression of timm vision transformers.

Reproduces Azizi, Nazemi, Pedram (2024), "Memory-Efficient Vision Transformers: An Activation-Aware Mixed-Rank
Compression Strategy", with exact closed-form variants of its steps beside the literal ones.
"""

__version__ = "0.1.0"  # first: modules of the package read it back at their import

import importlib as _importlib
import os as _os
import sys as _sys

if "torch" not in _sys.modules:
    # OpenMP threads that spin while waiting make every small op 5-30x slower as soon as another process competes
    # for the cores (measured: a training step of the smoke DeiT-S 2.67 s -> 0.38 s under one competing job). Only a
    # default: a value the user set wins, and it can only be set before torch loads OpenMP.
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from lowrank_vit.config import CompressionConfig
from lowrank_vit.io.surgery import fold_lowrank_z_, load_compressed, save_compressed
from lowrank_vit.nn.adapters import count_params, get_adapter  # noqa: E402
from lowrank_vit.nn.factorized import FactorizedLinear, LowRankZ, RowSparseZ, SparseZ
from lowrank_vit.nn.quantize import model_size_mib, quantize_
from lowrank_vit.pipeline import CompressionReport, LayerReport, compress

# The Lightning stages, data modules and registry import Lightning and datasets (seconds): loaded on first use (the
# settings too, so the face stays one table; DataConfig's module itself loads neither).
_LAZY = {
    "DataConfig": "lowrank_vit.stages.data_config",
    "build_datamodule": "lowrank_vit.stages.data",
    "FinetuneConfig": "lowrank_vit.stages.finetune",
    "PartialFinetune": "lowrank_vit.stages.finetune",
    "finetune": "lowrank_vit.stages.finetune",
    "LayerwiseCompensation": "lowrank_vit.stages.lightning_compensation",
    "fit_layerwise": "lowrank_vit.stages.lightning_compensation",
    "make_logger": "lowrank_vit.stages.logging_utils",
    "get_experiment": "lowrank_vit.repro.registry",
    "list_experiments": "lowrank_vit.repro.registry",
    "build_standin": "lowrank_vit.repro.standins",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(_importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lowrank_vit' has no attribute {name!r}")


__all__ = [
    *_LAZY,
    "CompressionConfig",
    "CompressionReport",
    "FactorizedLinear",
    "LayerReport",
    "LowRankZ",
    "RowSparseZ",
    "SparseZ",
    "compress",
    "count_params",
    "fold_lowrank_z_",
    "get_adapter",
    "load_compressed",
    "model_size_mib",
    "quantize_",
    "save_compressed",
]
