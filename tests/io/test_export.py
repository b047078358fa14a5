"""Tests of lowrank_vit/io/export.py."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from lowrank_vit import CompressionConfig, compress, quantize_, save_compressed
from lowrank_vit.io.export import UnsupportedLayerError, export_onnx, onnx_logits, prepare_for_export
from lowrank_vit.io.surgery import load_compressed
from lowrank_vit.nn.factorized import FactorizedLinear, LowRankZ, RowSparseZ, SparseZ
from tests.helpers import DenseHeadViT, _compressed_named, has_module, make_images, make_tiny_vit, norm_relative_error


@pytest.mark.usefixtures("offline")
def test_the_export_leaves_the_callers_random_state_alone(tmp_path):
    """Its tracing input is drawn from a generator of its own: a seeded script draws the same numbers after an
    export as without one."""
    from lowrank_vit.io.export import export_onnx

    pytest.importorskip("onnx")
    model = make_tiny_vit()
    torch.manual_seed(5)
    export_onnx(model, tmp_path / "m.onnx", (1, 28, 28))
    after = torch.rand(4)
    torch.manual_seed(5)
    assert torch.equal(after, torch.rand(4))


@pytest.mark.usefixtures("offline")
def test_onnx_logits_run_on_the_cpu_provider_quietly(tmp_path, capfd):
    """onnxruntime's CPU provider named as onnxruntime spells it: no warning, no "EP Error" fallback on stderr."""
    pytest.importorskip("onnxruntime")
    from lowrank_vit.io.export import export_onnx, onnx_logits

    model = make_tiny_vit()
    path = export_onnx(model, tmp_path / "m.onnx", (1, 28, 28))
    images = make_images(3)
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logits = onnx_logits(path, images)
    assert [str(w.message) for w in caught] == []
    out, err = capfd.readouterr()
    assert "EP Error" not in out + err and "provider" not in (out + err).lower()
    with torch.no_grad():
        torch.testing.assert_close(logits, model(images), rtol=1e-4, atol=1e-4)


class Alpha(nn.Module):
    def forward(self, x):
        return x


class Beta(nn.Module):
    def forward(self, x):
        return x


@pytest.mark.usefixtures("offline")
def test_every_unknown_layer_kind_is_named_in_the_refusal():
    from lowrank_vit.io.export import UnsupportedLayerError, prepare_for_export

    model = make_tiny_vit()
    model.extra_b, model.extra_a = Beta(), Alpha()
    with pytest.raises(UnsupportedLayerError) as info:
        prepare_for_export(model)
    assert str(info.value).startswith("cannot export layer kind(s) Alpha, Beta to ONNX: the exporter knows ")


@pytest.mark.usefixtures("offline")
def test_the_onnx_file_has_the_opset_asked_for(tmp_path):
    import onnx

    from lowrank_vit.io.export import DEFAULT_OPSET, export_onnx

    opset = 16 if DEFAULT_OPSET != 16 else 15
    path = export_onnx(_compressed_named(), tmp_path / "m.onnx", (1, 28, 28), opset=opset)
    proto = onnx.load(str(path))
    assert {o.domain: o.version for o in proto.opset_import}[""] == opset


@pytest.mark.usefixtures("offline")
def test_the_per_tensor_fake_quantization_rounds_onto_its_own_8bit_grid():
    """`_FakeQuantize` with no channel axis: q = clamp(round(w / s) + z, 0, 255), w' = (q - z) s, by hand."""
    from lowrank_vit.io.export import _FakeQuantize

    scale, zero = 0.5, 3
    weight = torch.tensor([[-3.0, -1.26, 0.0], [0.74, 100.0, 200.0]])
    by_hand = (torch.clamp(torch.round(weight / scale) + zero, 0, 255) - zero) * scale
    fake = _FakeQuantize(torch.tensor([scale]), torch.tensor([zero]), axis=None)
    assert torch.equal(fake(weight), by_hand)
    assert by_hand.max().item() == (255 - zero) * scale  # the top code is 255, not 256


@pytest.mark.usefixtures("offline")
def test_an_unknown_quantized_form_lists_the_known_ones():
    from lowrank_vit.io.export import prepare_for_export

    with pytest.raises(ValueError) as info:
        prepare_for_export(make_tiny_vit(seed=0), quantized="int4")
    assert str(info.value) == "quantized='int4' is not one of dequantized, qdq"


