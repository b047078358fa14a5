"""The CUDA code paths against the CPU's: compression, the SGD solver of Z (plain and under Lightning), the partial
fine-tune (float32 and bfloat16 mixed precision), quantization, checkpoints and ``lowrank-vit compress --device
cuda``. Skipped where torch sees no CUDA device (CI has none; run ``make test`` on a GPU machine to exercise them).

The CPU and the GPU round float32 products differently (cuDNN's convolutions in TF32 by default), so a compressed
model is compared across devices against the change that compression itself makes: the same ranks everywhere, and
outputs whose cross-device difference is a small fraction of their distance to the dense model."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from lowrank_vit import CompressionConfig, compress, load_compressed, quantize_, save_compressed
from lowrank_vit.config import recipe
from lowrank_vit.nn.factorized import FactorizedLinear

from conftest import TINY_VIT, cli, make_images, make_tiny_vit, norm_relative_error

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

WIDER = dict(embed_dim=64, num_heads=4, depth=3)  # 64 wide: enough rank for the allocation to have choices
CUDA = torch.device("cuda", 0)


def ranks(model: nn.Module) -> dict[str, int]:
    return {n: m.rank for n, m in model.named_modules() if isinstance(m, FactorizedLinear)}


def compress_on(device: str, dense: nn.Module, batches: list[torch.Tensor], cfg: CompressionConfig) -> nn.Module:
    model = copy.deepcopy(dense).to(device)
    compress(model, batches, cfg)  # batches stay on the CPU: compress moves them to the model's device
    return model


@pytest.mark.parametrize("name", ["loss-aware", "loss-aware-fast", "loss-aware-refit", "paper", "vanilla", "flar-svd",
                                  "svd-llm", "kfac-lems"])
def test_compress_on_cuda_matches_cpu(name):
    dense = make_tiny_vit(**WIDER)
    images = make_images(96, seed=1)
    labels = torch.arange(96) % 10  # KFAC-SVD's gradients are of the true labels
    batches = [(images[i: i + 32], labels[i: i + 32]) for i in range(0, 96, 32)]
    cfg = recipe(name, reduction=0.5, calib_samples=96, progress=False)
    cpu, gpu = (compress_on(device, dense, batches, cfg) for device in ("cpu", "cuda"))
    assert all(p.device == CUDA for p in gpu.parameters())
    assert ranks(gpu) == ranks(cpu) and ranks(cpu)
    assert sum(p.numel() for p in gpu.parameters()) == sum(p.numel() for p in cpu.parameters())
    test = make_images(64, seed=2)
    with torch.no_grad():
        reference, on_cpu, on_gpu = dense(test), cpu(test), gpu(test.to(CUDA))
    change = norm_relative_error(on_cpu, reference)
    assert change > 1e-3  # compression changed the outputs, so the bound below means something
    assert norm_relative_error(on_gpu, on_cpu) < 0.05 * change, (norm_relative_error(on_gpu, on_cpu), change)


def test_sgd_solver_of_z_on_cuda_follows_the_cpu():
    """The paper's solver (Table 1's rows): Z fitted by Adam on eq. (10), every layer on the GPU, the same token
    samples and mini-batches as on the CPU, so the loss curves agree and fall."""
    dense = make_tiny_vit(**WIDER)
    cfg = recipe("paper", reduction=0.5, solver="sgd", sgd_iterations=60, calib_samples=64, progress=False)
    losses = {}
    for device in ("cpu", "cuda"):
        model = copy.deepcopy(dense).to(device)
        losses[device] = compress(model, [make_images(64, seed=1)], cfg).sgd_loss
        assert all(p.device.type == device for p in model.parameters())
    assert losses["cuda"].keys() == losses["cpu"].keys() and losses["cpu"]
    for name, curve in losses["cuda"].items():
        assert len(curve) == 60 and all(map(math.isfinite, curve)), name
        assert curve[-1] == pytest.approx(losses["cpu"][name][-1], rel=2e-2), name
    first, last = (sum(sum(c[s]) for c in losses["cuda"].values()) for s in (slice(0, 10), slice(-10, None)))
    assert last < first, (first, last)  # single mini-batches are noisy; ten of them over every layer fall


def test_lightning_compensation_on_gpu_is_fit_sgd():
    """Under Lightning the per-layer optimizers run on the GPU the tasks live on, and give fit_sgd's Z there."""
    from test_lightning_compensation import flat, make_tasks

    from lowrank_vit.methods.compensate import fit_sgd
    from lowrank_vit.stages.lightning_compensation import _accelerator_of, fit_layerwise

    tasks, _, _ = make_tasks()
    for task in tasks.values():
        task.z.to(CUDA)
        task.inputs, task.targets, task.weights = (t.to(CUDA) for t in (task.inputs, task.targets, task.weights))
    assert _accelerator_of(tasks)[0] == "gpu"
    twin = copy.deepcopy(tasks)
    loop = fit_sgd(tasks, lr=1e-3, iterations=40, batch_size=32, seed=3, progress=False)
    lightning = fit_layerwise(twin, lr=1e-3, iterations=40, batch_size=32, seed=3)
    for name in tasks:
        assert next(twin[name].z.parameters()).device == CUDA
        torch.testing.assert_close(flat(twin[name].z), flat(tasks[name].z), rtol=1e-4, atol=1e-6)
        assert lightning[name][-1] == pytest.approx(loop[name][-1], rel=1e-4)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed"])
