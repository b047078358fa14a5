"""Deliberate defects the test suite must catch: each mutant changes one line of the library, and the tests it names
must then fail.

    make mutants-listed                   # every mutant (12-15 minutes on 2 cores); exit status 1 if one survives
    python tools/mutants.py --only refit  # the mutants whose file or description contains "refit"
    python tools/mutants.py --list

Each mutant is applied, one at a time, to a copy of the working tree (tracked files and untracked ones git does not
ignore) in a temporary directory, never to the tree itself; the copy's tests run with this interpreter, so the
mutated package is the one they import (``python -m pytest`` puts the copy first on ``sys.path``). Before any mutant,
the tests they name run once unmutated: a suite that already fails says nothing about mutants.

Every mutant here once survived the whole fast suite or was chosen as a likely slip in the mathematics (a wrong side
of a damping, a missing square root, a label drawn by arg max instead of sampled); the tests that now catch it are
named beside it. ``tests/tools/test_mutants.py`` checks, in the fast suite, that each mutant still applies (its
original line exists exactly once), so the list cannot rot silently when the code changes. When the tests were
re-homed beside their subjects (tests/ mirrors the package), each mutant's list became every file its old file's tests
moved to, the mutated module's own test file first: a superset of the tests that caught it, and the runner stops at the
first failure.

Left out on purpose, as equivalent: dropping ``z_params`` from the marginal policy's Lagrangian cost
(``core/allocate.py``) gave the same allocations as the real cost on 1,050 random problems (three layers of different
shapes with Z, budgets across the feasible range): the slack filling and the exchange step that follow the bisection
undo it. And a zero quantization scale floored at 1e-12 instead of set to 1 (``nn/quantize.py``): the scale is zero
only for an all-zero channel, which both give back exactly.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    path: str
    """File of the library, relative to the repository."""
    before: str
    """Text that occurs exactly once in the file."""
    after: str
    """What replaces it."""
    tests: tuple[str, ...]
    """Test files (or node ids) that must fail."""
    why: str
    """The defect, in words."""
    slow: bool = False
    """The catching test is marked slow (runs in ``make test``, not in ``make test-fast``)."""


LS = "lowrank_vit/core/loss_aware_svd.py"
LA, AL, DE, RF = ("lowrank_vit/core/loss_aware.py", "lowrank_vit/core/allocate.py", "lowrank_vit/core/decompose.py",
                  "lowrank_vit/core/refit.py")
CA, CO, SC, FT = ("lowrank_vit/core/calibration.py", "lowrank_vit/methods/compensate.py",
                  "lowrank_vit/core/scaling.py", "lowrank_vit/stages/finetune.py")

MUTANTS: tuple[Mutant, ...] = (
    # the loss-aware statistics and decomposition
    Mutant(LA, "G.div_(with_grad * tokens)", "G.div_(produced * tokens)",
           ("tests/core/test_loss_aware.py", "tests/core/test_allocate.py", "tests/core/test_decompose.py",
            "tests/core/test_likelihood.py", "tests/core/test_loss_aware_svd.py", "tests/io/test_surgery.py",
            "tests/methods/test_decompositions.py", "tests/test_config.py", "tests/test_pipeline.py"),
           "G averaged over every image although only grad_images ran the backward"),
    Mutant(LA, "H.sub_(tokens * torch.outer(side_mean, side_mean))", "H.sub_(0 * torch.outer(side_mean, side_mean))",
           ("tests/core/test_loss_aware.py", "tests/core/test_allocate.py", "tests/core/test_decompose.py",
            "tests/core/test_likelihood.py", "tests/core/test_loss_aware_svd.py", "tests/io/test_surgery.py",
            "tests/methods/test_decompositions.py", "tests/test_config.py", "tests/test_pipeline.py"),
           "the centred Gram left uncentred"),
    Mutant(LS, "(grad_damping * trace / m) * (W @ W.T)", "(grad_damping * trace / k) * (W @ W.T)",
           ("tests/core/test_loss_aware_svd.py", "tests/core/test_allocate.py", "tests/core/test_decompose.py",
            "tests/core/test_likelihood.py", "tests/core/test_loss_aware.py", "tests/io/test_surgery.py",
            "tests/methods/test_decompositions.py", "tests/test_config.py", "tests/test_pipeline.py"),
           "the narrow-side shortcut damps the missing Gram relative to the wrong dimension"),
    Mutant(LS, "root = stats.loss_scale ** 0.5", "root = stats.loss_scale ** 0.25",
           ("tests/core/test_loss_aware_svd.py", "tests/core/test_allocate.py", "tests/core/test_decompose.py",
            "tests/core/test_likelihood.py", "tests/core/test_loss_aware.py", "tests/io/test_surgery.py",
            "tests/methods/test_decompositions.py", "tests/test_config.py", "tests/test_pipeline.py"),
           "energies not returned to the loss's units"),
    Mutant("lowrank_vit/core/likelihood.py",
           "return torch.multinomial(probs, 1, generator=generator).squeeze(1).to(output.device)",
           "return probs.argmax(1).to(output.device)",
           ("tests/core/test_likelihood.py", "tests/core/test_allocate.py", "tests/core/test_decompose.py",
            "tests/core/test_loss_aware.py", "tests/core/test_loss_aware_svd.py", "tests/io/test_surgery.py",
            "tests/methods/test_decompositions.py", "tests/test_config.py", "tests/test_pipeline.py"),
           "labels taken as the arg max instead of sampled: not the true Fisher"),
    Mutant(LA, "trace -= produced * tokens * float(mean @ mean)", "pass",
           ("tests/core/test_calibration.py", "tests/core/test_decompose.py", "tests/test_pipeline.py"),
           "tr(H) of an output-side layer left uncentred"),
    Mutant(LS, "return s * stats.loss_scale ** 0.5", "return s",
           ("tests/core/test_loss_aware_svd.py", "tests/core/test_allocate.py", "tests/core/test_decompose.py",
            "tests/core/test_likelihood.py", "tests/core/test_loss_aware.py", "tests/io/test_surgery.py",
            "tests/methods/test_decompositions.py", "tests/test_config.py", "tests/test_pipeline.py"),
           "the planning spectrum in other units than the decomposition's"),
    Mutant(LA, "mean = sums.token_sum / sums.rows", "mean = sums.token_sum / produced",
           ("tests/core/test_loss_aware.py", "tests/core/test_allocate.py", "tests/core/test_decompose.py",
            "tests/core/test_likelihood.py", "tests/core/test_loss_aware_svd.py", "tests/io/test_surgery.py",
            "tests/methods/test_decompositions.py", "tests/test_config.py", "tests/test_pipeline.py"),
           "the mean token divided by images instead of tokens"),
    Mutant("lowrank_vit/core/likelihood.py", "int(target.max()) >= output.shape[1]",
           "int(target.max()) > output.shape[1]",
           ("tests/core/test_likelihood.py", "tests/core/test_allocate.py", "tests/core/test_decompose.py",
            "tests/core/test_loss_aware.py", "tests/core/test_loss_aware_svd.py", "tests/io/test_surgery.py",
            "tests/methods/test_decompositions.py", "tests/test_config.py", "tests/test_pipeline.py"),
           "a given label equal to the number of classes let through to the loss"),
    Mutant(LA, "scale = energy / produced if energy > 0 else 1.0", "scale = energy * produced if energy > 0 else 1.0",
           ("tests/core/test_loss_aware.py", "tests/core/test_allocate.py", "tests/core/test_decompose.py",
            "tests/core/test_likelihood.py", "tests/core/test_loss_aware_svd.py", "tests/io/test_surgery.py",
            "tests/methods/test_decompositions.py", "tests/test_config.py", "tests/test_pipeline.py"),
           "the reported output errors scaled by the number of images squared"),
    # allocation
    Mutant(AL, "return (layer.loss(rank) - layer.loss(new)) / (layer.params(new) - layer.params(rank))",
           "return layer.loss(rank) - layer.loss(new)", ("tests/core/test_allocate.py", "tests/core/test_budget.py"),
           "the marginal policy's leftover budget handed back by energy, not energy per parameter"),
    Mutant("lowrank_vit/core/budget.py", "cheaper = max(0, (self.dense_params - self.z_params - 1) // self.rank_step)",
           "cheaper = max(0, (self.dense_params - self.z_params) // self.rank_step)",
           ("tests/core/test_budget.py", "tests/core/test_allocate.py"),
           "a factored layer allowed to cost as much as the dense one"),
    Mutant(AL, "candidate = (not overshoot_ok, layer.loss(new), layer.name)",
           "candidate = (not overshoot_ok, -layer.loss(new), layer.name)",
           ("tests/core/test_allocate.py", "tests/core/test_budget.py"),
           "Algorithm 1 cutting the layer that loses the most"),
    Mutant(AL, "if budget - total <= tolerance:", "if True:",
           ("tests/core/test_calibration.py", "tests/core/test_decompose.py", "tests/nn/test_factorized.py",
            "tests/test_pipeline.py", "tests/test_suite_hygiene.py"),
           "the exchange step never run: budgets missed by more than 0.1%"),
    Mutant(AL, "    return layer.loss(rank) - layer.loss(new)\n", "    return layer.loss(rank) + layer.loss(new)\n",
           ("tests/core/test_allocate.py", "tests/core/test_budget.py"),
           "Algorithm 1's top-up raising the layer that loses most, not that gains most"),
    Mutant(AL, "/ (layer.params(new) - layer.params(rank))", "/ (layer.params(new) + layer.params(rank))",
           ("tests/core/test_allocate.py", "tests/core/test_budget.py"),
           "the marginal top-up dividing a rank's gain by the layer's size, not its own"),
    Mutant(AL, "(up.loss(u) - up.loss(u + step))", "(up.loss(u) - up.loss(u - step))",
           ("tests/core/test_allocate.py", "tests/core/test_budget.py"),
           "the exchange step pricing a raise by the direction the layer already holds, not the next one"),
    Mutant(AL, "if r is None or r - step < 1:", "if r is None or r + step < 1:",
           ("tests/core/test_allocate.py", "tests/core/test_budget.py"),
           "the exchange step lowering a layer to rank 0"),
    Mutant(AL, "return target + (start - target) * math.exp(-step / gamma)",
           "return target + (start - target) * math.exp(-step / (2 * gamma))",
           ("tests/core/test_allocate.py", "tests/core/test_budget.py"),
           "eq. (9)'s schedule decaying at half the rate"),
    # decompositions, whitening, Z
    Mutant(DE, "return (tail / tail[0].clamp_min(torch.finfo(torch.float64).tiny)).clamp(0.0, 1.0)",
           "return (tail / tail[0].clamp_min(torch.finfo(torch.float64).tiny)).sqrt().clamp(0.0, 1.0)",
           ("tests/core/test_decompose.py",), "normalized energy losses square-rooted"),
    Mutant(DE, "H = H + damping * scale * eye", "H = H + damping * eye", ("tests/core/test_decompose.py",),
           "damping not relative to H's mean diagonal"),
    Mutant("lowrank_vit/nn/factorized.py", "return x.index_select(-1, self.rows) @ self.values",
           "return x.index_select(-1, self.rows) @ self.values * 0.99",
           ("tests/core/test_decompose.py", "tests/methods/test_compensate.py"),
           "a structured Z's forward 1% off its dense form"),
    Mutant(CO, "HR.pow(2) / torch.diagonal(H)", "HR.pow(4) / torch.diagonal(H)",
           ("tests/methods/test_compensate.py", "tests/core/test_decompose.py"),
           "the sparse Z's support ranked by the fourth power of the single-entry gains"),
    Mutant(CO, "root = s[:q].sqrt()", "root = s[:q].sqrt() * 1.01",
           ("tests/methods/test_compensate.py", "tests/core/test_decompose.py"),
           "the low-rank Z's factors 2% too large"),
    Mutant(CO, "return H, HR, HR.pow(2) / torch.diagonal(H).clamp_min(torch.finfo(torch.float64).tiny)[:, None]",
           "return H, HR, HR.abs() / torch.diagonal(H).clamp_min(torch.finfo(torch.float64).tiny)[:, None]",
           ("tests/methods/test_compensate.py", "tests/core/test_decompose.py"),
           "the sparse Z's support chosen by |HR| / H_ii, not (HR)^2 / H_ii"),
    Mutant(CO, "rows = torch.topk(gain.sum(dim=1), z_params // m).indices.sort().values",
           "rows = torch.topk(gain.sum(dim=0), z_params // m).indices.sort().values",
           ("tests/cli/test_compress.py", "tests/core/test_files.py", "tests/io/test_surgery.py",
            "tests/nn/test_factorized.py"),
           "the structured Z's rows ranked by column sums"),
    # the sequential refit
    Mutant(RF, "cross = cross - rows * torch.outer(mean_c, mean_d)",
           "cross = cross - rows * torch.outer(mean_c, mean_c)",
           ("tests/core/test_refit.py", "tests/io/test_surgery.py", "tests/test_config.py", "tests/test_pipeline.py"),
           "the cross Gram centred with the wrong stream's mean"),
    Mutant(RF, "return bias.double() + pair.mean_d @ weight - pair.mean_c @ fitted",
           "return bias.double() + pair.mean_c @ weight - pair.mean_c @ fitted",
           ("tests/core/test_refit.py", "tests/io/test_surgery.py", "tests/test_config.py", "tests/test_pipeline.py"),
           "the refitted bias using the compressed stream's mean on the dense side"),
    Mutant(RF, "return white.solve_gram(pair.cross.double().to(white.gram.device) + ridge)",
           "return white.solve_gram(pair.cross.double().to(white.gram.device))",
           ("tests/core/test_refit.py", "tests/io/test_surgery.py", "tests/test_config.py", "tests/test_pipeline.py"),
           "the ridge pulling toward zero instead of toward the dense weight"),
    Mutant(RF, "return isinstance(parent, nn.Sequential) and int(index_b) == int(index_a) + 1",
           "return isinstance(parent, nn.Sequential)",
           ("tests/core/test_refit.py", "tests/io/test_surgery.py", "tests/test_config.py", "tests/test_pipeline.py"),
           "a block's output fed to the next refitted block across a skipped one"),
    Mutant(RF, "return (*args, *call.args), dict(call.kwargs)", "return None",
           ("tests/core/test_refit.py", "tests/core/test_blockwise.py"),
           "a block replayed on its cached input without the rest of its call (EVA's rotary table)"),
    Mutant(RF, "inputs[name] = args[0].detach().clone()", "inputs[name] = args[0].detach()",
           ("tests/core/test_refit.py",),
           "the dense block's recorded layer input left to the block's later in-place changes"),
    Mutant(RF, "grad_range_gram=S @ stats.grad_range_gram @ S.T", "grad_range_gram=stats.grad_range_gram",
           ("tests/core/test_refit.py", "tests/io/test_surgery.py", "tests/test_config.py", "tests/test_pipeline.py"),
           "the input-side G not carried to W* = S W"),
    # calibration of the paper's recipe
    Mutant(CA, "xs = torch.mul(rows, weights.sqrt().to(product_dtype)[:, None, None],",
           "xs = torch.mul(rows, weights.to(product_dtype)[:, None, None],",
           ("tests/core/test_calibration.py", "tests/core/test_decompose.py", "tests/test_pipeline.py"),
           "eq. (5)'s image weights applied squared"),
    Mutant(CA, "sums.trace += float(weights @ squared_norms(x))", "sums.trace += float(squared_norms(x).sum())",
           ("tests/core/test_calibration.py", "tests/core/test_decompose.py", "tests/test_pipeline.py"),
           "tr(H) of an output-side layer unweighted"),
    Mutant(CA, "y = torch.sub(y, bias.to(y.dtype), out=out)", "y = y",
           ("tests/core/test_calibration.py", "tests/core/test_decompose.py", "tests/test_pipeline.py"),
           "the output energy ||X W|| measured with the bias"),
    Mutant(CA, "idx = torch.rand(batch, tokens, generator=generator).argsort(dim=1)[:, :take].to(x.device)",
           "idx = torch.arange(tokens).expand(batch, tokens)[:, :take].to(x.device)",
           ("tests/core/test_calibration.py", "tests/core/test_decompose.py", "tests/test_pipeline.py"),
           "the SGD solver keeping every image's first tokens instead of a random subset"),
    Mutant(CA, "c = max(trace - float(torch.diagonal(S).sum()), 0.0) / (k - rank) if rank < k else 0.0", "c = 0.0",
           ("tests/core/test_calibration.py", "tests/core/test_decompose.py", "tests/test_pipeline.py"),
           "the range Gram's complement left empty"),
    Mutant(CA, "return basis.quadratic(delta) / max(stats.num_images, 1)",
           "return basis.quadratic(delta) / max(stats.num_images + 1, 1)",
           ("tests/core/test_allocate.py", "tests/core/test_decompose.py", "tests/core/test_likelihood.py",
            "tests/core/test_loss_aware.py", "tests/core/test_loss_aware_svd.py", "tests/io/test_surgery.py",
            "tests/methods/test_decompositions.py", "tests/test_config.py", "tests/test_pipeline.py"),
           "eq. (5)'s mean over one image too many"),
    # comparison methods
    Mutant("lowrank_vit/core/fisher.py", "sums[name] += grad.detach().double().pow(2).sum(dim=0)",
           "sums[name] += grad.detach().double().abs().sum(dim=0)",
           ("tests/core/test_fisher.py", "tests/core/test_scaling.py", "tests/io/test_surgery.py",
            "tests/methods/test_comcat.py", "tests/methods/test_decompositions.py", "tests/nn/test_comcat.py",
            "tests/nn/test_quantize.py", "tests/test_pipeline.py"),
           "FWSVD's Fisher information from |g| instead of g^2"),
    Mutant(SC, "if alpha == 0:", "if alpha == 1:",
           ("tests/core/test_scaling.py", "tests/core/test_fisher.py", "tests/io/test_surgery.py",
            "tests/methods/test_comcat.py", "tests/methods/test_decompositions.py", "tests/nn/test_comcat.py",
            "tests/nn/test_quantize.py", "tests/test_pipeline.py"),
           "ASVD with alpha = 1 silently plain SVD"),
    Mutant(SC, "return normalized_scales(normalized_scales(row_fisher).sqrt())",
           "return normalized_scales(normalized_scales(row_fisher))",
           ("tests/core/test_scaling.py", "tests/core/test_fisher.py", "tests/io/test_surgery.py",
            "tests/methods/test_comcat.py", "tests/methods/test_decompositions.py", "tests/nn/test_comcat.py",
            "tests/nn/test_quantize.py", "tests/test_pipeline.py"),
           "FWSVD's row scales I_j instead of sqrt(I_j)"),
    Mutant(SC, "v = v.clamp_min(top * _SCALE_FLOOR)", "v = v.clamp_min(0.0)",
           ("tests/core/test_scaling.py", "tests/core/test_fisher.py", "tests/io/test_surgery.py",
            "tests/methods/test_comcat.py", "tests/methods/test_decompositions.py", "tests/nn/test_comcat.py",
            "tests/nn/test_quantize.py", "tests/test_pipeline.py"),
           "a dead row scaled by zero (its factors divide by it)"),
    Mutant("lowrank_vit/methods/comcat.py",
           "q = torch.cat([q, bias[rows][None, :]])  # the augmented row: b_Q W_K^T x_j survives the softmax",
           "q = torch.cat([q, 0 * bias[rows][None, :]])",
           ("tests/methods/test_comcat.py", "tests/methods/test_decompositions.py", "tests/core/test_fisher.py",
            "tests/core/test_scaling.py", "tests/io/test_surgery.py", "tests/nn/test_comcat.py",
            "tests/nn/test_quantize.py", "tests/test_pipeline.py"),
           "COMCAT dropping the query bias, which survives the softmax"),
    Mutant("lowrank_vit/methods/comcat.py",
           "out = out + proj.weight.detach().double() @ attn.qkv.bias.detach().double()[2 * attn_dim:]", "out = out",
           ("tests/methods/test_comcat.py", "tests/methods/test_decompositions.py", "tests/core/test_fisher.py",
            "tests/core/test_scaling.py", "tests/io/test_surgery.py", "tests/nn/test_comcat.py",
            "tests/nn/test_quantize.py", "tests/test_pipeline.py"),
           "COMCAT dropping the value bias folded into the output bias"),
    # quantization, checkpoints, surgery, budgets
    Mutant("lowrank_vit/nn/factorized.py", 'quantize_axes = {"G": 1, "Y": 0}', 'quantize_axes = {"G": 0, "Y": 0}',
           ("tests/nn/test_quantize.py",), "a low-rank Z's G quantized per input row instead of per output column"),
    Mutant("lowrank_vit/nn/factorized.py", 'quantize_axes = {"values": 1}',
           'quantize_axes = {"values": 0}', ("tests/nn/test_quantize.py",),
           "a structured Z's values quantized per kept row instead of per output column"),
    Mutant("lowrank_vit/nn/quantize.py", "if not 2 <= bits <= 16:", "if not 2 <= bits < 16:",
           ("tests/nn/test_quantize.py",), "16-bit quantization refused"),
    Mutant("lowrank_vit/nn/quantize.py", "found[prefix + leaf] = (getattr(module, leaf), 0)",
           "found[prefix + leaf] = (getattr(module, leaf), 1)", ("tests/nn/test_quantize.py",),
           "COMCAT's head factors quantized per input column instead of per output row"),
    Mutant("lowrank_vit/nn/quantize.py", 'found[prefix + "weight"] = (module.weight, 0)',
           'found[prefix + "weight"] = (module.weight, 1)', ("tests/nn/test_quantize.py",),
           "dense weights quantized per input column instead of per output channel"),
    Mutant("lowrank_vit/nn/quantize.py", "zero_point = torch.round(-lo / scale)",
           "zero_point = torch.floor(-lo / scale)",
           ("tests/nn/test_quantize.py", "tests/nn/test_comcat.py", "tests/core/test_fisher.py",
            "tests/core/test_scaling.py", "tests/io/test_surgery.py", "tests/methods/test_comcat.py",
            "tests/methods/test_decompositions.py", "tests/test_pipeline.py"),
           "eq. (16)'s zero point floored"),
    Mutant("lowrank_vit/nn/quantize.py",
           'total_bits += param.numel() * record[name]["bits"] + channels * 2 * 16',
           'total_bits += param.numel() * record[name]["bits"]', ("tests/nn/test_quantize.py",),
           "Table 4's size without the per-channel scales and zero points"),
    Mutant("lowrank_vit/nn/quantize.py", 'found[prefix + "V"] = (module.V, 0)', 'found[prefix + "V"] = (module.V, 1)',
           ("tests/nn/test_quantize.py",), "V quantized per rank instead of per output channel"),
    Mutant("lowrank_vit/io/surgery.py",
           "V = torch.cat([layer.V.detach(), Y.detach().to(layer.V.dtype)], dim=1)",
           "V = torch.cat([layer.V.detach(), -Y.detach().to(layer.V.dtype)], dim=1)",
           ("tests/io/test_surgery.py", "tests/cli/test_compress.py", "tests/core/test_files.py",
            "tests/nn/test_factorized.py"),
           "folding Z into U, V with the wrong sign"),
    Mutant("lowrank_vit/pipeline.py", "replaced = sum(layer.weight.numel() for layer in layers.values())",
           "replaced = sum(layer.weight.numel() for layer in list(layers.values())[1:])",
           ("tests/test_pipeline.py", "tests/core/test_allocate.py", "tests/core/test_decompose.py",
            "tests/core/test_likelihood.py", "tests/core/test_loss_aware.py", "tests/core/test_loss_aware_svd.py",
            "tests/io/test_surgery.py", "tests/methods/test_decompositions.py", "tests/test_config.py"),
           "the budget forgetting one compressed layer"),
    Mutant("lowrank_vit/pipeline.py",
           "return get_policy(cfg.allocation).run(budgets, setup.budget, cfg, int(0.0005 * setup.target_total), probe)",
           "return get_policy(cfg.allocation).run(budgets, setup.budget, cfg, int(0.005 * setup.target_total), probe)",
           ("tests/test_pipeline.py", "tests/core/test_calibration.py", "tests/core/test_decompose.py",
            "tests/nn/test_factorized.py", "tests/test_suite_hygiene.py"),
           "a budget tolerance of 0.5% instead of 0.05%"),
    Mutant("lowrank_vit/pipeline.py",
           "params_after = setup.params_before - setup.replaced_params + setup.fixed_params + allocation.params",
           "params_after = setup.params_before - setup.replaced_params + allocation.params",
           ("tests/test_pipeline.py", "tests/core/test_fisher.py", "tests/core/test_scaling.py",
            "tests/io/test_surgery.py", "tests/methods/test_comcat.py", "tests/methods/test_decompositions.py",
            "tests/nn/test_comcat.py", "tests/nn/test_quantize.py"),
           "the plan's count forgetting COMCAT's fixed parameters"),
    # recipes and the paper's rows
    Mutant("lowrank_vit/config.py",
           '"paper": dict(decomposition="whitened", allocation="greedy", compensation="lowrank"),',
           '"paper": dict(decomposition="whitened", allocation="marginal", compensation="lowrank"),',
           ("tests/cli/test_compress.py", "tests/core/test_files.py", "tests/io/test_surgery.py",
            "tests/nn/test_factorized.py", "tests/experiments/test_compare.py", "tests/experiments/test_paper.py",
            "tests/experiments/test_rows.py", "tests/experiments/test_ssm.py", "tests/repro/test_registry.py",
            "tests/repro/test_rows.py"),
           "the paper's recipe without Algorithm 1"),
    Mutant("lowrank_vit/config.py",
           '"vanilla": dict(decomposition="plain", allocation="uniform", compensation="none"),',
           '"vanilla": dict(decomposition="plain", allocation="greedy", compensation="none"),',
           ("tests/experiments/test_compare.py", "tests/experiments/test_paper.py", "tests/experiments/test_rows.py",
            "tests/experiments/test_ssm.py", "tests/repro/test_registry.py", "tests/repro/test_rows.py"),
           "vanilla SVD with mixed ranks"),
    Mutant("lowrank_vit/config.py", "z_fraction: float = 0.05", "z_fraction: float = 0.04",
           ("tests/core/test_calibration.py", "tests/core/test_decompose.py", "tests/nn/test_factorized.py",
            "tests/test_pipeline.py", "tests/test_suite_hygiene.py", "tests/experiments/test_compare.py",
            "tests/experiments/test_paper.py", "tests/experiments/test_rows.py", "tests/experiments/test_ssm.py",
            "tests/repro/test_registry.py", "tests/repro/test_rows.py"),
           "Z of 4% instead of the paper's 5%"),
    Mutant("lowrank_vit/core/allocate.py", '    gamma: float = 80.0\n    """Decay',
           '    gamma: float = 60.0\n    """Decay',
           ("tests/experiments/test_compare.py", "tests/experiments/test_paper.py", "tests/experiments/test_rows.py",
            "tests/experiments/test_ssm.py", "tests/repro/test_registry.py", "tests/repro/test_rows.py"),
           "eq. (9)'s gamma of 60 instead of the paper's 80"),
    Mutant("lowrank_vit/core/common.py", '"> 0": lambda v: v > 0,', '"> 0": lambda v: v >= 0,',
           ("tests/core/test_allocate.py", "tests/core/test_calibration.py", "tests/core/test_decompose.py",
            "tests/methods/test_compensate.py", "tests/nn/test_adapters.py", "tests/test_config.py",
            "tests/test_pipeline.py"),
           "gamma or sgd_lr of 0 accepted (eq. 9 divides by gamma)"),
    # the partial fine-tune
    Mutant(FT, 'if leaf == "bias" or leaf.endswith("_bias"):', 'if leaf == "bias":',
           ("tests/stages/test_finetune.py", "tests/stages/test_finetune_config.py",
            "tests/stages/test_logging_utils.py"),
           "separate attention biases (q_bias) frozen"),
    Mutant(FT, 'groups["norm"].update(id(p) for p in module.parameters(recurse=False))', "pass",
           ("tests/stages/test_finetune.py", "tests/stages/test_finetune_config.py",
            "tests/stages/test_logging_utils.py"),
           "norms frozen"),
    Mutant(FT, 'groups["patch_embed"].update(id(p) for p in patch_embed.parameters())', "pass",
           ("tests/stages/test_finetune.py", "tests/stages/test_finetune_config.py",
            "tests/stages/test_logging_utils.py"),
           "the patch embedding frozen"),
    # data and the commands for one's own model
    Mutant("lowrank_vit/stages/data_transforms.py",
           'keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")',
           'keys = ("input_size", "interpolation", "mean", "std", "crop_mode")',
           ("tests/stages/test_data.py", "tests/cli/test_args.py", "tests/cli/test_base.py",
            "tests/cli/test_compress.py", "tests/cli/test_data.py", "tests/cli/test_finetune.py",
            "tests/cli/test_outputs.py", "tests/cli/test_preprocessing.py", "tests/cli/test_sources.py",
            "tests/core/test_files.py", "tests/io/test_export.py", "tests/io/test_modelcard.py",
            "tests/repro/test_models.py"),
           "the model's crop_pct ignored by the evaluation transform"),
    Mutant("lowrank_vit/stages/data_readers.py", "held = torch.round(counts.double() * val_fraction).long()",
           "held = torch.floor(counts.double() * val_fraction).long()",
           ("tests/stages/test_data_readers.py", "tests/stages/test_data.py", "tests/stages/test_data_config.py",
            "tests/stages/test_data_transforms.py"),
           "a stratified split holding out too few items of small classes"),
    Mutant("lowrank_vit/stages/data_transforms.py",
           "array = np.clip(array * 255.0 if array.max() <= 1.0 else array, 0, 255).astype(np.uint8)",
           "array = np.clip(array, 0, 255).astype(np.uint8)",
           ("tests/stages/test_data_transforms.py", "tests/stages/test_data.py", "tests/stages/test_data_config.py",
            "tests/stages/test_data_readers.py"),
           "float images in [0, 1] truncated to black"),
    Mutant("lowrank_vit/io/surgery.py", '    if plan.get("version") != FORMAT_VERSION:', "    if False:",
           ("tests/io/test_surgery.py", "tests/cli/test_compress.py", "tests/core/test_files.py",
            "tests/nn/test_factorized.py"),
           "a checkpoint of an unknown format version read as if it were this one"),
    Mutant("lowrank_vit/cli/outputs.py", "    if not (out / PLAN_FILE).is_file():\n        raise UserError(",
           "    if False:\n        raise UserError(",
           ("tests/cli/test_outputs.py", "tests/cli/test_args.py", "tests/cli/test_base.py",
            "tests/cli/test_compress.py", "tests/cli/test_data.py", "tests/cli/test_finetune.py",
            "tests/cli/test_preprocessing.py", "tests/cli/test_sources.py", "tests/core/test_files.py",
            "tests/io/test_export.py", "tests/io/test_modelcard.py", "tests/repro/test_models.py",
            "tests/stages/test_data.py"),
           "--force replacing a directory of the user's own files", slow=True),
    Mutant("lowrank_vit/cli/outputs.py", "    if o == p:", "    if False:",
           ("tests/cli/test_outputs.py", "tests/cli/test_args.py", "tests/cli/test_base.py",
            "tests/cli/test_compress.py", "tests/cli/test_data.py", "tests/cli/test_finetune.py",
            "tests/cli/test_preprocessing.py", "tests/cli/test_sources.py", "tests/core/test_files.py",
            "tests/io/test_export.py", "tests/io/test_modelcard.py", "tests/repro/test_models.py",
            "tests/stages/test_data.py"),
           "finetune allowed to write over its input", slow=True),
    Mutant("lowrank_vit/cli/outputs.py", "    if p in o.parents:", "    if False:",
           ("tests/cli/test_outputs.py", "tests/cli/test_args.py", "tests/cli/test_base.py",
            "tests/cli/test_compress.py", "tests/cli/test_data.py", "tests/cli/test_finetune.py",
            "tests/cli/test_preprocessing.py", "tests/cli/test_sources.py", "tests/core/test_files.py",
            "tests/io/test_export.py", "tests/io/test_modelcard.py", "tests/repro/test_models.py",
            "tests/stages/test_data.py"),
           "finetune allowed to write inside its input"),
    Mutant("lowrank_vit/cli/outputs.py", "    if others:", "    if False:",
           ("tests/cli/test_outputs.py", "tests/cli/test_args.py", "tests/cli/test_base.py",
            "tests/cli/test_compress.py", "tests/cli/test_data.py", "tests/cli/test_finetune.py",
            "tests/cli/test_preprocessing.py", "tests/cli/test_sources.py", "tests/core/test_files.py",
            "tests/io/test_export.py", "tests/io/test_modelcard.py", "tests/repro/test_models.py",
            "tests/stages/test_data.py"),
           "--force deleting the user's files kept beside a model"),
    Mutant("lowrank_vit/cli/outputs.py", "        if old is not None:\n            os.replace(old, out)\n",
           "        if False:\n            os.replace(old, out)\n",
           ("tests/cli/test_outputs.py", "tests/cli/test_args.py", "tests/cli/test_base.py",
            "tests/cli/test_compress.py", "tests/cli/test_data.py", "tests/cli/test_finetune.py",
            "tests/cli/test_preprocessing.py", "tests/cli/test_sources.py", "tests/core/test_files.py",
            "tests/io/test_export.py", "tests/io/test_modelcard.py", "tests/repro/test_models.py",
            "tests/stages/test_data.py"),
           "a failed final rename leaving the user's previous model under a hidden name"),
    Mutant("lowrank_vit/cli/outputs.py", '        raise UserError(f"--output {str(out)!r} is a file")',
           "        pass",
           ("tests/cli/test_outputs.py", "tests/cli/test_args.py", "tests/cli/test_base.py",
            "tests/cli/test_compress.py", "tests/cli/test_data.py", "tests/cli/test_finetune.py",
            "tests/cli/test_preprocessing.py", "tests/cli/test_sources.py", "tests/core/test_files.py",
            "tests/io/test_export.py", "tests/io/test_modelcard.py", "tests/repro/test_models.py",
            "tests/stages/test_data.py"),
           "an --output that is the user's file moved aside by publish"),
    Mutant("lowrank_vit/core/files.py", "        return value if math.isfinite(value) else None",
           "        return value",
           ("tests/core/test_files.py", "tests/cli/test_args.py", "tests/cli/test_base.py",
            "tests/cli/test_compress.py", "tests/cli/test_data.py", "tests/cli/test_finetune.py",
            "tests/cli/test_outputs.py", "tests/cli/test_preprocessing.py", "tests/cli/test_sources.py",
            "tests/io/test_export.py", "tests/io/test_modelcard.py", "tests/repro/test_models.py",
            "tests/stages/test_data.py"),
           "reports written with a bare NaN (not JSON)"),
    Mutant("lowrank_vit/cli/finetune.py", "        if differ:", "        if False:",
           ("tests/cli/test_finetune.py", "tests/cli/test_args.py", "tests/cli/test_base.py",
            "tests/cli/test_compress.py", "tests/cli/test_data.py", "tests/cli/test_outputs.py",
            "tests/cli/test_preprocessing.py", "tests/cli/test_sources.py", "tests/core/test_files.py",
            "tests/io/test_export.py", "tests/io/test_modelcard.py", "tests/repro/test_models.py",
            "tests/stages/test_data.py"),
           "a fine-tune resuming the checkpoints of another run"),
    Mutant("lowrank_vit/cli/preprocessing.py",
           "    pre = resolve_preprocessing(source.model, overrides={**carried, **user})",
           "    pre = resolve_preprocessing(source.model, overrides={**user, **carried})",
           ("tests/cli/test_preprocessing.py", "tests/cli/test_args.py", "tests/cli/test_base.py",
            "tests/cli/test_compress.py", "tests/cli/test_data.py", "tests/cli/test_finetune.py",
            "tests/cli/test_outputs.py", "tests/cli/test_sources.py", "tests/core/test_files.py",
            "tests/io/test_export.py", "tests/io/test_modelcard.py", "tests/repro/test_models.py",
            "tests/stages/test_data.py"),
           "what the weights carry winning over the user's flags"),
    Mutant("lowrank_vit/repro/rows.py", "    if dense_top1 >= BASELINE_GUARD_FRACTION * top1:",
           "    if dense_top1 >= 0.1 * top1:",
           ("tests/repro/test_rows.py", "tests/repro/test_registry.py", "tests/repro/test_runner.py"),
           "the dense-baseline guard at a tenth of the paper's top-1 instead of half"),
    Mutant("lowrank_vit/repro/overrides.py", "        if len(path) > 2:  # into a dict field",
           "        if False:  # into a dict field",
           ("tests/repro/test_overrides.py", "tests/repro/test_demo.py", "tests/repro/test_models.py",
            "tests/repro/test_planning.py", "tests/repro/test_rows.py", "tests/repro/test_tables.py",
            "tests/cli/test_main.py", "tests/core/test_allocate.py", "tests/stages/test_data.py",
            "tests/test_docs.py"),
           "--set into one key of a mapping (model.kwargs.img_size=32) refused, and into a number accepted"),
    Mutant("lowrank_vit/io/export.py",
           "        off = ((q.dequantize() - weight).abs() / q.scale.reshape(shape)).max().item()", "        off = 0.0",
           ("tests/io/test_export.py", "tests/benchmarks/test_inference.py"),
           "the QDQ export not checking the codes reproduce the weights"),
    Mutant("lowrank_vit/nn/quantize.py", "        lo, hi = t.min().clamp(max=0.0), t.max().clamp(min=0.0)",
           "        lo, hi = t.min(), t.max()", ("tests/nn/test_quantize.py",),
           "a one-signed tensor's zero point outside the uint8 codes"),
    # BEiT, EVA-02 and Swin V2; the fine-tune's precision; the rehearsal's accelerator
    Mutant("lowrank_vit/nn/adapters.py", "                attn.qkv_bias_separate = True",
           "                attn.qkv_bias_separate = False",
           ("tests/nn/test_adapters.py", "tests/core/test_loss_aware.py", "tests/test_pipeline.py"),
           "BEiT, EVA-02 and Swin V2 attention left reading qkv.weight past the module"),
    Mutant("lowrank_vit/pipeline.py", "            attn.qkv_bias_separate = False", "            pass",
           ("tests/test_pipeline.py", "tests/core/test_loss_aware.py", "tests/nn/test_adapters.py"),
           "plan_compression leaving the attention switched"),
    Mutant(LA, "grad.to(module.weight.dtype) @ module.weight.detach())",
           "grad.to(module.weight.dtype) @ module.weight.detach().abs())",
           ("tests/core/test_loss_aware.py", "tests/nn/test_adapters.py", "tests/test_pipeline.py"),
           "the output-gradient fallback forming g |W| instead of g W"),
    Mutant(LA, "grads.trace += _energy(grad)\n", "grads.trace += 2 * _energy(grad)\n",
           ("tests/core/test_loss_aware.py", "tests/nn/test_adapters.py", "tests/test_pipeline.py"),
           "the output-gradient fallback's tr(G) doubled"),
    Mutant(LA, "    produced, with_grad = _run_pass(model, layers, stream, acc, settings, backward_hooks)\n"
               "    _raise_if_nonfinite(acc)  # a NaN or inf that starts after the first micro-batch\n",
           "    produced, with_grad = _run_pass(model, layers, stream, acc, settings, backward_hooks)\n",
           ("tests/core/test_loss_aware.py", "tests/core/test_allocate.py", "tests/core/test_decompose.py",
            "tests/core/test_likelihood.py", "tests/core/test_loss_aware_svd.py", "tests/io/test_surgery.py",
            "tests/methods/test_decompositions.py", "tests/test_config.py", "tests/test_pipeline.py"),
           "a NaN that starts after the first micro-batch reaching the statistics"),
    Mutant(FT, "precision=cfg.precision, accelerator=accelerator", 'precision="32-true", accelerator=accelerator',
           ("tests/stages/test_finetune.py", "tests/stages/test_finetune_config.py",
            "tests/stages/test_logging_utils.py"),
           "finetune.precision never reaching the Trainer"),
    Mutant("lowrank_vit/repro/rehearse.py", 'line.get("accelerator", "cpu")', 'line.get("accelerator")',
           ("tests/repro/test_rehearse.py",), "rehearsal records from before --accelerator no longer resumed"),
    # distillation from the dense model in the fine-tune
    Mutant(FT, "nn.functional.kl_div(log_student, log_teacher, log_target=True",
           "nn.functional.kl_div(log_teacher, log_student, log_target=True",
           ("tests/stages/test_finetune.py", "tests/stages/test_finetune_config.py",
            "tests/stages/test_logging_utils.py"),
           "the distillation KL taken the other way round, KL(student || teacher)"),
    Mutant(FT, 'reduction="batchmean") * (t * t)', 'reduction="batchmean")',
           ("tests/stages/test_finetune.py", "tests/stages/test_finetune_config.py",
            "tests/stages/test_logging_utils.py"),
           "the distillation term without its T² (its gradient shrinking as 1/T)"),
    Mutant(FT, "    return distillation if weight == 1 else (1 - weight) * cross_entropy + weight * distillation",
           "    return distillation if weight == 1 else cross_entropy + weight * distillation",
           ("tests/stages/test_finetune.py", "tests/stages/test_finetune_config.py",
            "tests/stages/test_logging_utils.py"),
           "the cross-entropy not weighted down by 1 - distill"),
    Mutant("lowrank_vit/repro/runner.py", "    teacher = copy.deepcopy(row.model).eval() if cfg.finetune is not None",
           "    teacher = row.model if cfg.finetune is not None",
           ("tests/repro/test_runner.py", "tests/repro/test_ddp.py", "tests/repro/test_planning.py",
            "tests/repro/test_rows.py", "tests/cli/test_main.py"),
           "a row distilling from its own compressed model instead of the dense one"),
    Mutant(FT, "        if train_factors and isinstance(module, (FactorizedLinear, nn.Linear)):",
           "        if train_factors and isinstance(module, FactorizedLinear):",
           ("tests/stages/test_finetune.py", "tests/stages/test_finetune_config.py",
            "tests/stages/test_logging_utils.py"),
           "train_factors leaving the linear layers kept dense frozen"),
    Mutant("lowrank_vit/cli/sources.py",
           "        if not path.is_file() or checkpoint_digest(path) != record.get(\"checkpoint_sha256\"):",
           "        if not path.is_file():",
           ("tests/cli/test_sources.py", "tests/cli/test_args.py", "tests/cli/test_base.py",
            "tests/cli/test_compress.py", "tests/cli/test_data.py", "tests/cli/test_finetune.py",
            "tests/cli/test_outputs.py", "tests/cli/test_preprocessing.py", "tests/core/test_files.py",
            "tests/io/test_export.py", "tests/io/test_modelcard.py", "tests/repro/test_models.py",
            "tests/stages/test_data.py"),
           "finetune --distill rebuilding the teacher from a checkpoint that changed since compress read it",
           slow=True),
    # the layer-wise SGD solver under DDP
    Mutant("lowrank_vit/stages/lightning_compensation.py", 'losses = strategy.reduce(losses, reduce_op="sum")',
           'losses = strategy.reduce(losses, reduce_op="mean")', ("tests/stages/test_lightning_compensation.py",),
           "each layer's loss halved across two ranks", slow=True),
    Mutant("lowrank_vit/stages/lightning_compensation.py", "torch.distributed.broadcast(tensor.data, src=i % world)",
           "torch.distributed.broadcast(tensor.data, src=0)", ("tests/stages/test_lightning_compensation.py",),
           "every layer's Z taken from rank 0, which trained only half of them", slow=True),
    Mutant(AL, "curve = layers[i].energy_losses.detach().double()[1: tops[i] + 1]",
           "curve = layers[i].energy_losses.detach().double()[0: tops[i]]",
           ("tests/core/test_allocate.py", "tests/core/test_budget.py"),
           "the marginal policy's table pairing each rank's cost with the loss of one rank less (an off-by-one)"),
    Mutant("lowrank_vit/io/surgery.py",
           "        return FactorizedLinear.from_factors(U, V, None if layer.bias is None else layer.bias.detach())",
           "        return FactorizedLinear.from_factors(U, V, None if layer.bias is None else 0 * layer.bias)",
           ("tests/io/test_surgery.py", "tests/io/test_export.py", "tests/cli/test_compress.py",
            "tests/core/test_files.py", "tests/nn/test_factorized.py", "tests/benchmarks/test_inference.py"),
           "folding a low-rank Z (and export --fold) writing zero biases: every fixture's biases were zero before"),
    Mutant(FT, "        self.model.train()\n\n    def on_validation_start(self) -> None:",
           "        pass\n\n    def on_validation_start(self) -> None:",
           ("tests/stages/test_finetune.py", "tests/stages/test_finetune_config.py",
            "tests/stages/test_logging_utils.py"),
           "a model handed over in eval mode fine-tuned in eval mode (no dropout or drop-path)"),
    Mutant("lowrank_vit/io/surgery.py", "return sum(t.numel() * t.element_size() for t",
           "return sum(t.numel() * 4 for t",
           ("tests/io/test_export.py", "tests/io/test_modelcard.py", "tests/cli/test_args.py",
            "tests/cli/test_base.py", "tests/cli/test_compress.py", "tests/cli/test_data.py",
            "tests/cli/test_finetune.py", "tests/cli/test_outputs.py", "tests/cli/test_preprocessing.py",
            "tests/cli/test_sources.py", "tests/core/test_files.py", "tests/repro/test_models.py",
            "tests/stages/test_data.py"),
           "the size compress and evaluate report counting each stored tensor as float32 (8-bit codes, int64 indices)"),
    # the peers (docs/peers.md)
    Mutant("lowrank_vit/core/covariance.py", "spread = (fourth_sum / count - frob) / (p * count)",
           "spread = (fourth_sum / count - frob) / p",
           ("tests/core/test_covariance.py", "tests/core/test_probe.py", "tests/core/test_refit.py",
            "tests/core/test_search.py", "tests/methods/test_decompositions.py", "tests/test_config.py",
            "tests/test_pipeline.py"),
           "the Ledoit-Wolf variance estimate not divided by the sample count (shrinking far too much)"),
    Mutant("lowrank_vit/core/covariance.py", "mu = float(torch.diagonal(S).mean())",
           "mu = float(torch.diagonal(S).sum())",
           ("tests/core/test_covariance.py", "tests/core/test_probe.py", "tests/core/test_refit.py",
            "tests/core/test_search.py", "tests/methods/test_decompositions.py", "tests/test_config.py",
            "tests/test_pipeline.py"),
           "shrinkage toward the trace instead of the mean eigenvalue"),
    Mutant("lowrank_vit/core/covariance.py", "live = norms > floor", "live = norms >= 0",
           ("tests/core/test_covariance.py", "tests/core/test_probe.py", "tests/core/test_refit.py",
            "tests/core/test_search.py", "tests/methods/test_decompositions.py", "tests/test_config.py",
            "tests/test_pipeline.py"),
           "vanished token gradients counted in the mean norm and rescaled"),
    Mutant("lowrank_vit/core/search.py", "        if result.x is None or not 0.0 < result.fun < 0.1:",
           "        if True:",
           ("tests/core/test_search.py", "tests/core/test_covariance.py", "tests/core/test_probe.py",
            "tests/core/test_refit.py", "tests/methods/test_decompositions.py", "tests/test_config.py",
            "tests/test_pipeline.py"),
           "the integer program accepted within HiGHS's absolute gap of the largest error, not solved exactly"),
    Mutant("lowrank_vit/core/search.py",
           "    return [1.0 - len(losses) * (1.0 - keep) * score / total for score in scores]",
           "    return [1.0 - (1.0 - keep) * score / total for score in scores]",
           ("tests/core/test_search.py", "tests/core/test_covariance.py", "tests/core/test_probe.py",
            "tests/core/test_refit.py", "tests/methods/test_decompositions.py", "tests/test_config.py",
            "tests/test_pipeline.py"),
           "SVD-LLM v2's ratios not scaled by the group's size (the group's mean compression lost)"),
    Mutant("lowrank_vit/methods/decompositions.py",
           "        return a / (1 - a), b / (1 - b), math.sqrt((1 - a) * (1 - b))",
           "        return b / (1 - b), a / (1 - a), math.sqrt((1 - a) * (1 - b))",
           ("tests/methods/test_decompositions.py", "tests/core/test_covariance.py", "tests/core/test_probe.py",
            "tests/core/test_refit.py", "tests/core/test_search.py", "tests/test_config.py", "tests/test_pipeline.py"),
           "KFAC-SVD's input and gradient shrinkage swapped"),
    Mutant("lowrank_vit/methods/decompositions.py",
           "    V = (torch.linalg.pinv(M, hermitian=True) @ (HU.T @ weight.double())).T",
           "    V = (torch.linalg.pinv(M, hermitian=True) @ (U.T @ weight.double())).T",
           ("tests/methods/test_decompositions.py", "tests/core/test_covariance.py", "tests/core/test_probe.py",
            "tests/core/test_refit.py", "tests/core/test_search.py", "tests/test_config.py", "tests/test_pipeline.py"),
           "SVD-LLM's update fitting W itself instead of its outputs on the compressed inputs"),
    Mutant("lowrank_vit/cli/data.py", 'augment=augment, mean=tuple(pre["mean"]), std=tuple(pre["std"]),',
           "augment=augment, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),",
           ("tests/cli/test_data.py", "tests/cli/test_args.py", "tests/cli/test_base.py",
            "tests/cli/test_compress.py", "tests/cli/test_finetune.py", "tests/cli/test_outputs.py",
            "tests/cli/test_preprocessing.py", "tests/cli/test_sources.py", "tests/core/test_files.py",
            "tests/io/test_export.py", "tests/io/test_modelcard.py", "tests/repro/test_models.py",
            "tests/stages/test_data.py"),
           "the user's --mean/--std printed and saved, the images normalized with other values (the audit's defect)"),
    Mutant("experiments/_rows.py", '    settings = {**METHODS.get(method, RECIPES["paper"]), **(compression or {})}',
           "    settings = {**METHODS.get(method, {}), **(compression or {})}",
           ("tests/experiments/test_compare.py", "tests/experiments/test_paper.py", "tests/experiments/test_rows.py",
            "tests/experiments/test_ssm.py", "tests/repro/test_registry.py", "tests/repro/test_rows.py"),
           "ablation rows compressing with the library's default instead of the paper's recipe they declare"),
    # the latency tables and the latency-aware allocation (issue: speed you can ship)
    Mutant("lowrank_vit/core/latency.py", "        return max(faster, default=0)",
           "        return min(faster, default=0)",
           ("tests/core/test_latency.py", "tests/cli/test_compress.py", "tests/cli/test_speed.py",
            "tests/speed/test_profile.py", "tests/speed/test_timing.py", "tests/test_config.py",
            "tests/test_pipeline.py"),
           "the break-even rank taken as the smallest faster rank, not the largest"),
    Mutant("lowrank_vit/core/latency.py",
           "max(0, table.shape_of(layer.name).break_even() - z_rank(layer))",
           "max(0, table.shape_of(layer.name).break_even())",
           ("tests/core/test_latency.py", "tests/cli/test_compress.py", "tests/cli/test_speed.py",
            "tests/speed/test_profile.py", "tests/speed/test_timing.py", "tests/test_config.py",
            "tests/test_pipeline.py"),
           "the rank cap ignoring the rank a folded low-rank Z adds"),
    Mutant("lowrank_vit/core/latency.py",
           "for options in choices], goal - fixed, resolution)",
           "for options in choices], goal, resolution)",
           ("tests/core/test_latency.py", "tests/cli/test_compress.py", "tests/cli/test_speed.py",
            "tests/speed/test_profile.py", "tests/speed/test_timing.py", "tests/test_config.py",
            "tests/test_pipeline.py"),
           "the latency budget forgetting the time outside the compressible layers"),
    Mutant("lowrank_vit/core/latency.py", "            new[better], choice[better] = candidate[better], index",
           "            new[better], choice[better] = candidate[better], 0",
           ("tests/core/test_latency.py", "tests/cli/test_compress.py", "tests/cli/test_speed.py",
            "tests/speed/test_profile.py", "tests/speed/test_timing.py", "tests/test_config.py",
            "tests/test_pipeline.py"),
           "the knapsack's backtracking recording the first option instead of the one that won"),
    Mutant("lowrank_vit/core/latency.py", "        for name, version in self.versions.items():",
           "        for name, version in {}.items():",
           ("tests/core/test_latency.py", "tests/cli/test_compress.py", "tests/cli/test_speed.py",
            "tests/speed/test_profile.py", "tests/speed/test_timing.py", "tests/test_config.py",
            "tests/test_pipeline.py"),
           "a table measured with other software versions used silently"),
    Mutant("lowrank_vit/pipeline.py", "    if table is not None and cfg.latency_limit:",
           "    if table is not None and not cfg.latency_limit:",
           ("tests/test_pipeline.py", "tests/cli/test_compress.py", "tests/cli/test_speed.py",
            "tests/core/test_latency.py", "tests/speed/test_profile.py", "tests/speed/test_timing.py",
            "tests/test_config.py"),
           "the latency cap applied when turned off, and not when asked for"),
    Mutant("lowrank_vit/speed/profile.py",
           "        lambda mod, inputs, _out, name=name: rows.__setitem__(name, inputs[0].numel() // mod.in_features))",
           "        lambda mod, inputs, _out, name=name: rows.__setitem__(name, inputs[0].shape[-2]))",
           ("tests/speed/test_profile.py", "tests/speed/test_timing.py", "tests/cli/test_compress.py",
            "tests/cli/test_speed.py", "tests/core/test_latency.py", "tests/test_config.py", "tests/test_pipeline.py"),
           "a layer profiled at one image's tokens instead of the batch's rows"),
    Mutant("lowrank_vit/speed/timing.py", "        for name in names[start:] + names[:start]:",
           "        for name in names:",
           ("tests/speed/test_timing.py", "tests/speed/test_profile.py", "tests/cli/test_compress.py",
            "tests/cli/test_speed.py", "tests/core/test_latency.py", "tests/test_config.py", "tests/test_pipeline.py"),
           "interleaved repeats always in the same order (the first candidate always after the last)"),
    # the distillation on augmented calibration images
    Mutant("lowrank_vit/core/distill.py", "    kept = math.isfinite(after) and after < before",
           "    kept = math.isfinite(after)",
           ("tests/core/test_distill.py", "tests/test_pipeline.py"),
           "a distillation that raised the loss on the calibration images kept instead of undone"),
    Mutant("lowrank_vit/core/distill.py", "(value * (len(part) / batch_size)).backward()",
           "value.backward()",
           ("tests/core/test_distill.py",),
           "each micro-batch's loss summed unweighted: the step's gradient grows with the number of micro-batches"),
    Mutant("lowrank_vit/core/distill.py",
           "feature_weight * relative_feature_error(own_features, dense_features)",
           "feature_weight * relative_feature_error(dense_features, dense_features)",
           ("tests/core/test_distill.py", "tests/test_pipeline.py"),
           "the blocks' feature term compares the dense features with themselves: it is zero and trains nothing"),
    Mutant("lowrank_vit/core/distill.py", "return shift_augment(x, generator, shift=max(1, min(x.shape[-2:]) // 8))",
           "return shift_augment(x, generator)",
           ("tests/core/test_distill.py",),
           "the \"shift\" augmentation not scaled to the image: 4 pixels on a 224-pixel image as on a 32-pixel one"),
)