@pytest.mark.usefixtures("offline")
def test_the_opset_range_falls_back_where_torch_names_neither_limit(monkeypatch):
    """A torch whose exporter module names no limits: opsets 7 to 20 are assumed."""
    from torch.onnx import _constants

    from lowrank_vit.io.export import opset_range

    for name in ("ONNX_MIN_OPSET", "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", "ONNX_MAX_OPSET"):
        monkeypatch.delattr(_constants, name, raising=False)
    assert opset_range() == (7, 20)


@pytest.mark.usefixtures("offline")
def test_the_opset_range_is_the_one_torch_names(monkeypatch, tmp_path):
    """The opsets offered are those the installed torch's exporter declares, whatever they are: a torch that raised
    its lowest opset to 9 and wrote up to 18 gives (9, 18), and an opset of 8 is then refused before tracing."""
    from torch.onnx import _constants

    from lowrank_vit.io.export import export_onnx, opset_range
    from tests.helpers import make_tiny_vit

    monkeypatch.setattr(_constants, "ONNX_MIN_OPSET", 9)
    monkeypatch.setattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", 18)
    assert opset_range() == (9, 18)
    with pytest.raises(ValueError, match=r"opset must be an integer in \[9, 18\]"):
        export_onnx(make_tiny_vit(), tmp_path / "m.onnx", (3, 32, 32), opset=8)
    assert not (tmp_path / "m.onnx").exists()


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


@pytest.mark.skipif(not has_module("onnxruntime"), reason="needs onnxruntime")
@pytest.mark.skipif(not has_module("onnx"), reason="needs onnx")
@pytest.mark.parametrize("kind", list(Z_CONFIGS))
def test_onnx_matches_pytorch_for_every_layer_kind(kind, tmp_path):
    model = _compressed(**Z_CONFIGS[kind])
    layers = [m for m in model.modules() if isinstance(m, FactorizedLinear)]
    assert layers, "nothing was factorized: the test would not test the export of factorized layers"
    if kind in Z_TYPES:
        assert any(isinstance(m.z, Z_TYPES[kind]) for m in layers)
    _check_parity(model, tmp_path / "model.onnx")


@pytest.mark.skipif(not has_module("onnxruntime"), reason="needs onnxruntime")
@pytest.mark.skipif(not has_module("onnx"), reason="needs onnx")
def test_folded_export_matches_the_unfolded_model(tmp_path):
    model = _compressed(**Z_CONFIGS["lowrank"])
    _check_parity(model, tmp_path / "folded.onnx", fold=True)
    assert any(isinstance(m.z, LowRankZ) for m in model.modules() if isinstance(m, FactorizedLinear)), \
        "--fold must act on a copy, not on the caller's model"


@pytest.mark.skipif(not has_module("onnxruntime"), reason="needs onnxruntime")
@pytest.mark.skipif(not has_module("onnx"), reason="needs onnx")
def test_folded_export_of_a_model_with_non_zero_biases(tmp_path):
    """`export --fold` on a model whose linear biases and LayerNorms are random and non-zero (a fresh timm model's
    are zero and one, where a fold or export that dropped a bias would still match)."""
    from tests.helpers import randomize_affine_

    model = randomize_affine_(make_tiny_vit(seed=4), seed=6)
    images = make_images(32)
    compress(model, [images[i: i + 16] for i in range(0, 32, 16)], reduction=0.4, calib_samples=32, progress=False,
             **Z_CONFIGS["lowrank"])
    assert any(m.bias is not None and float(m.bias.abs().min()) > 0 for m in model.modules()
               if isinstance(m, FactorizedLinear))
    _check_parity(model, tmp_path / "folded.onnx", fold=True)
    _check_parity(model, tmp_path / "unfolded.onnx")


@pytest.mark.skipif(not has_module("onnxruntime"), reason="needs onnxruntime")
@pytest.mark.skipif(not has_module("onnx"), reason="needs onnx")
def test_quantized_model_exports_dequantized(tmp_path):
    model = _compressed()
    quantize_(model, bits=8)
    save_compressed(model, tmp_path / "q")
    loaded = load_compressed(tmp_path / "q")
    _check_parity(loaded, tmp_path / "q.onnx")


