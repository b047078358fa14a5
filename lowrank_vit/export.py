"""ONNX export of compressed (and dense) timm models, with a dynamic batch axis.

The model is exported with PyTorch's TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``): it
needs only the ``onnx`` package, is quick on a CPU and handles every layer of this library once the few that use
operations ONNX lacks are rewritten into exact equivalents (:data:`EXPORT_REWRITES`). The rewrites act on a copy;
the caller's model is never changed.

Layer kinds, and how they leave PyTorch:

- ``FactorizedLinear`` (``x U Vᵀ + b``), ``LowRankZ`` (``x G Yᵀ``), ``RowSparseZ`` (a gather of input rows then a
  product), ``FactorizedAttention`` (COMCAT's per-head products): exported as they are.
- ``SparseZ`` ("sparse" and "diagonal" Z): ``torch.sparse.mm`` has no ONNX form, so Z becomes its dense
  (in, out) matrix, the same function; the ONNX file then stores those entries densely.
- ``--fold`` (:func:`lowrank_vit.surgery.fold_lowrank_z_`): a low-rank Z folded into the factors first.
- Quantized weights: :func:`lowrank_vit.surgery.load_compressed` dequantizes them, so they are exported as float.

Any other module that is neither PyTorch's, timm's nor known here is refused with :class:`UnsupportedLayerError`
before anything is written: an exporter that guessed could ship a model that computes something else.
"""

from __future__ import annotations

import copy
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from lowrank_vit.comcat import FactorizedAttention
from lowrank_vit.factorized import FactorizedLinear, LowRankZ, RowSparseZ, SparseZ
from lowrank_vit.surgery import fold_lowrank_z_, swap_layers

DEFAULT_OPSET = 17
"""ONNX opset: 17 has LayerNormalization as one operator and is read by every current onnxruntime."""
INPUT_NAME, OUTPUT_NAME = "images", "logits"


class UnsupportedLayerError(ValueError):
    """The model holds a layer kind the exporter does not know how to write (the message names it)."""


class DenseZ(nn.Module):
    """A Z held as its dense (in, out) matrix: ``Z(x) = x Z``. The export form of :class:`SparseZ`."""

    def __init__(self, z: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(z.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.to(self.weight.dtype) @ self.weight).to(x.dtype)


def _sparse_to_dense(module: nn.Module) -> nn.Module:
    return DenseZ(module.dense())


EXPORT_REWRITES: dict[type[nn.Module], Callable[[nn.Module], nn.Module] | None] = {
    FactorizedLinear: None,
    LowRankZ: None,
    RowSparseZ: None,
    FactorizedAttention: None,
    DenseZ: None,
    SparseZ: _sparse_to_dense,
}
"""Module classes of this library the exporter knows: None exports the module as it is, a function returns its
exact ONNX-friendly replacement."""

_KNOWN_PACKAGES = ("torch.", "timm.")


def _is_known(module: nn.Module) -> bool:
    cls = type(module)
    return cls in EXPORT_REWRITES or cls.__module__.startswith(_KNOWN_PACKAGES)


def prepare_for_export(model: nn.Module, fold: bool = False) -> nn.Module:
    """A copy of ``model`` in eval mode on the CPU in float32, with every layer rewritten into its export form.

    Raises:
        UnsupportedLayerError: a module of a kind the exporter does not know.
    """
    unknown = sorted({type(m).__qualname__ for m in model.modules() if not _is_known(m)})
    if unknown:
        raise UnsupportedLayerError(f"cannot export layer kind(s) {', '.join(unknown)} to ONNX: the exporter knows "
                                    f"{', '.join(sorted(c.__name__ for c in EXPORT_REWRITES))} and PyTorch/timm "
                                    f"modules")
    copy_ = copy.deepcopy(model).float().cpu().eval()
    if fold:
        fold_lowrank_z_(copy_)
    for cls, rewrite in EXPORT_REWRITES.items():
        if rewrite is not None:
            swap_layers(copy_, lambda _, m, rewrite=rewrite: rewrite(m), lambda _, m, cls=cls: type(m) is cls)
    return copy_


def export_onnx(model: nn.Module, path: str | os.PathLike, input_size: tuple[int, int, int], *, fold: bool = False,
                opset: int = DEFAULT_OPSET, example_batch: int = 2, metadata: dict[str, str] | None = None) -> Path:
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

    Raises:
        UnsupportedLayerError: a layer kind the exporter does not know.
        RuntimeError: the PyTorch exporter failed (its message, on one line).
    """
    prepared = prepare_for_export(model, fold=fold)
    example = torch.randn(example_batch, *input_size, generator=torch.Generator().manual_seed(0))
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # the tracer warns about Python branches on shapes (timm's asserts); the parity check is the real test
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(prepared, (example,), tmp, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                              opset_version=opset, dynamo=False, do_constant_folding=True)
        if metadata:
            _add_metadata(tmp, metadata)
        os.replace(tmp, out)
    except Exception as exc:
        if os.path.exists(tmp):
            os.remove(tmp)
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
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    (logits,) = session.run([OUTPUT_NAME], {INPUT_NAME: images.detach().cpu().float().numpy()})
    return torch.from_numpy(logits)


__all__ = ["DEFAULT_OPSET", "EXPORT_REWRITES", "DenseZ", "UnsupportedLayerError", "export_onnx", "onnx_logits",
           "prepare_for_export"]
