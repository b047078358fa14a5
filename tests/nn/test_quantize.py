"""Tests of lowrank_vit/nn/quantize.py."""

from __future__ import annotations

import pytest
import torch

from lowrank_vit import compress, count_params, load_compressed, model_size_mib, quantize_, save_compressed
from lowrank_vit.config import recipe
from lowrank_vit.nn.factorized import FactorizedLinear
from lowrank_vit.nn.quantize import quantize_tensor
from tests.helpers import CUDA, TINY_VIT, compress_on, make, make_images, make_tiny_vit, method_cfg


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
def test_checkpoint_and_quantization_of_a_cuda_model(tmp_path):
    """Saved from the GPU, loaded on the CPU: the same weights. Quantized on each device: the same 8-bit codes and
    scales (eq. 16), so the dequantized weights differ by float32 rounding at most."""
    from lowrank_vit.nn.quantize import quantize_tensor

    dense = make_tiny_vit()
    gpu = compress_on("cuda", dense, [make_images(32, seed=1)], recipe("loss-aware", reduction=0.4, progress=False))
    save_compressed(gpu, tmp_path / "m", model_name="vit_tiny_patch16_224", model_kwargs=TINY_VIT)
    loaded = load_compressed(tmp_path / "m")
    for (name, a), (_, b) in zip(gpu.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a.cpu(), b), name
    for name, weight in loaded.state_dict().items():
        if weight.ndim == 2:
            on_cpu, on_gpu = quantize_tensor(weight, 8, 0), quantize_tensor(weight.to(CUDA), 8, 0)
            assert torch.equal(on_gpu.scale.cpu(), on_cpu.scale), name
            assert torch.equal(on_gpu.zero_point.cpu(), on_cpu.zero_point), name
            differ = int((on_gpu.codes.cpu() != on_cpu.codes).sum())
            assert differ == 0, (name, differ)
    quantize_(gpu, bits=8)
    quantize_(loaded, bits=8)
    for (name, a), (_, b) in zip(gpu.state_dict().items(), loaded.state_dict().items(), strict=True):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-6, atol=0, msg=name)


@pytest.mark.usefixtures("one_thread_module")
def test_comcat_quantized_round_trip(labelled, method_images, tmp_path):
    """quantize_ reaches COMCAT's head factors (not only the MLP's U, V, Z), and the codes survive save/load."""
    model = make("vit")
    compress(model, labelled, method_cfg(decomposition="comcat"))
    record = quantize_(model, bits=4)
    assert {"blocks.0.attn.q_weight", "blocks.0.attn.o_weight"} <= set(record)
    assert torch.unique(model.blocks[0].attn.q_weight[0]).numel() <= 16  # one channel on a 4-bit grid
    save_compressed(model, tmp_path / "m")
    loaded = load_compressed(tmp_path / "m")
    with torch.no_grad():
        assert torch.allclose(loaded(method_images[:4]), model(method_images[:4]), atol=1e-5)
    assert model_size_mib(loaded) == model_size_mib(model)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("axis", [None, 0, 1])
def test_round_to_nearest_error_bound(bits, axis):
    t = torch.randn(17, 23) * torch.linspace(0.1, 3, 23)
    q = quantize_tensor(t, bits, axis)
    assert int(q.codes.min()) >= 0 and int(q.codes.max()) <= 2**bits - 1
    err = (q.dequantize() - t).abs()
    scale = q.scale if axis is None else q.scale.view([-1 if d == axis else 1 for d in range(2)])
    assert torch.all(err <= scale / 2 + 1e-6)  # round-to-nearest: at most half a step
    assert len(torch.unique(q.codes)) <= 2**bits


@pytest.mark.parametrize("axis", [None, 0])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_one_signed_tensor_keeps_its_zero_point_in_the_code_range(sign, axis):
    """A tensor of one sign (all positive, all negative): the range is widened to include 0, so the zero point is a
    valid code (0..255 at 8 bits, which ONNX's DequantizeLinear needs as a uint8), and rounding stays within half a
    step."""
    t = sign * (torch.rand(9, 4) + 0.5)
    q = quantize_tensor(t, 8, axis)
    assert int(q.zero_point.min()) >= 0 and int(q.zero_point.max()) <= 255
    scale = q.scale if axis is None else q.scale[:, None]
    assert torch.all((q.dequantize() - t).abs() <= scale / 2 + 1e-6)


