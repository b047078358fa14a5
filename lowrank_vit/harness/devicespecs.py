"""The devices a cost estimate knows (``lowrank-vit plan NAME --estimate --gpu NAME``): published peak throughputs
per precision, and how well the eigensolvers and the calibration hooks use them (every figure: docs/estimate.md)."""

from __future__ import annotations

from dataclasses import dataclass

GPU_HOOK_LATENCY_S = 1.2e-3
"""See :attr:`DeviceSpec.hook_latency_s`."""


@dataclass(frozen=True)
class DeviceSpec:
    """One device of the table: published peak throughputs (TFLOP/s, dense, no sparsity) and how well the
    eigensolvers use it."""

    label: str
    peak_tflops: dict[str, float]
    """Precision ("fp32", "tf32", "bf16", "fp64") -> peak TFLOP/s."""
    memory_gib: float
    eig_efficiency: float
    """Fraction of the float64 peak an eigendecomposition or SVD of a few hundred to a few thousand rows reaches:
    LAPACK on a CPU is blocked and fast; cuSOLVER's are memory-bound and sequential at these sizes."""
    eig_latency_s: float
    """Fixed cost of one eigendecomposition call (GPU solvers synchronize with the host several times per call)."""
    hook_latency_s: float = 0.0
    """Host time of the calibration hooks' per-batch work for one layer (small kernels, a finiteness check and norms
    read back to the host), which a GPU's short passes cannot hide: 1.2 ms per layer and (micro-)batch, fitted on
    DeiT-B on an H100 and checked on DeiT-S (docs/estimate.md); assumed for the other GPUs. Hidden behind the
    products on a CPU."""


DEVICES: dict[str, DeviceSpec] = {
    # NVIDIA datasheets (SXM parts where there are two); fp64 is the tensor-core DGEMM figure on A100 and H100
    "a100": DeviceSpec("NVIDIA A100 80GB", {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp64": 19.5}, 80, 0.05,
                       2e-3, GPU_HOOK_LATENCY_S),
    "h100": DeviceSpec("NVIDIA H100 SXM", {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "fp64": 66.9}, 80, 0.05,
                       2e-3, GPU_HOOK_LATENCY_S),
    "a6000": DeviceSpec("NVIDIA RTX A6000", {"fp32": 38.7, "tf32": 77.4, "bf16": 154.8, "fp64": 38.7 / 32}, 48,
                        0.05, 2e-3, GPU_HOOK_LATENCY_S),
    "rtx4090": DeviceSpec("NVIDIA GeForce RTX 4090", {"fp32": 82.6, "tf32": 82.6, "bf16": 165.2, "fp64": 82.6 / 64},
                          24, 0.05, 2e-3, GPU_HOOK_LATENCY_S),
    # two cores of a Zen 4 server CPU: AVX-512 runs on two 256-bit FMA pipes, 32 fp32 FLOPs a cycle a core, ~3 GHz
    "cpu": DeviceSpec("2 cores of a Zen 4 CPU", {"fp32": 0.192, "tf32": 0.192, "bf16": 0.384, "fp64": 0.096}, 16,
                      0.3, 0.0),
}
"""--gpu choices. Add a device by adding an entry; every figure is documented in docs/estimate.md."""


def get_device(name: str) -> DeviceSpec:
    """The device called ``name``.

    Raises:
        ValueError: an unknown name (the message lists the known ones).
    """
    try:
        return DEVICES[name]
    except KeyError:
        raise ValueError(f"unknown --gpu {name!r}; known: {', '.join(DEVICES)}") from None
