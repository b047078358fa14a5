"""Ablations the paper lacks: each changes one step of our method at equal parameters (DeiT-S and DeiT-B, -50%),
plus vanilla SVD + FT at the ratios where the paper gives no row."""

from __future__ import annotations

from lowrank_vit.repro.registry import register_experiment

from ._rows import make_row

ABLATION_ARCHS = ("deit_s", "deit_b")


@register_experiment
def decomposition():
    """plain vs mean (eq. 7 literally) vs whitened (exact eq. 5) at equal, uniform ranks; no Z, no fine-tune."""
    for arch in ABLATION_ARCHS:
        for kind in ("plain", "mean", "whitened"):
            yield make_row(f"ablation/{arch}/decomposition-{kind}-50", f"decomposition-{kind}", reduction=0.5,
                           finetune=False, compression=dict(decomposition=kind, allocation="uniform",
                                                            compensation="none"),
                           description=f"{kind} SVD, uniform ranks, no Z, no fine-tune")


@register_experiment
def solver():
    """Low-rank Z fitted by the paper's mini-batch gradient descent vs the closed form; no fine-tune."""
    for arch in ABLATION_ARCHS:
        for kind in ("closed_form", "sgd"):
            yield make_row(f"ablation/{arch}/solver-{kind.replace('_', '-')}-50", f"solver-{kind}", reduction=0.5,
                           finetune=False, compression=dict(solver=kind),
                           description=f"ours with Z from the {kind.replace('_', ' ')} solver, no fine-tune")


@register_experiment
def allocation():
    """Greedy (Algorithm 1) vs uniform ranks, with activation-aware and with plain spectra; no fine-tune."""
    for arch in ABLATION_ARCHS:
        for decomposition in ("whitened", "plain"):
            for kind in ("uniform", "greedy"):
                yield make_row(f"ablation/{arch}/allocation-{kind}-{decomposition}-50", f"allocation-{kind}",
                               reduction=0.5, finetune=False,
                               compression=dict(allocation=kind, decomposition=decomposition, compensation="none"),
                               description=f"{decomposition} SVD with {kind} ranks, no Z, no fine-tune")


@register_experiment
def compensation():
    """Z on vs the same parameters given to rank (compensation none at the same target); no fine-tune."""
    for arch in ABLATION_ARCHS:
        for kind, settings in (("on", {}), ("off", dict(compensation="none"))):
            yield make_row(f"ablation/{arch}/z-{kind}-50", f"z-{kind}", reduction=0.5, finetune=False,
                           compression=settings, description=f"ours with Z {kind}, no fine-tune")


@register_experiment
def paper_literal():
    """The paper's recipe as written (eq. 7 mean input, greedy, SGD-fitted G Y^T) with fine-tuning, beside ours."""
    for arch in ABLATION_ARCHS:
        yield make_row(f"ablation/{arch}/paper-literal-50", "paper-literal", reduction=0.5,
                       description="mean-input SVD (eq. 7), greedy ranks, G Y^T by SGD, partial fine-tune")


@register_experiment
def vanilla_ratios():
    """Vanilla SVD + FT where the paper has no row (the demo's comparison at -50% and -60%)."""
    for arch in ABLATION_ARCHS:
        for pct in (50, 60):
            yield make_row(f"ablation/{arch}/vanilla-svd-ft-{pct}", "vanilla", reduction=pct / 100,
                           description=f"plain SVD, uniform ranks, no Z, partial fine-tune, -{pct}%")


@register_experiment
def vanilla_table3():
    """Vanilla SVD + FT at Table 3's DeiT-S target (5.0M parameters, -77%): the demo's third method there."""
    from .paper import TABLE3

    for arch, target, params, _ in TABLE3:
        if arch == "deit_s":
            yield make_row(f"ablation/{arch}/vanilla-svd-ft-table3", "vanilla", target_params=target,
                           description=f"plain SVD, uniform ranks, no Z, partial fine-tune, {params}M parameters "
                                       "(Table 3's target)")
