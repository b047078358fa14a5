"""Tests of lowrank_vit/speed/runtimes.py."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from lowrank_vit.speed import runtimes
from lowrank_vit.speed.runtimes import RUNTIMES, Runtime, device_name, environment, get_runtime
from tests.helpers import has_module

pytestmark = pytest.mark.usefixtures("one_thread")


def linear_and_input() -> tuple[nn.Linear, torch.Tensor]:
    layer = nn.Linear(3, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 0.5]]))
        layer.bias.copy_(torch.tensor([0.5, -2.0]))
    return layer, torch.tensor([[1.0, 1.0, 2.0], [2.0, 0.0, -2.0]])


EXPECTED = torch.tensor([[9.5, -2.0], [-3.5, -3.0]])  # x W^T + b, by hand


def test_the_registry_holds_the_three_runtimes_and_names_them_on_a_typo():
    assert list(RUNTIMES) == ["torch", "torch.compile", "cuda-graphs", "onnxruntime"]
    assert all(isinstance(rt, Runtime) and rt.name == name for name, rt in RUNTIMES.items())
    assert get_runtime("torch") is RUNTIMES["torch"]
    with pytest.raises(ValueError) as error:
        get_runtime("tensorrt")
    assert str(error.value) == "unknown runtime 'tensorrt'; registered: torch, torch.compile, cuda-graphs, onnxruntime"
    assert RUNTIMES["onnxruntime"].dtypes == ("float32",) and RUNTIMES["onnxruntime"].devices == ("cpu",)


def test_check_refuses_a_device_or_precision_the_runtime_does_not_time():
    RUNTIMES["torch"].check("cpu", "float32")
    RUNTIMES["torch"].check("cpu", "bfloat16")
    with pytest.raises(ValueError, match=r"runtime 'torch' is timed on cpu, cuda here, not 'mps'"):
        RUNTIMES["torch"].check("mps", "float32")
    with pytest.raises(ValueError, match=r"runtime 'torch' runs float32, bfloat16, float16, not 'int8'"):
        RUNTIMES["torch"].check("cpu", "int8")
    if has_module("onnxruntime"):
        with pytest.raises(ValueError, match=r"runtime 'onnxruntime' is timed on cpu here, not 'cuda'"):
            RUNTIMES["onnxruntime"].check("cuda", "float32")
    with pytest.raises(ValueError, match=r"runtime 'cuda-graphs' is timed on cuda here, not 'cpu'"):
        RUNTIMES["cuda-graphs"].check("cpu", "float32")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where no CUDA device is present")
def test_check_refuses_cuda_without_a_cuda_device():
    with pytest.raises(ValueError, match="--device cuda: no CUDA device is available here"):
        RUNTIMES["torch"].check("cuda", "float32")


def test_onnxruntime_missing_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    with pytest.raises(ValueError, match=r"pip install 'lowrank-vit\[export\]'"):
        RUNTIMES["onnxruntime"].versions()
    with pytest.raises(ValueError, match="needs onnxruntime and onnx"):
        RUNTIMES["onnxruntime"].check("cpu", "float32")  # the versions are checked first


def test_the_torch_runtime_runs_one_forward_pass_on_the_cpu(tmp_path):
    layer, x = linear_and_input()
    call = RUNTIMES["torch"].prepare(layer, x, torch.device("cpu"), "float32", str(tmp_path))
    out = call()
    torch.testing.assert_close(out, EXPECTED)
    assert not out.requires_grad  # run under inference mode
    torch.testing.assert_close(call(), EXPECTED)  # the call can be repeated
    assert list(tmp_path.iterdir()) == []  # eager torch writes nothing to the scratch folder


def test_the_torch_runtime_runs_in_the_requested_precision(tmp_path):
    layer, x = linear_and_input()
    out = RUNTIMES["torch"].prepare(layer, x, torch.device("cpu"), "bfloat16", str(tmp_path))()
    assert out.dtype == torch.bfloat16
    assert torch.equal(out.float(), EXPECTED)  # small integers and halves: exact in bfloat16


@pytest.mark.parametrize("runtime", ["torch", "torch.compile"])
def test_the_torch_runtimes_run_a_copy_and_leave_the_callers_module_as_it_was(tmp_path, runtime):
    layer, x = linear_and_input()
    weight = layer.weight
    call = RUNTIMES[runtime].prepare(layer, x, torch.device("cpu"), "bfloat16", str(tmp_path))
    assert layer.weight is weight and layer.weight.dtype == torch.float32 and layer.training  # not cast, not eval()
    assert torch.equal(layer.weight, torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 0.5]]))
    if runtime == "torch":  # (torch.compile would compile on this first call: seconds)
        assert call().dtype == torch.bfloat16


def test_device_name_reads_the_cpu_model_and_falls_back_to_the_platform(monkeypatch):
    cpuinfo = "processor\t: 0\nvendor_id\t: Acme\nmodel name\t: Acme CPU 9000: rev 2 @ 3.0GHz\nflags\t: fpu\n"

    class FakePath:
        text: str | None = cpuinfo

        def __init__(self, path):
            assert path == "/proc/cpuinfo"

        def read_text(self):
            if self.text is None:
                raise FileNotFoundError("/proc/cpuinfo")
            return self.text

    monkeypatch.setattr(runtimes, "Path", FakePath)
    assert device_name("cpu") == "Acme CPU 9000: rev 2 @ 3.0GHz"  # split at the first colon only
    monkeypatch.setattr(runtimes.platform, "processor", lambda: "")
    monkeypatch.setattr(runtimes.platform, "machine", lambda: "riscv64")
    FakePath.text = "processor\t: 0\nBogoMIPS\t: 50.00\n"  # no model name line (some ARM kernels)
    assert device_name("cpu") == "riscv64"
    FakePath.text = None  # no /proc (macOS, Windows)
    assert device_name("cpu") == "riscv64"
    monkeypatch.setattr(runtimes.platform, "processor", lambda: "arm")
    assert device_name("cpu") == "arm"


def test_environment_records_what_a_measurement_depends_on():
    env = environment("cpu", "torch")
    assert set(env) == {"device", "device_name", "threads", "versions"}
    assert env["device"] == "cpu" and env["threads"] == 1  # the one_thread fixture
    assert env["versions"] == {"torch": torch.__version__}
    assert isinstance(env["device_name"], str) and env["device_name"]
    with pytest.raises(ValueError, match="unknown runtime 'tvm'"):
        environment("cpu", "tvm")


@pytest.mark.skipif(not has_module("onnxruntime"), reason="needs onnxruntime")
def test_the_onnxruntime_runtime_runs_the_exported_module(tmp_path):
    import onnxruntime

    layer, x = linear_and_input()
    call = RUNTIMES["onnxruntime"].prepare(layer, x, torch.device("cpu"), "float32", str(tmp_path))
    (out,) = call()
    torch.testing.assert_close(torch.from_numpy(out), EXPECTED)
    assert [p.suffix for p in tmp_path.iterdir()] == [".onnx"]  # exported into the scratch folder
    assert RUNTIMES["onnxruntime"].versions() == {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__}
    assert torch.equal(layer.weight, torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 0.5]]))  # exported from a copy


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graphs_replay_the_captured_forward_on_a_copy(tmp_path):
    layer, x = linear_and_input()
    call = RUNTIMES["cuda-graphs"].prepare(layer, x, torch.device("cuda"), "float32", str(tmp_path))
    assert layer.weight.device.type == "cpu" and layer.training  # the caller's module is not moved
    for _ in range(2):  # each replay rewrites the captured output: the same values every time
        assert torch.allclose(call().cpu(), EXPECTED)
