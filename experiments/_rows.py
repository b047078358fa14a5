"""Shared construction of registry rows: the architectures, and one function that builds a row's full and smoke
configurations from its method settings, so every table states only what differs between its rows."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from lowrank_vit.config import RECIPES, CompressionConfig
from lowrank_vit.methods.prune import PruningConfig
from lowrank_vit.methods.vmeanba import VMeanbaConfig
from lowrank_vit.repro.registry import (
    Experiment,
    HardwareConfig,
    ModelConfig,
    PaperResult,
    QuantizationConfig,
    RunConfig,
)
from lowrank_vit.stages.data_config import DataConfig
from lowrank_vit.stages.finetune_config import FinetuneConfig


@dataclass(frozen=True)
class Arch:
    key: str
    timm_name: str
    """timm model with the pretrained tag whose ImageNet top-1 matches the paper's baseline."""
    params: int
    """timm's parameter count of that model (checked by tests/experiments/test_rows.py)."""
    label: str
    gpus: int
    """GPUs the full-scale row asks for (the paper used A6000s; override with --devices)."""


ARCHS = {a.key: a for a in (
    Arch("deit_t", "deit_tiny_patch16_224.fb_in1k", 5_717_416, "DeiT-T", 1),
    Arch("deit_s", "deit_small_patch16_224.fb_in1k", 22_050_664, "DeiT-S", 2),
    Arch("deit_b", "deit_base_patch16_224.fb_in1k", 86_567_656, "DeiT-B", 4),
    Arch("vit_b", "vit_base_patch16_224.augreg_in21k_ft_in1k", 86_567_656, "ViT-B", 4),
    Arch("vit_l", "vit_large_patch16_224.augreg_in21k_ft_in1k", 304_326_632, "ViT-L", 8),
    Arch("swin_b", "swin_base_patch4_window7_224.ms_in22k_ft_in1k", 87_768_224, "Swin-B", 4),
    # vision state-space models (lowrank_vit/nn/vssm.py, no timm weights: experiments/ssm.py says how to run them)
    Arch("vmamba_t", "vmamba_tiny", 30_215_944, "VMamba-T", 2),
    Arch("vmamba_s", "vmamba_small", 48_984_328, "VMamba-S", 4),
    Arch("vmamba_b", "vmamba_base", 86_558_056, "VMamba-B", 4),
)}

FULL_CALIB, SMOKE_CALIB = 1024, 256
FULL_FINETUNE = FinetuneConfig(epochs=20, lr=1e-4, batch_size=128)
"""Section 4.1: 20 epochs, lr 1e-4, cosine (batch size: the paper gives none)."""
SMOKE_FINETUNE = FinetuneConfig(epochs=2, lr=1e-3, batch_size=64)
"""Two epochs over the 4,000 training digits; a larger rate than the paper's for a run of ~125 steps."""

METHODS: dict[str, dict[str, Any]] = {
    # the paper's recipe, spelled out so that the rows reproduce it whatever the library's defaults are
    "ours": RECIPES["paper"],
    # the library's default recipe (docs/loss_aware.md): loss-aware SVD, marginal allocation, no Z
    "loss-aware": RECIPES["loss-aware"],
    "vanilla": RECIPES["vanilla"],
    "paper-literal": {**RECIPES["paper"], "decomposition": "mean", "solver": "sgd"},
    # the comparison table (experiments/compare.py): only the decomposition differs from "ours"
    "plain": {**RECIPES["paper"], "decomposition": "plain"},
    "mean": {**RECIPES["paper"], "decomposition": "mean"},
    "asvd": {**RECIPES["paper"], "decomposition": "asvd"},
    "fwsvd": {**RECIPES["paper"], "decomposition": "fwsvd"},
    "comcat": {**RECIPES["paper"], "decomposition": "comcat"},
    # the strongest published peers (docs/peers.md): each its own decomposition and allocation, published settings
    "flar-svd": RECIPES["flar-svd"],
    "svd-llm": RECIPES["svd-llm"],
    "svd-llm-update": RECIPES["svd-llm-update"],
    "svd-llm-v2": RECIPES["svd-llm-v2"],
    "kfac-lems": RECIPES["kfac-lems"],
    "comcat-search": RECIPES["comcat-search"],
}
"""Compression settings of the named methods. "ours" is the paper's recipe as this library implements it exactly
(whitened SVD, Algorithm 1, closed-form low-rank Z); "loss-aware" is the library's default. "vanilla" is Table 2's
"Vanilla SVD + FT": plain SVD, the same fraction in every layer, no Z. "paper-literal" follows the paper's text
step by step (eq. 7's mean input, Algorithm 1, Z = G Y^T by mini-batch gradient descent). "plain", "mean", "asvd",
"fwsvd" and "comcat" are ours with another decomposition and nothing else changed: greedy ranks on that method's own
spectra and the closed-form low-rank Z (for COMCAT on the MLP layers only: its attention heads take no Z).
"flar-svd", "svd-llm", "svd-llm-update", "svd-llm-v2" and "kfac-lems" are the peers' own recipes (docs/peers.md), like
"loss-aware"."""


