"""ONNX export of compressed (and dense) timm models, with a dynamic batch axis.

The model is exported with PyTorch's TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``): it
needs only the ``onnx`` package, is quick on a CPU and handles every layer of this library once the few that use
operations ONNX lacks are rewritten into exact equivalents (:data:`EXPORT_REWRITES`, and each Z module's
``export_form``). The rewrites act on a copy;
the caller's model is never changed.

Layer kinds, and how they leave PyTorch:

- ``FactorizedLinear`` (``x U Vᵀ + b``), ``LowRankZ`` (``x G Yᵀ``), ``RowSparseZ`` (a gather of input rows then a
  product), ``FactorizedAttention`` (COMCAT's per-head products): exported as they are.
- ``SparseZ`` ("sparse" and "diagonal" Z): ``torch.sparse.mm`` has no ONNX form, so Z becomes its dense
  (in, out) matrix, the same function (its ``export_form``, a ``DenseZ``); the ONNX file then stores those entries
  densely. Any registered Z module exports as its ``export_form`` says.
- ``--fold`` (:func:`lowrank_vit.io.surgery.fold_lowrank_z_`): a low-rank Z folded into the factors first.
- Quantized weights (:func:`lowrank_vit.quantize_`, kept by :func:`lowrank_vit.io.surgery.load_compressed`): exported
  dequantized (float) by default; with ``quantized="qdq"`` every quantized weight of at most 8 bits is stored as its
  uint8 codes feeding a ``DequantizeLinear`` (per-channel scale and zero point), the ONNX QDQ form: the file holds
  the 8-bit weights and onnxruntime computes exactly the dequantized values. (A sparse Z's values, made dense for
  export, stay float.) onnxruntime (1.2x, from its "extended" graph optimizations on) fuses each DequantizeLinear +
  MatMul into a ``MatMulNBits`` whose default ``accuracy_level`` 4 also quantizes the *activations* to int8 per
  block: about 1% relative error in the logits of the test's ViTs. :data:`ORT_EXACT_QDQ_CONFIG` (which
  :func:`onnx_logits` sets) keeps the fused kernel but computes in float32, which matches PyTorch to float rounding.

Any other module that is neither PyTorch's, timm's nor known here is refused with :class:`UnsupportedLayerError`
before anything is written: an exporter that guessed could ship a model that computes something else.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.onnx import _constants

from lowrank_vit.core.files import atomic_write
from lowrank_vit.io.surgery import fold_lowrank_z_, swap_layers
from lowrank_vit.nn.comcat import FactorizedAttention
from lowrank_vit.nn.factorized import Z_MODULES, DenseZ, FactorizedLinear, ZModule
from lowrank_vit.nn.quantize import quantization_record, quantize_tensor

DEFAULT_OPSET = 17
"""ONNX opset: 17 has LayerNormalization as one operator and is read by every current onnxruntime."""
INPUT_NAME, OUTPUT_NAME = "images", "logits"


class UnsupportedLayerError(ValueError):
    """The model holds a layer kind the exporter does not know how to write (the message names it)."""


EXPORT_REWRITES: dict[type[nn.Module], Callable[[nn.Module], nn.Module] | None] = {
    FactorizedLinear: None,
    FactorizedAttention: None,
    DenseZ: None,
}
"""Module classes of this library the exporter knows besides the Z modules (which say their own export form): None
exports the module as it is, a function returns its exact ONNX-friendly replacement."""

_KNOWN_PACKAGES = ("torch.", "timm.", "lowrank_vit.nn.vssm")  # the state-space model is plain tensor algebra


def _is_known(module: nn.Module) -> bool:
    """A kind the exporter knows, or a container of one's own (a wrapper around a timm backbone and a head) that
    holds no parameter or buffer itself: its forward composes its children, which are checked themselves. A leaf of
    an unknown kind stays refused: what it computes is its own."""
    cls = type(module)
    holds_nothing = next(module.children(), None) is not None and \
        next(module.parameters(recurse=False), None) is None and next(module.buffers(recurse=False), None) is None
    return isinstance(module, ZModule) or cls in EXPORT_REWRITES or cls.__module__.startswith(_KNOWN_PACKAGES) or \
        holds_nothing


def _export_form(_: str, module: nn.Module) -> nn.Module | None:
    form = module.export_form()
    return None if form is module else form


QUANTIZED_FORMS = ("dequantized", "qdq")
"""How quantized weights are exported: as float values, or as uint8 codes with DequantizeLinear."""

ORT_EXACT_QDQ_CONFIG = {"session.qdq_matmulnbits_accuracy_level": "1"}
"""onnxruntime session config entries for a QDQ file to compute what PyTorch computes: DequantizeLinear + MatMul
fused into ``MatMulNBits`` with float32 compute (accuracy level 1) instead of the default int8 activations (4).
Pass each to ``SessionOptions.add_session_config_entry``; older onnxruntime versions ignore the key."""

_OFF_GRID_TOLERANCE = 1e-3
"""How far (in units of its scale) a weight may sit from its re-derived quantization grid and still count as on it."""


_FLOAT_SUFFIX = "_float"
"""A fake-quantized weight ``leaf`` is held as the parameter ``leaf + _FLOAT_SUFFIX`` while exporting."""


class _FakeQuantize(nn.Module):
    """``w -> dequantize(quantize(w))`` with the weight's own scale and zero point: the exporter writes it as
    QuantizeLinear + DequantizeLinear (then :func:`_store_codes` keeps only the codes). The weight is already on the
    grid, so the function does not change."""

    def __init__(self, scale: torch.Tensor, zero_point: torch.Tensor, axis: int | None) -> None:
        super().__init__()
        self.register_buffer("scale", scale.detach().float().reshape(-1))
        self.register_buffer("zero_point", zero_point.detach().round().int().reshape(-1))
        self.axis = axis

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.axis is None:
            return torch.fake_quantize_per_tensor_affine(weight, float(self.scale[0]), int(self.zero_point[0]),
                                                         0, 255)
        return torch.fake_quantize_per_channel_affine(weight, self.scale, self.zero_point, self.axis, 0, 255)


def _fake_quantized_property(leaf: str) -> property:
    return property(lambda self: getattr(self, f"{leaf}_fake_quantize")(getattr(self, leaf + _FLOAT_SUFFIX)))


def _fake_quantize_(module: nn.Module, leaf: str, fake: _FakeQuantize) -> None:
    """Make ``module.<leaf>`` read as ``fake(<the parameter>)``: the parameter moves to ``leaf + _FLOAT_SUFFIX`` and a
    per-module subclass gets a property ``leaf``. (``torch.nn.utils.parametrize`` would do it, but keeps its
    functions in a ModuleDict keyed by the tensor's name, which refuses ``values``, the name of a structured Z's
    parameter.)"""
    weight = module._parameters.pop(leaf)
    module.register_parameter(leaf + _FLOAT_SUFFIX, weight)
    module.add_module(f"{leaf}_fake_quantize", fake)
    cls = type(module)
    if not getattr(cls, "_lowrank_vit_fake_quantized", False):
        cls = type(cls.__name__, (cls,), {"_lowrank_vit_fake_quantized": True})
        module.__class__ = cls
    setattr(cls, leaf, _fake_quantized_property(leaf))


def _attach_fake_quantization(model: nn.Module, record: dict[str, dict]) -> int:
    """Fake-quantize every quantized weight of at most 8 bits still present in ``model``; returns how many."""

    params = dict(model.named_parameters())
    count = 0
    for name, info in record.items():
        if name not in params or info["bits"] > 8:  # a sparse Z made dense; wider codes: left as float
            continue
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        # quantize_ keeps only the dequantized weight; eq. (16) applied to it again gives back the same grid (its
        # extremes are codes 0 and 2^N - 1 up to float rounding), checked here: a weight changed since quantize_
        # (fine-tuned, edited) would otherwise be silently rounded onto a grid it no longer lies on.
        weight = params[name].detach().float()
        q = quantize_tensor(weight, info["bits"], info["axis"])
        shape = [1] * weight.ndim if info["axis"] is None else \
            [-1 if d == info["axis"] else 1 for d in range(weight.ndim)]
        off = ((q.dequantize() - weight).abs() / q.scale.reshape(shape)).max().item()
        if off > _OFF_GRID_TOLERANCE:
            raise ValueError(f"{name} is recorded as {info['bits']}-bit quantized but lies off its quantization grid "
                             f"(by {off:.3g} of a step): it changed after quantize_; quantize again, or export "
                             f"with quantized='dequantized'")
        _fake_quantize_(module, leaf, _FakeQuantize(q.scale, q.zero_point, info["axis"]))
        count += 1
    return count


def prepare_for_export(model: nn.Module, fold: bool = False, quantized: str = "dequantized") -> nn.Module:
    """A copy of ``model`` in eval mode on the CPU in float32, with every layer rewritten into its export form
    (and, with ``quantized="qdq"``, every quantized weight behind a fake quantization the exporter writes as QDQ).

    Raises:
        UnsupportedLayerError: a module of a kind the exporter does not know.
        ValueError: an unknown ``quantized`` form, or (``"qdq"``) a quantized weight off its quantization grid.
    """
    unknown = sorted({type(m).__qualname__ for m in model.modules() if not _is_known(m)})
    if unknown:
        known = sorted({cls.__name__ for cls in (*EXPORT_REWRITES, *Z_MODULES.values())})
        raise UnsupportedLayerError(f"cannot export layer kind(s) {', '.join(unknown)} to ONNX: the exporter knows "
                                    f"{', '.join(known)} and PyTorch/timm modules")
    if quantized not in QUANTIZED_FORMS:
        raise ValueError(f"quantized={quantized!r} is not one of {', '.join(QUANTIZED_FORMS)}")
    copy_ = copy.deepcopy(model).float().cpu().eval()
    if fold:
        fold_lowrank_z_(copy_)
    for cls, rewrite in EXPORT_REWRITES.items():
        if rewrite is not None:
            swap_layers(copy_, lambda _, m, rewrite=rewrite: rewrite(m), lambda _, m, cls=cls: type(m) is cls)
    swap_layers(copy_, _export_form, lambda _, m: isinstance(m, ZModule))
    if quantized == "qdq":
        _attach_fake_quantization(copy_, quantization_record(model))
    return copy_


def _store_codes(path: str) -> int:
    """Rewrite every QuantizeLinear of a constant weight into its uint8 codes: the DequantizeLinear after it then
    reads them directly (the QDQ form onnxruntime expects), and the float weight leaves the file. The codes, scale
    and zero point are named after the parameter (``NAME``, ``NAME.scale``, ``NAME.zero_point``), and a Transpose
    that only reorders the dequantized weight is folded into the codes (the exporter had folded it into the float
    weight). Returns how many weights were rewritten."""
    import onnx
    from onnx import helper, numpy_helper

    proto = onnx.load(path)
    graph = proto.graph
    inits = {init.name: init for init in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {out.name for out in graph.output}
    quantizers = [node for node in graph.node
                  if node.op_type == "QuantizeLinear" and all(name in inits for name in node.input[:3])]
    for node in quantizers:
        (dq,) = consumers[node.output[0]]  # the exporter writes each QuantizeLinear with its DequantizeLinear
        weight, scale, zero = (numpy_helper.to_array(inits[name]) for name in node.input[:3])
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        per_channel = scale.ndim == 1 and scale.size > 1
        shape = [1] * weight.ndim
        if per_channel:  # broadcast along the axis
            shape[axis] = -1
        codes = np.clip(np.rint(weight / scale.reshape(shape)) + zero.reshape(shape).astype(np.float64), 0, 255)
        codes = codes.astype(np.uint8)
        after = consumers.get(dq.output[0], [])
        if len(after) == 1 and after[0].op_type == "Transpose" and dq.output[0] not in outputs:
            perm = next((list(a.ints) for a in after[0].attribute if a.name == "perm"),
                        list(range(weight.ndim))[::-1])
            codes = np.ascontiguousarray(codes.transpose(perm))
            axis = perm.index(axis)
            dq.output[0] = after[0].output[0]
            graph.node.remove(after[0])
        name = node.input[0].removesuffix(_FLOAT_SUFFIX)
        graph.initializer.extend([numpy_helper.from_array(codes, name),
                                  numpy_helper.from_array(scale, f"{name}.scale"),
                                  numpy_helper.from_array(zero, f"{name}.zero_point")])
        del dq.input[:]
        dq.input.extend([name, f"{name}.scale", f"{name}.zero_point"])
        del dq.attribute[:]
        if per_channel:
            dq.attribute.append(helper.make_attribute("axis", axis))
        dq.name = f"{name}/DequantizeLinear"
        renamed = f"{name}.dequantized" if dq.output[0] not in outputs else dq.output[0]
        for user in consumers.get(dq.output[0], []):
            for i, input_name in enumerate(user.input):
                if input_name == dq.output[0]:
                    user.input[i] = renamed
        dq.output[0] = renamed
        graph.node.remove(node)
    used = {name for node in graph.node for name in node.input} | outputs
    for init in list(graph.initializer):
        if init.name not in used:  # the float weights (and their scales and zero points) the codes replaced
            graph.initializer.remove(init)
    onnx.save(proto, path)
    return len(quantizers)


def opset_range() -> tuple[int, int]:
    """The opsets torch's TorchScript-based exporter writes (outside them it fails deep inside, printing its graph)."""

    return (getattr(_constants, "ONNX_MIN_OPSET", 7),
            getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", getattr(_constants, "ONNX_MAX_OPSET", 20)))


def export_onnx(model: nn.Module, path: str | os.PathLike, input_size: tuple[int, int, int], *, fold: bool = False,
                opset: int = DEFAULT_OPSET, example_batch: int = 2, metadata: dict[str, str] | None = None,
                quantized: str = "dequantized") -> Path:
    """Write ``model`` to the ONNX file ``path`` with a dynamic batch axis (input ``images`` (N, C, H, W) float32,
    output ``logits`` (N, classes)). The file is written to a temporary name and renamed, so a failed export leaves
    nothing behind and an existing file is replaced only by a complete one.

    Args:
        model: a timm model, dense or compressed (left unchanged).
        path: the ``.onnx`` file to write.
        input_size: (C, H, W) the model takes.
        fold: fold every low-rank Z into its factors first (two thin products per layer instead of four).
        opset: ONNX opset version.
        example_batch: batch size of the tracing input (any batch size runs afterwards).
        metadata: strings stored in the file's ``metadata_props`` (e.g. the preprocessing, so that the file says how
            to feed it).
        quantized: a quantized model's weights as float values ("dequantized") or as uint8 codes with
            DequantizeLinear ("qdq"; run it in onnxruntime with :data:`ORT_EXACT_QDQ_CONFIG` for PyTorch's
            logits); an unquantized model is the same either way.

    Raises:
        UnsupportedLayerError: a layer kind the exporter does not know.
        ValueError: an opset outside :func:`opset_range`; see :func:`prepare_for_export`.
        RuntimeError: the PyTorch exporter failed (its message, on one line).
    """
    low, high = opset_range()
    if isinstance(opset, bool) or not isinstance(opset, int) or not low <= opset <= high:
        raise ValueError(f"opset must be an integer in [{low}, {high}] (what this torch's ONNX exporter writes), got "
                         f"{opset!r}; {DEFAULT_OPSET} is the default")
    prepared = prepare_for_export(model, fold=fold, quantized=quantized)
    for module in prepared.modules():
        # timm's fused attention calls F.scaled_dot_product_attention; EVA's passes it is_causal, which the
        # TorchScript exporter traces as a tensor and then refuses (EVA-02 failed to export, dense or compressed).
        # timm's own explicit path (q k^T, softmax, times v) is the same function and exports for every family.
        if getattr(module, "fused_attn", None) is True:
            module.fused_attn = False
    example = torch.randn(example_batch, *input_size, generator=torch.Generator().manual_seed(0))
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        with torch.no_grad(), warnings.catch_warnings():
            # the tracer warns about Python branches on shapes (timm's asserts); the parity check is the real test
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(prepared, (example,), str(tmp), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                              opset_version=opset, dynamo=False, do_constant_folding=True)
        if quantized == "qdq":
            _store_codes(str(tmp))
        if metadata:
            _add_metadata(str(tmp), metadata)

    try:
        atomic_write(out, write)
    except Exception as exc:
        if isinstance(exc, UnsupportedLayerError):
            raise
        first = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise RuntimeError(f"ONNX export failed: {first}") from exc
    return out


def _add_metadata(path: str, metadata: dict[str, str]) -> None:
    import onnx

    proto = onnx.load(path)
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, path)


def onnx_logits(path: str | os.PathLike, images: torch.Tensor, threads: int = 1) -> torch.Tensor:
    """Run the exported file in onnxruntime (CPU) on ``images``; returns the logits as a tensor."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    for key, value in ORT_EXACT_QDQ_CONFIG.items():  # a QDQ file: float32 compute, not int8 activations
        options.add_session_config_entry(key, value)
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    (logits,) = session.run([OUTPUT_NAME], {INPUT_NAME: images.detach().cpu().float().numpy()})
    return torch.from_numpy(logits)


__all__ = ["DEFAULT_OPSET", "EXPORT_REWRITES", "ORT_EXACT_QDQ_CONFIG", "QUANTIZED_FORMS", "DenseZ",
           "UnsupportedLayerError", "export_onnx", "onnx_logits", "prepare_for_export"]