def test_quantization_is_idempotent_and_keeps_zeros():
    t = torch.randn(8, 5)
    t[2] = 0.0
    once = quantize_tensor(t, 8, 0).dequantize()
    twice = quantize_tensor(once, 8, 0).dequantize()
    assert torch.allclose(once, twice, atol=1e-6)
    assert torch.all(once[2] == 0)


def test_quantize_model_factors_and_size():
    model = make_tiny_vit()
    compress(model, [make_images(32)], recipe("paper", reduction=0.5, progress=False))  # with a low-rank Z
    before = {n: p.clone() for n, p in model.named_parameters()}
    fp16 = model_size_mib(model)
    assert fp16 == pytest.approx(count_params(model) * 2 / 2**20)
    record = quantize_(model, bits=8)
    factored = [n for n, m in model.named_modules() if isinstance(m, FactorizedLinear)]
    assert {f"{n}.U" for n in factored} <= set(record) and {f"{n}.z.G" for n in factored} <= set(record)
    changed = 0
    for name, param in model.named_parameters():
        if name in record:
            changed += not torch.equal(param, before[name])  # a one-value channel is exact, others move
            assert (param - before[name]).abs().max() < 0.05 * before[name].abs().max()
        else:
            assert torch.equal(param, before[name])  # norms, biases, head, patch embedding untouched
    assert changed >= len(factored) * 2
    expected_bits = 0
    for name, param in model.named_parameters():
        if name in record:
            axis = record[name]["axis"]
            expected_bits += param.numel() * 8 + (1 if axis is None else param.shape[axis]) * 32
        else:
            expected_bits += param.numel() * 16
    assert model_size_mib(model) == pytest.approx(expected_bits / 8 / 2**20)
    assert model_size_mib(model) < fp16


def test_baseline_size_accounting_matches_table4():
    """Table 4 counts every parameter at the stated width: 2 bytes a parameter at FP16."""
    model = make_tiny_vit()
    n = count_params(model)
    assert model_size_mib(model) == pytest.approx(n * 2 / 2**20)
    assert model_size_mib(model, bits=32) == pytest.approx(n * 4 / 2**20)
    with pytest.raises(ValueError, match="nothing to quantize"):
        quantize_(model, bits=4)
    quantize_(model, bits=4, include_dense=True)
    # Dense weights at 4 bits (+ 2 x 16 bits a channel), biases/norms/embeddings at 16 bits.
    assert model_size_mib(model) < 0.45 * n * 2 / 2**20


def test_bits_out_of_range():
    for bits in (1, 17, 32):
        with pytest.raises(ValueError, match="bits must be between 2 and 16"):
            quantize_tensor(torch.randn(3, 3), bits, 0)
    for bits in (2, 16):  # both ends are valid widths, and codes above 8 bits need a wider integer than uint8
        q = quantize_tensor(torch.randn(3, 3), bits, 0)
        assert int(q.codes.max()) <= 2**bits - 1 and q.codes.dtype == (torch.uint8 if bits <= 8 else torch.int32)


def independent_scale(tensor: torch.Tensor, bits: int, axis: int | None) -> torch.Tensor:
    """Eq. (16)'s step (max - min) / (2^N - 1) per channel, the range widened to include 0 (as documented: exact
    zeros stay exact), computed here without the library."""
    t = tensor.detach().double()
    if axis is None:
        lo, hi = t.min(), t.max()
    else:
        t = t.movedim(axis, 0).flatten(1)
        lo, hi = t.min(dim=1).values, t.max(dim=1).values
    return (hi.clamp(min=0.0) - lo.clamp(max=0.0)) / (2**bits - 1)