def apply(text: str, mutant: Mutant) -> str:
    """``text`` with the mutant's one change; a ValueError if its original text is not there exactly once."""
    count = text.count(mutant.before)
    if count != 1:
        raise ValueError(f"{mutant.path}: the mutant's original text occurs {count} times: {mutant.before[:60]!r}")
    return text.replace(mutant.before, mutant.after)


def copy_tree(target: Path) -> None:
    """The working tree's tracked files and its untracked ones that git does not ignore."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)


def run_tests(copy: Path, tests: tuple[str, ...], slow: bool) -> tuple[bool, str]:
    """(passed, the last line pytest printed) of ``tests`` in the copy."""
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    marker = [] if slow else ["-m", "not slow"]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *marker, *tests],
                          cwd=copy, env=env, capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines() or proc.stderr.strip().splitlines() or [""]
    return proc.returncode == 0, lines[-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tools/mutants.py", description=__doc__.split("\n")[0])
    parser.add_argument("--only", default="", help="mutants whose file or description contains this text")
    parser.add_argument("--list", action="store_true", help="print the mutants and exit")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTANTS if args.only in m.path or args.only in m.why]
    if args.list:
        for m in chosen:
            print(f"{m.path}: {m.why} -> {', '.join(m.tests)}")
        return 0
    if not chosen:
        print(f"no mutant matches {args.only!r}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="lowrank_vit_mutants_") as tmp:
        copy = Path(tmp)
        copy_tree(copy)
        for slow in (False, True):
            tests = tuple(sorted({t for m in chosen if m.slow == slow for t in m.tests}))
            if tests:
                ok, last = run_tests(copy, tests, slow)
                if not ok:
                    print(f"the tests fail without any mutant ({last}): fix them first", file=sys.stderr)
                    return 2
        survivors = []
        for index, m in enumerate(chosen, 1):
            path = copy / m.path
            original = path.read_text()
            path.write_text(apply(original, m))
            start = time.perf_counter()
            try:
                passed, last = run_tests(copy, m.tests, m.slow)
            finally:
                path.write_text(original)
            verdict = "SURVIVED" if passed else "caught"
            print(f"[{index}/{len(chosen)}] {verdict:8s} {m.path}: {m.why} ({time.perf_counter() - start:.0f} s; "
                  f"{last})", flush=True)
            if passed:
                survivors.append(m)
    print(f"{len(chosen) - len(survivors)} of {len(chosen)} mutants caught", flush=True)
    return 1 if survivors else 0


if __name__ == "__main__":
    raise SystemExit(main())