@pytest.mark.skipif(not has_module("onnxruntime"), reason="needs onnxruntime")
@pytest.mark.skipif(not has_module("onnx"), reason="needs onnx")
def test_dense_model_exports(tmp_path):
    _check_parity(make_tiny_vit(), tmp_path / "dense.onnx")


class _Mystery(nn.Module):
    def forward(self, x):
        return x


@pytest.mark.skipif(not has_module("onnxruntime"), reason="needs onnxruntime")
@pytest.mark.skipif(not has_module("onnx"), reason="needs onnx")
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


@pytest.mark.skipif(not has_module("onnxruntime"), reason="needs onnxruntime")
@pytest.mark.skipif(not has_module("onnx"), reason="needs onnx")
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


@pytest.mark.skipif(not has_module("onnxruntime"), reason="needs onnxruntime")
@pytest.mark.skipif(not has_module("onnx"), reason="needs onnx")
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


@pytest.mark.skipif(not has_module("onnxruntime"), reason="needs onnxruntime")
@pytest.mark.skipif(not has_module("onnx"), reason="needs onnx")
def test_qdq_export_refuses_a_weight_changed_after_quantization():
    model = _compressed()
    record = quantize_(model, bits=8)
    name = next(iter(record))
    with torch.no_grad():
        dict(model.named_parameters())[name].add_(1e-3)
    with pytest.raises(ValueError, match="off its quantization grid"):
        prepare_for_export(model, quantized="qdq")
    prepare_for_export(model)  # the dequantized form exports whatever the weights are


@pytest.mark.skipif(not has_module("onnxruntime"), reason="needs onnxruntime")
@pytest.mark.skipif(not has_module("onnx"), reason="needs onnx")
def test_a_wrapper_of_ones_own_exports_with_its_map_output(tmp_path):
    """A container of one's own that holds no weight itself (a backbone and a decoder) is traced through; a leaf of
    an unknown kind stays refused (test above). The compressed map matches onnxruntime's."""
    model, images = DenseHeadViT(as_dict=False), make_images(6)
    compress(model, [images], CompressionConfig(reduction=0.5, likelihood="bernoulli", progress=False))
    path = export_onnx(model, tmp_path / "m.onnx", INPUT)
    assert norm_relative_error(onnx_logits(path, images), model(images)) <= 1e-5


def test_an_opset_the_exporter_cannot_write_is_refused_before_tracing(tmp_path):
    from lowrank_vit.io.export import export_onnx, opset_range
    from tests.helpers import make_tiny_vit

    low, high = opset_range()
    for opset in (low - 1, high + 1):
        with pytest.raises(ValueError, match=rf"opset must be an integer in \[{low}, {high}\]"):
            export_onnx(make_tiny_vit(), tmp_path / "m.onnx", (3, 32, 32), opset=opset)
    assert not list(tmp_path.iterdir())


