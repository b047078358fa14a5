"""lowrank_vit: activation-aware mixed-rank compression of timm vision transformers.

Reproduces Azizi, Nazemi, Pedram (2024), "Memory-Efficient Vision Transformers: An Activation-Aware Mixed-Rank
Compression Strategy", with exact closed-form variants of its steps beside the literal ones.
"""

from lowrank_vit.adapters import count_params, get_adapter
from lowrank_vit.config import CompressionConfig
from lowrank_vit.factorized import FactorizedLinear, LowRankZ, RowSparseZ, SparseZ
from lowrank_vit.pipeline import CompressionReport, LayerReport, compress
from lowrank_vit.quantize import model_size_mib, quantize_
from lowrank_vit.surgery import load_compressed, save_compressed

__version__ = "0.1.0"

__all__ = [
    "CompressionConfig",
    "CompressionReport",
    "FactorizedLinear",
    "LayerReport",
    "LowRankZ",
    "RowSparseZ",
    "SparseZ",
    "compress",
    "count_params",
    "get_adapter",
    "load_compressed",
    "model_size_mib",
    "quantize_",
    "save_compressed",
]
