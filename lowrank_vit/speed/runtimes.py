"""The runtimes a module is timed in, registered by name: "torch" (eager PyTorch), "torch.compile" (inductor: every
form compiled once, seconds each) and "onnxruntime" (the module exported to ONNX by the TorchScript exporter, run by
onnxruntime's CPU provider). Each turns a module and an example
input into a call that runs one forward pass; :func:`environment` says what the speed depends on, so that a table
measured elsewhere is recognised as stale."""

from __future__ import annotations

import copy
import platform
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowrank_vit.core.common import Registry
from lowrank_vit.io.export import prepare_for_export

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Runtime:
    name: str
    prepare: Callable[[nn.Module, torch.Tensor, torch.device, str, str], Callable[[], object]]
    """(module, example input, device, dtype, scratch folder) -> a call running one forward pass on the input (on a
    copy of the module: the caller's is left as it was)."""
    versions: Callable[[], dict[str, str]]
    """The versions of what runs the call (raises ValueError naming what to install if it is missing)."""
    dtypes: tuple[str, ...]
    devices: tuple[str, ...]

    def check(self, device: str, dtype: str) -> None:
        """A clear ValueError for a device or precision this runtime does not time here."""
        self.versions()
        if device not in self.devices:
            raise ValueError(f"runtime {self.name!r} is timed on {', '.join(self.devices)} here, not {device!r}")
        if dtype not in self.dtypes:
            raise ValueError(f"runtime {self.name!r} runs {', '.join(self.dtypes)}, not {dtype!r}")
        if device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is available here")
        if device == "cuda" and dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
            raise ValueError("this GPU has no bfloat16 support: use --dtype float16 or float32")


RUNTIMES: Registry[Runtime] = Registry("runtime")
get_runtime = RUNTIMES.lookup


def _placed(module: nn.Module, device: torch.device, dtype: str) -> nn.Module:
    """A copy of ``module`` on ``device`` in ``dtype``, in eval mode: ``to`` and ``eval`` change a module in place,
    and a bfloat16 run must not leave the caller's model in bfloat16."""
    return copy.deepcopy(module).to(device=device, dtype=DTYPES[dtype]).eval()


def _torch_call(module: nn.Module, example: torch.Tensor, device: torch.device, dtype: str,
                scratch: str) -> Callable[[], object]:
    module = _placed(module, device, dtype)
    x = example.to(device=device, dtype=DTYPES[dtype])

    def call() -> object:
        with torch.inference_mode():
            return module(x)

    return call


def _compiled_call(module: nn.Module, example: torch.Tensor, device: torch.device, dtype: str,
                   scratch: str) -> Callable[[], object]:
    """``torch.compile`` (inductor) of the module for this input shape; compiled on the first call (the warm-up)."""
    module = torch.compile(_placed(module, device, dtype), dynamic=False)
    x = example.to(device=device, dtype=DTYPES[dtype])

    def call() -> object:
        with torch.inference_mode():
            return module(x)

    return call


def _graphed_call(module: nn.Module, example: torch.Tensor, device: torch.device, dtype: str,
                  scratch: str) -> Callable[[], object]:
    """Eager PyTorch captured once in a CUDA graph and replayed: what a server does at small batch, where launching
    kernels one by one costs more than running them. Replays write the same output buffer."""
    module = _placed(module, device, dtype)
    x = example.to(device=device, dtype=DTYPES[dtype])
    graph = torch.cuda.CUDAGraph()
    with torch.inference_mode():
        side = torch.cuda.Stream()  # warm-up on a side stream, as capture asks: lazy initializations stay out of it
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                module(x)
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(graph):
            out = module(x)

    return _Replay(graph, out, keep_alive=(module, x))


@dataclass(frozen=True)
class _Replay:
    """A captured CUDA graph as a call. The graph holds raw addresses of the module's weights and of its input, not
    references: ``keep_alive`` holds both (freed, their memory is reused and a replay reads it: an illegal memory
    access)."""
    graph: Any
    out: object
    keep_alive: tuple[nn.Module, torch.Tensor]

    def __call__(self) -> object:
        self.graph.replay()
        return self.out


def _torch_versions() -> dict[str, str]:
    return {"torch": torch.__version__}


def _ort_versions() -> dict[str, str]:
    try:
        import onnxruntime
    except ImportError:
        raise ValueError("runtime 'onnxruntime' needs onnxruntime and onnx: pip install 'lowrank-vit[export]'") \
            from None
    return {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__}


def _ort_call(module: nn.Module, example: torch.Tensor, device: torch.device, dtype: str,
              scratch: str) -> Callable[[], object]:
    import onnxruntime as ort


    path = Path(tempfile.mkstemp(suffix=".onnx", dir=scratch)[1])
    module = prepare_for_export(module)  # a copy in its export form, as `lowrank-vit export` writes it
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example.float().cpu(),), str(path), input_names=["x"], output_names=["y"],
                          opset_version=17, dynamo=False, do_constant_folding=True)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # the same cores as torch, side by side
    options.inter_op_num_threads = 1
    # idle sessions' spinning threads would take the cores from the session being timed (many sessions are timed
    # side by side): wait passively, as OMP_WAIT_POLICY=PASSIVE does for torch
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {"x": example.float().cpu().numpy()}
    return lambda: session.run(None, feed)


RUNTIMES.add("torch", Runtime("torch", _torch_call, _torch_versions, tuple(DTYPES), ("cpu", "cuda")))
RUNTIMES.add("torch.compile", Runtime("torch.compile", _compiled_call, _torch_versions, tuple(DTYPES), ("cpu", "cuda")))
RUNTIMES.add("cuda-graphs", Runtime("cuda-graphs", _graphed_call, _torch_versions, tuple(DTYPES), ("cuda",)))
RUNTIMES.add("onnxruntime", Runtime("onnxruntime", _ort_call, _ort_versions, ("float32",), ("cpu",)))


def device_name(device: str) -> str:
    """The GPU's name, or the CPU's model name (from /proc/cpuinfo where there is one)."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str, runtime: str) -> dict[str, Any]:
    """What a latency measurement depends on: device type and name, torch's thread count, the runtime's versions."""
    return {"device": device, "device_name": device_name(device), "threads": torch.get_num_threads(),
            "versions": get_runtime(runtime).versions()}