def test_partial_finetune_on_gpu(precision):
    from test_finetune import synthetic_data

    from lowrank_vit.stages.finetune import FinetuneConfig, finetune

    model = make_tiny_vit()
    compress(model, [make_images(32, seed=1)], recipe("paper", reduction=0.4, progress=False))
    data = synthetic_data(64)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    module, trainer = finetune(model, DataLoader(data, batch_size=16), DataLoader(data, batch_size=32),
                               config=FinetuneConfig(epochs=2, lr=3e-3, warmup_steps=2, precision=precision),
                               accelerator="gpu", devices=1, progress=False, enable_model_summary=False)
    assert trainer.precision == precision and trainer.global_step == 8
    assert torch.isfinite(trainer.callback_metrics["val/loss"])
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach().cpu(), before[n])}
    assert "head.weight" in changed and changed <= {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(p.dtype == torch.float32 for p in model.parameters())  # mixed precision keeps float32 weights


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


def _cli_workdir(tmp_path) -> list[str]:
    """test_usercli's image folder and weights under ``tmp_path``; returns the model arguments of ``compress``."""
    import timm
    from PIL import Image
    from safetensors.torch import save_file
    from test_usercli import ARCH, KWARGS, SIZE, _images, _model_args

    for i, (array, label) in enumerate(_images()):
        (tmp_path / "imgs" / f"class{label}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(tmp_path / "imgs" / f"class{label}" / f"{i}.png")
    torch.manual_seed(0)
    save_file(timm.create_model(ARCH, pretrained=False, img_size=SIZE, **KWARGS).state_dict(),
              str(tmp_path / "weights.safetensors"),
              metadata={"mean": "[0.5, 0.5, 0.5]", "std": "[0.5, 0.5, 0.5]", "crop_pct": "1.0"})
    return _model_args(tmp_path)


def _cli_compress(capsys, tmp_path, model_args: list[str], device: str) -> None:
    code, _, err = cli(capsys, "compress", *model_args, "--data", str(tmp_path / "imgs"), "--workers", "0",
                       "--calib-samples", "16", "--quiet", "--reduction", "0.3", "--device", device,
                       "--output", str(tmp_path / device))
    assert code == 0, err


def test_cli_compress_device_cuda_matches_cpu(tmp_path, capsys):
    """``lowrank-vit compress --device cuda``: test_usercli's image folder and weights, the CPU's ranks and sizes."""
    model_args = _cli_workdir(tmp_path)
    reports = {}
    for device in ("cpu", "cuda"):
        _cli_compress(capsys, tmp_path, model_args, device)
        reports[device] = json.loads((tmp_path / device / "report.json").read_text())
    cpu, gpu = reports["cpu"], reports["cuda"]
    assert gpu["device"].startswith("cuda") and cpu["device"] == "cpu"
    assert gpu["params"] == cpu["params"]
    assert [layer["rank"] for layer in gpu["layers"]] == [layer["rank"] for layer in cpu["layers"]]
    assert gpu["accuracy"]["after"]["images"] == cpu["accuracy"]["after"]["images"] == 6
    assert abs(gpu["accuracy"]["after"]["top1"] - cpu["accuracy"]["after"]["top1"]) <= 100 / 6 + 1e-9  # one image


def test_cli_finetune_evaluate_export_after_cuda(tmp_path, capsys):
    """The rest of a practitioner's path on the GPU: ``finetune --device cuda`` of a directory compressed there (bf16
    mixed precision, distillation from the dense model rebuilt from what compress recorded) moves the trained
    parameters and no factor; ``evaluate --device cuda`` agrees with the CPU's on the result; ``export`` runs it in
    onnxruntime against PyTorch."""
    from safetensors.torch import load_file

    _cli_compress(capsys, tmp_path, _cli_workdir(tmp_path), "cuda")
    code, _, err = cli(capsys, "finetune", str(tmp_path / "cuda"), "--data", str(tmp_path / "imgs"), "--workers", "0",
                       "--epochs", "1", "--batch-size", "8", "--lr", "1e-2", "--precision", "bf16-mixed",
                       "--distill", "0.5", "--device", "cuda", "--quiet", "--output", str(tmp_path / "ft"))
    assert code == 0, err
    report = json.loads((tmp_path / "ft" / "report.json").read_text())
    assert report["finetune"]["steps"] == 3 and report["finetune"]["precision"] == "bf16-mixed"
    before, after = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("cuda", "ft"))
    assert before.keys() == after.keys()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert "head.weight" in moved and not any(k.endswith((".U", ".V")) for k in moved), sorted(moved)
    results = {}
    for device in ("cpu", "cuda"):
        code, out, err = cli(capsys, "evaluate", str(tmp_path / "ft"), "--data", str(tmp_path / "imgs"),
                             "--workers", "0", "--json", "--latency-batches", "--device", device, "--quiet")
        assert code == 0, err
        results[device] = json.loads(out)
    assert results["cuda"]["device"].startswith("cuda") and results["cpu"]["device"] == "cpu"
    assert results["cuda"]["images"] == results["cpu"]["images"] == 6
    assert abs(results["cuda"]["top1"] - results["cpu"]["top1"]) <= 100 / 6 + 1e-9  # one image of six
    code, _, err = cli(capsys, "export", str(tmp_path / "ft"), "--output", str(tmp_path / "m.onnx"), "--quiet")
    assert code == 0, err
    assert (tmp_path / "m.onnx").stat().st_size > 0