def test_an_exporter_failure_is_reported_on_one_line_naming_its_cause(tmp_path, monkeypatch):
    """When PyTorch's exporter fails, the error says so on one line with the exporter's own words (its whitespace
    and line breaks collapsed), or the exception's type where it has no words; nothing is left at the path."""

    def failing(message: str, kind: type[Exception]):
        def export(*args, **kwargs):
            raise kind(message)
        return export

    monkeypatch.setattr(torch.onnx, "export", failing("Unsupported: op\n   'aten::foo'\tin the graph ", RuntimeError))
    with pytest.raises(RuntimeError) as info:
        export_onnx(make_tiny_vit(), tmp_path / "m.onnx", (3, 32, 32))
    assert str(info.value) == "ONNX export failed: Unsupported: op 'aten::foo' in the graph"
    monkeypatch.setattr(torch.onnx, "export", failing(" \n ", AssertionError))  # a bare assert in a tracer
    with pytest.raises(RuntimeError) as info:
        export_onnx(make_tiny_vit(), tmp_path / "m.onnx", (3, 32, 32))
    assert str(info.value) == "ONNX export failed: AssertionError"
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(not has_module("onnxruntime"), reason="needs onnxruntime")
@pytest.mark.skipif(not has_module("onnx"), reason="needs onnx")
def test_the_codes_rewrite_keeps_a_dequantized_weight_that_is_a_graph_output(tmp_path):
    """A hand-built QDQ graph: ``y = x @ DQ(Q(a))`` and ``b_out = DQ(Q(b))`` given out as it is. Each QuantizeLinear
    becomes its uint8 codes (computed by hand: round(w / 0.1) + 128), the float weights leave the file, and the
    weight that is itself an output keeps its output name and dequantized values."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from lowrank_vit.io.export import _store_codes

    a = np.array([[0.1, -0.2], [0.3, 0.0]], dtype=np.float32)
    b = np.array([[0.5, -0.5, 1.2]], dtype=np.float32)
    inits = [numpy_helper.from_array(a, "a_float"), numpy_helper.from_array(b, "b_float"),
             numpy_helper.from_array(np.array(0.1, dtype=np.float32), "s"),
             numpy_helper.from_array(np.array(128, dtype=np.uint8), "z")]
    nodes = [helper.make_node("QuantizeLinear", ["a_float", "s", "z"], ["a_q"]),
             helper.make_node("DequantizeLinear", ["a_q", "s", "z"], ["a_dq"]),
             helper.make_node("MatMul", ["x", "a_dq"], ["y"]),
             helper.make_node("QuantizeLinear", ["b_float", "s", "z"], ["b_q"]),
             helper.make_node("DequantizeLinear", ["b_q", "s", "z"], ["b_out"])]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2]),
                               helper.make_tensor_value_info("b_out", TensorProto.FLOAT, [1, 3])], inits)
    path = tmp_path / "qdq.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))

    assert _store_codes(str(path)) == 2
    proto = onnx.load(str(path))
    stored = {init.name: numpy_helper.to_array(init) for init in proto.graph.initializer}
    assert stored["a"].tolist() == [[129, 126], [131, 128]] and stored["b"].tolist() == [[133, 123, 140]]
    assert stored["a"].dtype == np.uint8 and not {"a_float", "b_float"} & set(stored)
    assert [node.op_type for node in proto.graph.node] == ["DequantizeLinear", "MatMul", "DequantizeLinear"]
    assert [out.name for out in proto.graph.output] == ["y", "b_out"]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    y, b_out = session.run(None, {"x": np.array([[1.0, 2.0]], dtype=np.float32)})
    np.testing.assert_allclose(y, [[0.7, -0.2]], atol=1e-6)  # (1, 2) @ a
    np.testing.assert_allclose(b_out, b, atol=1e-6)


@pytest.mark.usefixtures("offline")
def test_the_export_makes_the_folders_of_its_path(tmp_path):
    """A path in folders that do not exist yet: they are made, and the file is written there."""
    import onnx

    path = export_onnx(make_tiny_vit(), tmp_path / "new" / "nested" / "m.onnx", INPUT)
    assert path == tmp_path / "new" / "nested" / "m.onnx"
    assert [out.name for out in onnx.load(str(path)).graph.output] == ["logits"]


@pytest.mark.usefixtures("offline")
@pytest.mark.skipif(not has_module("onnxruntime"), reason="needs onnxruntime")
@pytest.mark.skipif(not has_module("onnx"), reason="needs onnx")
def test_eva02_exports_and_the_callers_model_keeps_its_fused_attention(tmp_path):
    """EVA's attention hands F.scaled_dot_product_attention an is_causal flag that the exporter traced as a tensor
    and refused; the export copy takes timm's explicit attention instead (the same function), the model it was given
    keeps its fused one. Compressed, at another batch than the traced one."""
    from tests.helpers import build

    model, images = build("eva02-swiglu")
    compress(model, [images], CompressionConfig(reduction=0.3, calib_samples=24, progress=False))
    fused = [m for m in model.modules() if getattr(m, "fused_attn", None) is not None]
    assert fused and all(m.fused_attn for m in fused)
    export_onnx(model, tmp_path / "eva.onnx", tuple(images.shape[1:]))
    assert all(m.fused_attn for m in fused)
    with torch.no_grad():
        expected = model(images[:5])
    assert norm_relative_error(onnx_logits(tmp_path / "eva.onnx", images[:5]), expected) <= 1e-4