def assert_on_the_full_grid(values: torch.Tensor, step: torch.Tensor, bits: int, axis: int | None, name: str):
    """Every channel of ``values`` lies on the grid k * step (eq. 16's grid passes through 0: U_hat = s (q - z)) and
    spans 2^N - 1 steps from its lowest to its highest level (codes 0 and 2^N - 1 both used, 0 counted in the range):
    what N-bit codes with that step give, and what (N-1)-bit codes (twice the step) cannot."""
    v = values.detach().double()
    channels = v.flatten()[None] if axis is None else v.movedim(axis, 0).flatten(1)
    k = channels / step.double().reshape(-1, 1)
    assert torch.allclose(k, k.round(), atol=1e-3), f"{name}: values off the {bits}-bit grid"
    span = k.max(dim=1).values.clamp(min=0) - k.min(dim=1).values.clamp(max=0)
    assert torch.allclose(span, torch.full_like(span, 2.0**bits - 1), atol=1e-3), \
        f"{name}: codes do not reach both ends of [0, 2^{bits} - 1]"


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_uses_exactly_n_bit_codes(tmp_path, bits):
    """quantize_(bits=N) leaves each channel on N-bit codes whose step is (max - min) / (2^N - 1), reaching both
    ends, and save_compressed stores those codes and that scale; the loaded model holds the same grid."""
    from safetensors import safe_open

    from lowrank_vit import load_compressed, save_compressed

    model = make_tiny_vit()
    compress(model, [make_images(32)], recipe("paper", reduction=0.5, compensation="sparse", progress=False))
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    record = quantize_(model, bits=bits)
    assert {r["axis"] for r in record.values()} == {None, 0, 1}  # sparse Z values: one scale per tensor
    steps = {name: independent_scale(original[name], bits, r["axis"]) for name, r in record.items()}
    for name, r in record.items():
        assert r["bits"] == bits
        assert_on_the_full_grid(model.get_parameter(name), steps[name], bits, r["axis"], name)

    save_compressed(model, tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        for name in record:
            codes, axis = f.get_tensor(f"{name}:codes"), record[name]["axis"]
            zero = f.get_tensor(f"{name}:zero_point").double().reshape(-1)
            assert codes.dtype == torch.uint8
            per_channel = codes.double().flatten()[None] if axis is None else codes.double().movedim(axis, 0).flatten(1)
            lo = torch.minimum(per_channel.min(dim=1).values, zero)  # 0 is in every channel's range: code z
            hi = torch.maximum(per_channel.max(dim=1).values, zero)
            assert torch.all(lo == 0) and torch.all(hi == 2**bits - 1), name
            scale = f.get_tensor(f"{name}:scale").double()
            assert torch.allclose(scale.reshape(-1), steps[name].reshape(-1), rtol=1e-5, atol=0), name
    loaded = load_compressed(tmp_path)
    for name, r in record.items():
        assert_on_the_full_grid(loaded.get_parameter(name), steps[name], bits, r["axis"], name)
        assert torch.allclose(loaded.get_parameter(name), model.get_parameter(name), atol=1e-6, rtol=0), name


@pytest.mark.parametrize("compensation, index_entries", [("sparse", lambda z: 2 * z.values.numel()),
                                                         ("diagonal", lambda z: 2 * z.values.numel()),
                                                         ("structured", lambda z: z.values.shape[0])])
def test_size_counts_the_index_lists_of_sparse_z(compensation, index_entries):
    """Table 4's accounting charges a sparse Z's index lists at 32 bits an entry (a row and a column per value; one
    row index per kept row for the structured kind), beside every parameter at 16 bits; also after quantization."""
    from lowrank_vit.nn.factorized import RowSparseZ, SparseZ

    model = make_tiny_vit()
    compress(model, [make_images(32)], recipe("paper", reduction=0.5, compensation=compensation, progress=False))
    zs = [m.z for m in model.modules() if isinstance(m, FactorizedLinear)]
    assert zs and all(isinstance(z, RowSparseZ if compensation == "structured" else SparseZ) for z in zs)
    indices = sum(index_entries(z) for z in zs)
    assert indices > 0
    assert model_size_mib(model) == pytest.approx((count_params(model) * 16 + indices * 32) / 8 / 2**20, rel=1e-12)
    record = quantize_(model, bits=8)
    quantized_bits = sum(model.get_parameter(n).numel() * 8 + (
        1 if r["axis"] is None else model.get_parameter(n).shape[r["axis"]]) * 32 for n, r in record.items())
    others = count_params(model) - sum(model.get_parameter(n).numel() for n in record)
    assert model_size_mib(model) == pytest.approx((quantized_bits + others * 16 + indices * 32) / 8 / 2**20,
                                                  rel=1e-12)


def test_deit_b_is_165_1_mib_at_fp16():
    """docs/method.md's and Table 4's baseline: timm's DeiT-B has 86,567,656 parameters, 165.1 MiB at 2 bytes each
    (the paper prints 165.2 from its rounded 86.6M). Built on the meta device: shapes only, no memory."""
    import timm

    with torch.device("meta"):
        model = timm.create_model("deit_base_patch16_224", pretrained=False)
    assert count_params(model) == 86_567_656
    assert round(model_size_mib(model), 1) == 165.1
    assert model_size_mib(model) == pytest.approx(86_567_656 * 2 / 2**20)


def assert_within_half_a_step(after: torch.Tensor, before: torch.Tensor, axis: int) -> None:
    """Rounding to 8-bit codes moves every value of a channel by at most half that channel's own step
    (:func:`independent_scale` of the values before)."""
    error = (after.detach() - before).abs().double().movedim(axis, 0).flatten(1).amax(dim=1)
    assert bool((error <= independent_scale(before, 8, axis) / 2 * 1.001).all())


def test_every_output_channel_of_a_dense_layer_gets_its_own_scale():
    """Eq. (16) per output channel: rows of very different magnitudes (1 down to 1e-4, as a head's rows can be) each
    keep the 8-bit error bound of their own range. One scale per input column would round the small rows to 0."""
    layer = torch.nn.Linear(8, 5)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
                           * torch.logspace(0, -4, 5)[:, None])
    before = layer.weight.detach().clone()
    record = quantize_(torch.nn.Sequential(layer), bits=8, include_dense=True)
    assert record["0.weight"]["axis"] == 0
    assert_within_half_a_step(layer.weight, before, axis=0)


