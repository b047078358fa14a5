"""Post-training quantization (Section 4.3, Appendix B, eq. 16) and the model-size accounting of Table 4.

Round-to-nearest, asymmetric, one scale and zero point per output channel:
``s = (max - min) / (2^N - 1)``, ``z = round(-min / s)``, ``q = clamp(round(U / s) + z, 0, 2^N - 1)``,
``U_hat = s (q - z)``. ``quantize_`` replaces each tensor by ``U_hat`` in place (so the model runs as before, with
quantized values) and records which parameters are quantized at how many bits on the model, so that
``model_size_mib`` and ``save_compressed`` (which stores the integer codes) know.

Size accounting (``model_size_mib``): a quantized tensor costs N bits per value plus a 16-bit scale and a 16-bit
zero point per channel; every other parameter costs ``bits`` (16 by default: FP16, as Table 4). Buffers (index
lists of sparse Z) are counted at 32 bits each. 1 MiB = 2^20 bytes. Uncompressed DeiT-B (86,567,656 parameters) at
FP16 is 165.1 MiB; the paper prints 165.2 from its rounded 86.6M.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lowrank_vit.nn.comcat import FactorizedAttention
from lowrank_vit.nn.factorized import FactorizedLinear, ZModule

QUANT_ATTR = "lowrank_vit_quantization"
"""Name of the attribute on the root model that records ``{parameter name: {"bits", "axis"}}``."""


@dataclass
class QuantizedTensor:
    codes: torch.Tensor
    """Integer codes in [0, 2^N - 1]."""
    scale: torch.Tensor
    zero_point: torch.Tensor
    axis: int | None
    """Channel axis: scale/zero_point vary along it; ``None`` for one pair for the whole tensor."""

    def dequantize(self) -> torch.Tensor:
        if self.axis is None:
            return self.scale * (self.codes.float() - self.zero_point)
        shape = [1] * self.codes.ndim
        shape[self.axis] = -1
        return self.scale.view(shape) * (self.codes.float() - self.zero_point.view(shape))


def quantize_tensor(tensor: torch.Tensor, bits: int, axis: int | None) -> QuantizedTensor:
    """Eq. (16), per channel along ``axis`` (or per tensor)."""
    if not 2 <= bits <= 16:
        raise ValueError(f"bits must be between 2 and 16, got {bits}")
    t = tensor.detach().float()
    if not torch.isfinite(t).all():
        raise ValueError("cannot quantize a tensor that contains NaN or inf")
    levels = 2**bits - 1
    if axis is None:
        lo, hi = t.min().clamp(max=0.0), t.max().clamp(min=0.0)
    else:
        reduce = [d for d in range(t.ndim) if d != axis]
        lo = t.amin(dim=reduce).clamp(max=0.0)
        hi = t.amax(dim=reduce).clamp(min=0.0)
    # Including 0 in the range keeps exact zeros exact; a constant-zero channel gets scale 1.
    # divided by a tensor, not a Python number: CUDA turns division by a number into multiplication by its
    # reciprocal, one rounding off the CPU's, and the codes of a model quantized on a GPU would then differ
    scale = (hi - lo) / torch.tensor(float(levels), dtype=hi.dtype, device=hi.device)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero_point = torch.round(-lo / scale)
    if axis is None:
        s, z = scale, zero_point
    else:
        shape = [1] * t.ndim
        shape[axis] = -1
        s, z = scale.view(shape), zero_point.view(shape)
    codes = torch.clamp(torch.round(t / s) + z, 0, levels)
    dtype = torch.uint8 if bits <= 8 else torch.int32
    return QuantizedTensor(codes.to(dtype), scale, zero_point, axis)


def _targets(model: nn.Module, include_dense: bool) -> dict[str, tuple[nn.Parameter, int | None]]:
    """Parameter name -> (parameter, channel axis) of everything ``quantize_`` touches."""
    found: dict[str, tuple[nn.Parameter, int | None]] = {}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, FactorizedLinear):
            found[prefix + "U"] = (module.U, 1)  # (k, r): channel = output of x U = column
            found[prefix + "V"] = (module.V, 0)  # (m, r): channel = output row
        elif isinstance(module, ZModule):  # each form says which of its parameters are scaled along which axis
            for leaf, axis in module.quantize_axes.items():
                found[prefix + leaf] = (getattr(module, leaf), axis)
        elif isinstance(module, FactorizedAttention):  # COMCAT: per-head factors, one row per output channel
            for leaf in ("q_weight", "k_weight", "v_weight", "o_weight"):
                found[prefix + leaf] = (getattr(module, leaf), 0)
        elif include_dense and isinstance(module, (nn.Linear, nn.Conv2d)):
            found[prefix + "weight"] = (module.weight, 0)
    return found


@torch.no_grad()
def quantize_(model: nn.Module, bits: int = 8, include_dense: bool = False) -> dict[str, dict]:
    """Quantize, in place, U and V of every factorized layer, the parameters of every Z and the head factors of
    every COMCAT attention module (eq. 16).

    Args:
        model: a model (compressed or not).
        bits: bit width N.
        include_dense: also quantize the weight of every remaining ``nn.Linear`` and ``nn.Conv2d`` (patch embedding,
            head, uncompressed block layers): what a "baseline + N-bit PTQ" row of Table 4 needs.

    Returns:
        The record ``{parameter name: {"bits", "axis"}}`` also stored on the model.
    """
    targets = _targets(model, include_dense)
    if not targets:
        raise ValueError("nothing to quantize: the model has no factorized layer "
                         "(compress it first, or pass include_dense=True)")
    record: dict[str, dict] = dict(getattr(model, QUANT_ATTR, {}))
    for name, (param, axis) in targets.items():
        q = quantize_tensor(param, bits, axis)
        param.copy_(q.dequantize().to(param.dtype))
        previous = record.get(name, {}).get("bits", bits)
        record[name] = {"bits": min(bits, previous), "axis": axis}
    setattr(model, QUANT_ATTR, record)
    return record


def quantization_record(model: nn.Module) -> dict[str, dict]:
    return dict(getattr(model, QUANT_ATTR, {}))


def model_size_mib(model: nn.Module, bits: int = 16) -> float:
    """Model size in MiB under Table 4's accounting (see the module docstring)."""
    record = quantization_record(model)
    total_bits = 0
    seen: set[int] = set()
    for name, param in model.named_parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        if name in record:
            axis = record[name]["axis"]
            channels = 1 if axis is None else param.shape[axis]
            total_bits += param.numel() * record[name]["bits"] + channels * 2 * 16
        else:
            total_bits += param.numel() * bits
    for module in model.modules():
        if isinstance(module, ZModule):  # a Z's buffers are its support's indices
            total_bits += sum(b.numel() for b in module.buffers(recurse=False)) * 32
    return total_bits / 8 / 2**20
