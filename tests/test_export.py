"""ONNX export: every layer kind runs in onnxruntime and matches PyTorch's logits (float32, dynamic batch)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from lowrank_vit import CompressionConfig, compress, load_compressed, quantize_, save_compressed
from lowrank_vit.io.export import UnsupportedLayerError, export_onnx, onnx_logits, prepare_for_export
from lowrank_vit.nn.factorized import FactorizedLinear, LowRankZ, RowSparseZ, SparseZ

from conftest import DenseHeadViT, make_images, make_tiny_vit, norm_relative_error

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

INPUT = (1, 28, 28)


def _compressed(**config) -> nn.Module:
    model = make_tiny_vit()
    images = make_images(32)
    compress(model, [images[i: i + 16] for i in range(0, 32, 16)], reduction=0.4, calib_samples=32, progress=False,
             **config)
    return model


def _check_parity(model: nn.Module, path, fold: bool = False) -> float:
    export_onnx(model, path, INPUT, fold=fold)
    images = make_images(5, seed=3)  # traced with batch 2: batch 5 checks the dynamic axis
    with torch.no_grad():
        expected = model.eval()(images)
    got = onnx_logits(path, images)
    assert got.shape == expected.shape
    error = norm_relative_error(got, expected)
    assert error <= 1e-4, error
    return error


Z_CONFIGS = {
    "no Z (loss-aware)": {},
    "lowrank": dict(decomposition="whitened", allocation="greedy", compensation="lowrank"),
    "diagonal": dict(decomposition="whitened", allocation="greedy", compensation="diagonal"),
    "sparse": dict(decomposition="whitened", allocation="greedy", compensation="sparse"),
    "structured": dict(decomposition="whitened", allocation="greedy", compensation="structured"),
    "comcat": dict(decomposition="comcat", allocation="greedy"),
}
Z_TYPES = {"lowrank": LowRankZ, "diagonal": SparseZ, "sparse": SparseZ, "structured": RowSparseZ}


@pytest.mark.parametrize("kind", list(Z_CONFIGS))
def test_onnx_matches_pytorch_for_every_layer_kind(kind, tmp_path):
    model = _compressed(**Z_CONFIGS[kind])
    layers = [m for m in model.modules() if isinstance(m, FactorizedLinear)]
    assert layers, "nothing was factorized: the test would not test the export of factorized layers"
    if kind in Z_TYPES:
        assert any(isinstance(m.z, Z_TYPES[kind]) for m in layers)
    _check_parity(model, tmp_path / "model.onnx")


def test_folded_export_matches_the_unfolded_model(tmp_path):
    model = _compressed(**Z_CONFIGS["lowrank"])
    _check_parity(model, tmp_path / "folded.onnx", fold=True)
    assert any(isinstance(m.z, LowRankZ) for m in model.modules() if isinstance(m, FactorizedLinear)), \
        "--fold must act on a copy, not on the caller's model"


def test_folded_export_of_a_model_with_non_zero_biases(tmp_path):
    """`export --fold` on a model whose linear biases and LayerNorms are random and non-zero (a fresh timm model's
    are zero and one, where a fold or export that dropped a bias would still match)."""
    from conftest import randomize_affine_

    model = randomize_affine_(make_tiny_vit(seed=4), seed=6)
    images = make_images(32)
    compress(model, [images[i: i + 16] for i in range(0, 32, 16)], reduction=0.4, calib_samples=32, progress=False,
             **Z_CONFIGS["lowrank"])
    assert any(m.bias is not None and float(m.bias.abs().min()) > 0 for m in model.modules()
               if isinstance(m, FactorizedLinear))
    _check_parity(model, tmp_path / "folded.onnx", fold=True)
    _check_parity(model, tmp_path / "unfolded.onnx")


def test_quantized_model_exports_dequantized(tmp_path):
    model = _compressed()
    quantize_(model, bits=8)
    save_compressed(model, tmp_path / "q")
    loaded = load_compressed(tmp_path / "q")
    _check_parity(loaded, tmp_path / "q.onnx")


def test_dense_model_exports(tmp_path):
    _check_parity(make_tiny_vit(), tmp_path / "dense.onnx")


class _Mystery(nn.Module):
    def forward(self, x):
        return x


def test_unknown_layer_kind_is_refused_and_nothing_is_written(tmp_path):
    model = make_tiny_vit()
    model.blocks[0].mlp.act = _Mystery()
    with pytest.raises(UnsupportedLayerError, match="_Mystery"):
        prepare_for_export(model)
    with pytest.raises(UnsupportedLayerError):
        export_onnx(model, tmp_path / "m.onnx", INPUT)
    assert list(tmp_path.iterdir()) == []


class _Doubled(nn.Module):
    """A layer kind no exporter knows, with an exact ONNX-friendly equivalent (a registered rewrite)."""

    def forward(self, x):
        return x.mul(2.0)


class _Scaled(nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


def test_a_registered_rewrite_replaces_its_layer_kind_in_the_export_copy_only(monkeypatch):
    """EXPORT_REWRITES is where a layer kind of one's own gets its export form: a registered function replaces every
    module of exactly that class in the copy the exporter writes (the caller's model keeps its own), and the copy
    computes the same logits."""
    from lowrank_vit.io import export

    model = make_tiny_vit()
    model.blocks[0].mlp.act = _Doubled()
    model.blocks[1].mlp.act = _Doubled()
    monkeypatch.setitem(export.EXPORT_REWRITES, _Doubled, lambda module: _Scaled(2.0))
    copy_ = prepare_for_export(model)
    assert [type(b.mlp.act) for b in copy_.blocks] == [_Scaled, _Scaled]
    assert all(isinstance(b.mlp.act, _Doubled) for b in model.blocks)
    x = make_images(2, seed=3)
    with torch.no_grad():
        assert torch.equal(copy_(x), model.eval()(x))


def test_inference_benchmark_times_onnxruntime_beside_pytorch(tmp_path, capsys):
    from test_benchmarks import TOY, load, positive_finite

    out = tmp_path / "inference.json"
    load("inference").main([*TOY, "--reduction", "0.5", "--batch-size", "2", "--repeats", "2", "--warmup", "1",
                            "--min-time", "0", "--calib", "4", "--rank-multiple", "1", "--onnxruntime",
                            "--json", str(out)])
    assert "ort speedup" in capsys.readouterr().out
    (row,) = json.loads(out.read_text())["rows"]
    for key in ("ort_dense_ms", "ort_factorized_ms", "ort_speedup"):
        assert positive_finite(row[key]), (key, row[key])
    assert row["ort_speedup"] == pytest.approx(row["ort_dense_ms"] / row["ort_factorized_ms"])


@pytest.mark.parametrize("kind", list(Z_CONFIGS))  # every Z kind: sparse and diagonal Z quantize per tensor
def test_quantized_model_exports_as_qdq_with_uint8_weights(kind, tmp_path):
    import onnx

    model = _compressed(**Z_CONFIGS[kind])
    record = quantize_(model, bits=8)
    float_file, qdq_file = tmp_path / "float.onnx", tmp_path / "qdq.onnx"
    export_onnx(model, float_file, INPUT)
    export_onnx(model, qdq_file, INPUT, quantized="qdq")
    proto = onnx.load(str(qdq_file))
    ops = [node.op_type for node in proto.graph.node]
    codes = [init for init in proto.graph.initializer  # the weights' codes; zero points are uint8 too
             if init.data_type == onnx.TensorProto.UINT8 and "zero_point" not in init.name]
    # a sparse Z's values are made dense for export and stay float there (the module docstring says so)
    qdq = [name for name in record if not isinstance(model.get_submodule(name.rpartition(".")[0]), SparseZ)]
    assert len(qdq) >= len(record) * 2 // 3
    assert "QuantizeLinear" not in ops and ops.count("DequantizeLinear") == len(qdq) == len(codes)
    if len(qdq) == len(record):
        assert qdq_file.stat().st_size < 0.75 * float_file.stat().st_size  # 8-bit factors instead of 32-bit ones
    # 8-bit codes instead of float32 values: 3 bytes saved per value, less a float32 scale and a uint8 zero point per
    # channel, and the graph's nodes and names of each DequantizeLinear (under 400 bytes each)
    params = dict(model.named_parameters())
    channels = {name: 1 if record[name]["axis"] is None else params[name].shape[record[name]["axis"]] for name in qdq}
    expected = sum(3 * params[name].numel() - 5 * channels[name] for name in qdq)
    saved = float_file.stat().st_size - qdq_file.stat().st_size
    assert expected - 400 * len(qdq) <= saved < expected, (saved, expected)
    images = make_images(5, seed=3)
    with torch.no_grad():
        expected = model.eval()(images)
    assert norm_relative_error(onnx_logits(qdq_file, images), expected) <= 1e-4


def test_qdq_export_refuses_a_weight_changed_after_quantization():
    model = _compressed()
    record = quantize_(model, bits=8)
    name = next(iter(record))
    with torch.no_grad():
        dict(model.named_parameters())[name].add_(1e-3)
    with pytest.raises(ValueError, match="off its quantization grid"):
        prepare_for_export(model, quantized="qdq")
    prepare_for_export(model)  # the dequantized form exports whatever the weights are


def test_a_wrapper_of_ones_own_exports_with_its_map_output(tmp_path):
    """A container of one's own that holds no weight itself (a backbone and a decoder) is traced through; a leaf of
    an unknown kind stays refused (test above). The compressed map matches onnxruntime's."""
    model, images = DenseHeadViT(as_dict=False), make_images(6)
    compress(model, [images], CompressionConfig(reduction=0.5, likelihood="bernoulli", progress=False))
    path = export_onnx(model, tmp_path / "m.onnx", INPUT)
    assert norm_relative_error(onnx_logits(path, images), model(images)) <= 1e-5