def test_comcat_head_factors_get_one_scale_per_output_row():
    """COMCAT's per-head factors (q/k/v/o_weight: one row per output channel) are quantized per row like any weight:
    rows scaled from 1 down to 1e-4 each keep their own 8-bit bound."""
    from lowrank_vit.nn.comcat import FactorizedAttention

    model = make_tiny_vit()
    compress(model, [make_images(16)], decomposition="comcat", reduction=0.3, calib_samples=16, progress=False)
    attention = next(m for m in model.modules() if isinstance(m, FactorizedAttention))
    with torch.no_grad():
        rows = attention.q_weight.shape[0]
        attention.q_weight.mul_(torch.logspace(0, -4, rows)[:, None])
    before = attention.q_weight.detach().clone()
    quantize_(model, bits=8)
    assert_within_half_a_step(attention.q_weight, before, axis=0)


@pytest.mark.parametrize("compensation, leaf, axis", [("lowrank", "z.G", 1), ("lowrank", "z.Y", 0),
                                                      ("structured", "z.values", 1)])
def test_z_factors_get_one_scale_per_output_channel(compensation, leaf, axis):
    """A Z's parameters are quantized per output channel of what they compute (G: x G's columns; Y: rows; a
    structured Z's values: its output columns): channels scaled from 1 down to 1e-4 each keep their own 8-bit bound,
    which one scale per channel of the other axis would not."""
    model = make_tiny_vit()
    compress(model, [make_images(32)], recipe("paper", reduction=0.5, compensation=compensation, progress=False))
    name = next(n for n, m in model.named_modules() if isinstance(m, FactorizedLinear))
    param = model.get_parameter(f"{name}.{leaf}")
    with torch.no_grad():
        shape = [1, 1]
        shape[axis] = -1
        param.mul_(torch.logspace(0, -4, param.shape[axis]).reshape(shape))
    before = param.detach().clone()
    record = quantize_(model, bits=8)
    assert record[f"{name}.{leaf}"]["axis"] == axis  # finer scales would pass the bound below but not the accounting
    assert_within_half_a_step(param, before, axis)