def make_row(name: str, method: str, *, reduction: float | None = None, target_params: int | None = None,
             compression: dict[str, Any] | None = None, finetune: bool = True,
             quantization: QuantizationConfig | None = None, paper: PaperResult | None = None,
             description: str = "", notes: tuple[str, ...] = (), vmeanba: VMeanbaConfig | None = None,
             pruning: PruningConfig | None = None) -> Experiment:
    """A registry row named ``TABLE/ARCH/VARIANT``.

    Args:
        method: "baseline" (no compression) or a key of :data:`METHODS` whose settings ``compression`` extends; any
            other name extends the paper's recipe (``RECIPES["paper"]``).
        reduction / target_params: the full-scale budget. The smoke scale removes the same *fraction* of its stand-in
            (an absolute target becomes ``1 - target / timm count``).
        finetune: run the partial fine-tune after compression.
        quantization: post-training quantization after fine-tuning.
        vmeanba: VMeanba before any low-rank step (vision state-space models), its impact scores over the scale's
            calibration images; with ``method="vmeanba"`` alone (no low-rank step, no fine-tune), else the row's
            method becomes ``"vmeanba+METHOD"``.
        pruning: unstructured magnitude pruning of the block linear weights (after VMeanba, when both), the same
            at both scales; only with ``method="prune"`` (no low-rank step, no fine-tune: the low-rank step would
            replace the pruned weights by dense factors), which becomes ``"vmeanba+prune"`` with ``vmeanba``.
    """
    if (pruning is None) != (method != "prune"):
        raise ValueError(f"{name}: pruning=PruningConfig(...) goes with method='prune' and only with it "
                         f"(got method={method!r}, pruning={pruning!r})")
    table, arch_key, _ = name.split("/")
    paper = paper or PaperResult()
    arch = ARCHS[arch_key]
    # a variant not named in METHODS (the ablations, Table 1's Z kinds) varies the paper's recipe
    settings = {**METHODS.get(method, RECIPES["paper"]), **(compression or {})}
    if method in ("baseline", "vmeanba", "prune"):
        full_c = smoke_c = None
        fraction = None
    else:
        fraction = reduction if reduction is not None else 1.0 - target_params / arch.params
        full_c = CompressionConfig(reduction=reduction, target_params=target_params, calib_samples=FULL_CALIB,
                                   **settings)
        smoke_c = CompressionConfig(reduction=round(fraction, 6), calib_samples=SMOKE_CALIB, **settings)
    full = RunConfig(
        scale="full", model=ModelConfig("timm", arch.timm_name, pretrained=True),
        data=DataConfig(name="imagenet-1k", calib_samples=FULL_CALIB, batch_size=FULL_FINETUNE.batch_size,
                        num_workers=8),
        compression=full_c, finetune=FULL_FINETUNE if finetune and full_c else None, quantization=quantization,
        hardware=HardwareConfig("gpu", devices=arch.gpus),
        vmeanba=None if vmeanba is None else replace(vmeanba, calib_samples=FULL_CALIB), pruning=pruning)
    smoke = RunConfig(
        scale="smoke", model=ModelConfig("standin", arch_key, pretrained=True),
        data=DataConfig(name="mnist-5k", calib_samples=SMOKE_CALIB, batch_size=SMOKE_FINETUNE.batch_size),
        compression=smoke_c, finetune=SMOKE_FINETUNE if finetune and smoke_c else None, quantization=quantization,
        hardware=HardwareConfig("cpu", devices=1),
        vmeanba=None if vmeanba is None else replace(vmeanba, calib_samples=SMOKE_CALIB), pruning=pruning)
    if vmeanba is not None and method != "vmeanba":
        method = f"vmeanba+{method}"
    return Experiment(name=name, table=table, arch=arch_key, method=method, full=full, smoke=smoke, paper=paper,
                      reduction=reduction if reduction is not None else (None if fraction is None else fraction),
                      description=description, notes=notes, arch_label=arch.label)


def count_note(arch_key: str, reduction: float, paper_params_m: float, tolerance_m: float = 0.05) -> tuple[str, ...]:
    """A caveat when the paper's printed count is not ``(1 - reduction)`` of timm's model."""
    arch = ARCHS[arch_key]
    expected = (1.0 - reduction) * arch.params / 1e6
    if abs(expected - paper_params_m) <= tolerance_m:
        return ()
    return (f"the paper prints {paper_params_m:.1f}M, but {100 * reduction:.0f}% less than timm's "
            f"{arch.params / 1e6:.2f}M {arch.label} is {expected:.2f}M; we remove the stated fraction",)
