"""Tests of lowrank_vit/core/refit.py."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn

from lowrank_vit import compress
from lowrank_vit.config import recipe
from lowrank_vit.core.calibration import LayerStats
from lowrank_vit.core.loss_aware_svd import loss_aware_svd
from lowrank_vit.core.refit import (
    PairGrams,
    anchored_weight,
    feedback_stats,
    feedback_transform,
    refit_bias,
    sequential_refit,
)
from lowrank_vit.nn.adapters import get_adapter, timm_with_our_models
from lowrank_vit.nn.factorized import FactorizedLinear
from tests.helpers import TINY_ARCHITECTURES as MODELS
from tests.helpers import labelled_batches, make_images, make_tiny_vit, randomize_affine_, refit_cfg


def factorized_inputs(model: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The input tokens every factorized layer of ``model`` sees on ``images`` (float64, flattened to rows)."""
    from lowrank_vit import FactorizedLinear

    inputs, handles = {}, []
    for name, module in model.named_modules():
        if isinstance(module, FactorizedLinear):
            handles.append(module.register_forward_hook(
                lambda _, args, __, name=name: inputs.__setitem__(name, args[0].detach().double().flatten(0, -2))))
    with torch.no_grad():
        model(images)
    for handle in handles:
        handle.remove()
    return inputs


def test_svd_llm_refit_is_the_least_squares_fit_to_each_layers_compressed_inputs():
    # SVD-LLM's update: for the inputs X_c the refitted model gives a layer, W_hat = U_r lstsq(X_c U_r, X_c W) with
    # U_r the input-side factor of the plain compression (same ranks); so it fits X_c W no worse than that one
    images, batches = labelled_batches()
    dense = dict(make_tiny_vit().named_modules())
    built = {}
    for refit in (True, False):
        model = make_tiny_vit()
        compress(model, batches, recipe("svd-llm", reduction=0.5, calib_samples=64, progress=False, refit=refit))
        built[refit] = model
    plain = dict(built[False].named_modules())
    inputs = factorized_inputs(built[True], images)
    assert inputs and inputs.keys() == factorized_inputs(built[False], images).keys()
    for name, X in inputs.items():
        refitted = dict(built[True].named_modules())[name]
        W = dense[name].weight.detach().double().T
        U = plain[name].U.detach().double()
        assert refitted.U.shape == U.shape  # the same rank
        expected = U @ torch.linalg.lstsq(X @ U, X @ W).solution
        fitted = refitted.dense_weight().detach().double()
        target = (X @ W).norm()
        assert float((X @ (fitted - expected)).norm() / target) < 1e-6, name
        refit_error = float((X @ (fitted - W)).norm() / target)
        plain_error = float((X @ (plain[name].dense_weight().detach().double() - W)).norm() / target)
        assert refit_error <= plain_error + 1e-6, name


def _objective(x_c, x_d, W, W_hat, G):
    E = x_c @ W_hat - x_d @ W
    return float(torch.trace(E @ G @ E.T))


@pytest.mark.parametrize("shape", [(6, 10), (10, 6)])  # the input side (qkv, fc1) and the output side (fc2)
def test_refit_minimizes_the_feedback_objective(shape):
    """W* = H_c^-1 K W decomposed on (H_c, G) is the best rank-r weight for tr((X_c W_hat - X W) G (...)^T): below
    the dense layer's own loss-aware factors and below random rank-r perturbations of itself."""
    k, m = shape
    g = torch.Generator().manual_seed(0)
    x_d = torch.randn(200, k, generator=g, dtype=torch.float64)
    x_c = x_d + 0.3 * torch.randn(200, k, generator=g, dtype=torch.float64)  # upstream errors
    W = torch.randn(k, m, generator=g, dtype=torch.float64)
    a = torch.randn(m, 2 * m, generator=g, dtype=torch.float64)
    G = a @ a.T / m
    rank, damping = 3, 1e-10
    pair = PairGrams(x_c.T @ x_c, x_c.T @ x_d, None, None)
    S = feedback_transform(pair, damping)
    torch.testing.assert_close(S @ W, torch.linalg.solve(x_c.T @ x_c, x_c.T @ x_d @ W))
    full = LayerStats(gram=x_c.T @ x_c, num_images=1, grad_gram=G)
    fitted, _ = loss_aware_svd(S @ W, feedback_stats(full, pair, S), damping)
    U, V = fitted.factors(rank)
    best = _objective(x_c, x_d, W, U @ V.T, G)
    dense_fit, _ = loss_aware_svd(W, LayerStats(gram=x_d.T @ x_d, num_images=1, grad_gram=G), damping)
    U0, V0 = dense_fit.factors(rank)
    assert best < _objective(x_c, x_d, W, U0 @ V0.T, G)
    for seed in range(5):
        gen = torch.Generator().manual_seed(seed + 1)
        dU = 1e-2 * torch.randn(U.shape, generator=gen, dtype=torch.float64)
        assert best <= _objective(x_c, x_d, W, (U + dU) @ V.T, G) + 1e-9
    # the input-side form (W G W^T kept instead of G, as gram_space="auto" keeps it for qkv and fc1) agrees
    narrow = LayerStats(gram=x_c.T @ x_c, num_images=1, grad_range_gram=W @ G @ W.T,
                        grad_trace=float(torch.trace(G)))
    if k <= m:
        other, _ = loss_aware_svd(S @ W, feedback_stats(narrow, pair, S), damping)
        U2, V2 = other.factors(rank)
        torch.testing.assert_close(U2 @ V2.T, U @ V.T)


def test_unchanged_inputs_leave_the_factors_and_bias_alone():
    """Where the compressed inputs are the dense ones (K = H_c), W* = W and the refit is the decomposition itself;
    the refitted bias is b + mu (W - W_hat), the decomposition's own bias correction."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 8, generator=g, dtype=torch.float64) + 0.5
    W = torch.randn(8, 12, generator=g, dtype=torch.float64)
    mu = x.mean(0)
    xc = x - mu
    H = xc.T @ xc
    pair = PairGrams(H, H.clone(), mu, mu.clone())
    S = feedback_transform(pair, 1e-4)
    torch.testing.assert_close(S @ W, W, rtol=1e-9, atol=1e-9)
    stats = LayerStats(gram=H, num_images=1, grad_gram=torch.eye(12, dtype=torch.float64))
    a, _ = loss_aware_svd(S @ W, feedback_stats(stats, pair, S), 1e-4)
    b, _ = loss_aware_svd(W, stats, 1e-4)
    torch.testing.assert_close(a.factors(4)[0] @ a.factors(4)[1].T, b.factors(4)[0] @ b.factors(4)[1].T)
    bias = torch.randn(12, generator=g, dtype=torch.float64)
    W_hat = b.factors(4)[0] @ b.factors(4)[1].T
    torch.testing.assert_close(refit_bias(bias, W, W_hat, pair), bias + mu @ (W - W_hat))


def test_refitted_bias_is_exact_at_the_mean_token_when_the_inputs_moved():
    """b' makes the compressed layer give, at the compressed stream's mean token, the dense layer's output at the
    dense stream's mean token: mu_c W_hat + b' = mu_d W + b."""
    g = torch.Generator().manual_seed(2)
    W, W_hat = (torch.randn(8, 12, generator=g, dtype=torch.float64) for _ in range(2))
    mu_c, mu_d, bias = (torch.randn(n, generator=g, dtype=torch.float64) for n in (8, 8, 12))
    H = torch.eye(8, dtype=torch.float64)
    b = refit_bias(bias, W, W_hat, PairGrams(H, H.clone(), mu_c, mu_d))
    torch.testing.assert_close(mu_c @ W_hat + b, mu_d @ W + bias)


def _assert_grams_of_the_whole_models(got: dict[str, PairGrams], dense: nn.Module, model: nn.Module,
                                     images: list[torch.Tensor], names: list[str]) -> None:
    """The walk's H_c and K of each layer in ``names`` against the truth: both whole models run on the images, with
    a hook that copies each layer's input when the layer is called."""
    count = sum(batch.shape[0] for batch in images)
    for name in names:
        seen: dict[str, list[torch.Tensor]] = {"c": [], "d": []}
        handles = [m.get_submodule(name).register_forward_pre_hook(
            lambda mod, args, key=key, seen=seen: seen[key].append(args[0].reshape(-1, args[0].shape[-1]).clone()))
            for m, key in ((model, "c"), (dense, "d"))]
        with torch.no_grad():
            for batch in images:
                model(batch), dense(batch)
        for handle in handles:
            handle.remove()
        x_c, x_d = torch.cat(seen["c"]), torch.cat(seen["d"])
        torch.testing.assert_close(got[name].gram, x_c.T @ x_c / count, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(got[name].cross, x_c.T @ x_d / count, rtol=1e-9, atol=1e-9)


def test_a_block_left_out_of_the_walk_is_still_run_before_the_next():
    """Blocks without a refitted layer (all their layers left dense) are absent from the walk: the block after such a
    gap gets its inputs from the images again (or through the skipped block), never the output of the block before
    the gap fed straight into it. Its statistics equal those of the inputs captured in the two whole models."""
    torch.manual_seed(0)
    dense = make_tiny_vit(seed=4, depth=3).double().eval()
    model = copy.deepcopy(dense)
    with torch.no_grad():  # another model (as a compressed one is): every weight of it slightly off
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    images = [make_images(6, seed=5).double(), make_images(4, seed=6).double()]
    names = ["blocks.0.attn.qkv", "blocks.2.mlp.fc1"]
    got: dict[str, PairGrams] = {}
    sequential_refit(dense, model, {"blocks.0": names[:1], "blocks.2": names[1:]}, images,
                     lambda name, pair: got.setdefault(name, pair), centred=lambda name: False,
                     device=torch.device("cpu"), progress=False)
    _assert_grams_of_the_whole_models(got, dense, model, images, names)


class _InPlaceBlock(nn.Module):
    """A block that changes a layer's input in place after the layer has read it (as an in-place activation or
    scaling may)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x))
        y = self.fc2(h)
        h.mul_(3.0)  # fc2's input, after fc2 read it
        return x + y + h[..., :6]


def test_the_dense_blocks_one_pass_records_each_layers_input_as_the_layer_saw_it():
    """The dense block runs once per block and records all its layers' inputs: an input the block changes in place
    after its layer read it is recorded as the layer saw it. Truth: both whole models run with a hook that copies
    each layer's input when the layer is called."""
    torch.manual_seed(0)
    dense = nn.Sequential(_InPlaceBlock(), _InPlaceBlock()).double().eval()
    model = copy.deepcopy(dense)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    images = [torch.randn(3, 5, 6, dtype=torch.float64), torch.randn(2, 5, 6, dtype=torch.float64)]
    names = {"0": ["0.fc1", "0.fc2"], "1": ["1.fc1", "1.fc2"]}
    got: dict[str, PairGrams] = {}
    sequential_refit(dense, model, names, images, lambda name, pair: got.setdefault(name, pair),
                     centred=lambda name: False, device=torch.device("cpu"), progress=False)
    _assert_grams_of_the_whole_models(got, dense, model, images, [n for layers in names.values() for n in layers])


def _fc2_gain(block: nn.Module) -> torch.Tensor:
    """fc2's gain into its block's output, as the architectures define it (written out, not probed): LayerScale's
    gamma where the block has one (DeiT-III's ls2, EVA's gamma_2), else 1."""
    gamma = getattr(getattr(block, "ls2", None), "gamma", getattr(block, "gamma_2", None))
    return torch.ones(block.mlp.fc2.out_features, dtype=torch.float64) if gamma is None else gamma.detach().double()


def _brute_force_refit(dense, model, images, settings, anchor=False):
    """The refit without caches: for every factorized layer in forward order, both whole models run on all images
    with a hook on that layer; the same closed form. ``anchor``: each block's fc2 aims at the dense block's output
    (E from the block outputs of the two whole models and fc2's gain as the architecture defines it)."""
    layers = get_adapter(dense).compressible_layers(dense)
    stats_model = copy.deepcopy(dense)
    from lowrank_vit.core.loss_aware import collect_loss_statistics

    stats = collect_loss_statistics(stats_model, get_adapter(stats_model).compressible_layers(stats_model),
                                    [images], images.shape[0], progress=False, center=True, gram_space="auto",
                                    gram_precision="float64")
    for name, layer in layers.items():
        new = model.get_submodule(name)
        if not isinstance(new, FactorizedLinear):
            continue
        block_name = name.rsplit(".", 2)[0]  # (a block's fc2 is block.mlp.fc2)
        gain = _fc2_gain(dense.get_submodule(block_name)) if anchor and name.endswith("mlp.fc2") else None
        box: dict[str, torch.Tensor] = {}
        hooks = [layer.register_forward_hook(lambda m, i, o, box=box: box.update(d=i[0].detach(), od=o.detach())),
                 new.register_forward_hook(lambda m, i, o, box=box: box.update(c=i[0].detach(), oc=o.detach()))]
        if gain is not None:
            for key, whole in (("yd", dense), ("yc", model)):
                hooks.append(whole.get_submodule(block_name).register_forward_hook(
                    lambda m, i, o, box=box, key=key: box.__setitem__(key, o.detach())))
        with torch.no_grad():
            dense(images)
            model(images)
        for hook in hooks:
            hook.remove()
        xd = box["d"].reshape(-1, layer.in_features).double()
        xc = box["c"].reshape(-1, layer.in_features).double()
        n = images.shape[0]
        E = None
        if gain is not None:
            width = layer.out_features
            E = ((box["yd"] - box["yc"]).reshape(-1, width).double() / gain
                 - box["od"].reshape(-1, width).double() + box["oc"].reshape(-1, width).double())
        if layer.bias is not None:  # the bias absorbs the mean: centred statistics
            mc, md = xc.mean(0), xd.mean(0)
            pair = PairGrams((xc - mc).T @ (xc - mc) / n, (xc - mc).T @ (xd - md) / n, mc, md)
            if E is not None:
                pair.anchor_cross, pair.anchor_mean = (xc - mc).T @ (E - E.mean(0)) / n, E.mean(0)
        else:  # (EVA's k_proj)
            pair = PairGrams(xc.T @ xc / n, xc.T @ xd / n, None, None)
            if E is not None:
                pair.anchor_cross = xc.T @ E / n
        W = layer.weight.detach().double().T
        if E is None:
            S = feedback_transform(pair, settings["refit_damping"])
            d, _ = loss_aware_svd(S @ W, feedback_stats(stats[name], pair, S), settings["damping"])
        else:
            d, _ = loss_aware_svd(anchored_weight(pair, W, settings["refit_damping"]),
                                  feedback_stats(stats[name], pair, None), settings["damping"])
        U, V = d.factors(new.rank)
        new.U.data.copy_(U)
        new.V.data.copy_(V)
        if layer.bias is not None:
            new.bias.data.copy_(refit_bias(layer.bias.detach().double(), W, U @ V.T, pair))


@pytest.mark.parametrize("target", ["layer", "block"])
@pytest.mark.parametrize("key", list(MODELS))
def test_the_cached_walk_matches_a_brute_force_refit(key, target):
    """The block caches (advanced through consecutive blocks, recomputed after Swin's patch merging and at the first
    block) give the same refitted model as running both whole models once per layer; with refit_target="block",
    each block's fc2 anchored to the dense block's output through LayerScale's gain as the architectures define it
    (:func:`_fc2_gain`; the walk finds it by probing)."""
    name, kwargs, channels, size = MODELS[key]
    torch.manual_seed(0)
    dense = timm_with_our_models().create_model(name, pretrained=False, **kwargs).eval()
    if target == "block":  # LayerScale's gammas per channel (they start at one constant)
        with torch.no_grad():
            for param_name, param in dense.named_parameters():
                if param_name.endswith(("ls2.gamma", "gamma_2")):
                    param.mul_(torch.linspace(0.5, 1.5, param.numel()))
    images = make_images(24, channels=channels, size=size, seed=3)
    settings = dict(reduction=0.5, calib_samples=24, gram_precision="float64", damping=1e-4, refit_damping=3e-3)
    refitted = copy.deepcopy(dense)
    report = compress(refitted, [images], refit_cfg(**settings, settings={"refit_target": target}))
    reference = copy.deepcopy(dense)
    plain = compress(reference, [images], refit_cfg(**{**settings, "refit": False}))
    before = copy.deepcopy(reference)
    _brute_force_refit(dense, reference, images, settings, anchor=target == "block")
    with torch.no_grad():
        out, expected, unrefitted = refitted(images), reference(images), before(images)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    assert (out - unrefitted).abs().max() > 1e-4  # the refit did change the model
    assert report.stage_seconds["refit"] > 0
    assert report.ranks == plain.ranks and report.params_after == plain.params_after  # the same allocation


def test_refit_lowers_the_held_out_kl_of_a_trained_model_at_a_high_ratio():
    """On a tiny ViT trained here, at -80%, the refitted model's predictions on held-out images are closer (KL) to the
    dense model's than those of the same allocation without the refit, and closer still with each block's fc2 aimed
    at the dense block's output (refit_target="block"). (On random-weight models it does not help: its target, the
    dense layers' outputs weighted by G, carries no learned structure; docs/loss_aware_study.md measures it on trained
    ones.)"""
    from lowrank_vit.repro.tensortrain import train_classifier

    images = make_images(512, seed=8)
    labels = (images.mean(dim=(1, 2, 3)) > images.mean()).long() + 2 * (images[:, 0, :14].mean(dim=(1, 2)) > 0).long()
    dense = make_tiny_vit(seed=1, depth=3)
    train_classifier(dense, images[:256], labels[:256], epochs=6, lr=3e-3, batch_size=32, seed=0, progress=False)
    dense.eval()
    held_out = images[256:]
    with torch.no_grad():
        reference = torch.log_softmax(dense(held_out), 1)
    kl = {}
    for refit, target in ((False, "layer"), (True, "layer"), (True, "block")):
        model = copy.deepcopy(dense)
        compress(model, [images[:128]], refit_cfg(reduction=0.8, calib_samples=128, refit=refit,
                                                  settings={"refit_target": target}))
        with torch.no_grad():
            out = torch.log_softmax(model(held_out), 1)
        kl[refit, target] = float(torch.nn.functional.kl_div(out, reference, log_target=True, reduction="batchmean"))
    assert kl[True, "layer"] < kl[False, "layer"]
    assert kl[True, "block"] < kl[True, "layer"]  # fc2 aimed at the dense block's output: closer still


def _calling_blocks_with(model: nn.Module, extra: Callable[[torch.Tensor], dict]) -> nn.Module:
    """``model`` whose forward calls each block as block(x, **extra(x))."""
    import types

    def features(self, x, **_):
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
        for block in self.blocks:
            x = block(x, **extra(x))
        return self.norm(x)

    model.forward_features = types.MethodType(features, model)
    return model


def test_recorded_call_values_compare_by_shape_and_value():
    """What decides whether a block's call can be replayed: tensors equal in shape and value, containers element by
    element, and anything that cannot say whether it is equal (an array) taken as different, so refused."""
    import numpy as np

    from lowrank_vit.core.refit import _same

    table = torch.arange(6.0).reshape(2, 3)
    assert _same({"rope": table, "n": 2}, {"rope": table.clone(), "n": 2}) and _same(None, None)
    assert not _same(table, table[:1]) and not _same(table, table + 1) and not _same(table, None)
    assert not _same((table,), [table]) and not _same({"a": 1}, {"b": 1})
    assert not _same(np.zeros(3), np.zeros(3))


@pytest.mark.parametrize("stage", ["the refit", "the block reconstruction"])
def test_blocks_called_with_batch_dependent_arguments_are_refused_before_the_calibration(stage, monkeypatch):
    """A mask with a batch dimension: re-running a block on cached inputs of other batches could not repeat that
    call, so the refit (and the block stage) says so instead of fitting to a different computation, before the
    calibration's pass rather than after it, leaving the model as it was (in training mode too)."""
    from lowrank_vit import pipeline

    model = _calling_blocks_with(make_tiny_vit(seed=3), lambda x: {"attn_mask": torch.zeros(x.shape[0], 1, 1, 1)})
    model.train()
    before = copy.deepcopy(model.state_dict())
    monkeypatch.setattr(pipeline, "_calibrate", lambda *a, **k: pytest.fail("the calibration must not start"))
    cfg = (refit_cfg(reduction=0.5, calib_samples=16) if stage == "the refit" else
           recipe("loss-aware", reduction=0.5, calib_samples=16, block_reconstruction="factors", progress=False))
    with pytest.raises(ValueError) as info:
        compress(model, [make_images(16, seed=4)], cfg)
    assert str(info.value) == ("block blocks.0 is called with arguments that depend on the batch besides its input "
                               f"(a mask, say); {stage} re-runs each block on cached inputs and cannot follow it")
    assert all(m.training for m in model.modules())
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_blocks_called_with_the_same_arguments_for_every_batch_are_replayed():
    """attn_mask=None on every call: replayed on the caches, the refit gives exactly what it gives the same model
    calling its blocks with the input alone."""
    images = make_images(16, seed=4)
    plain, masked = make_tiny_vit(seed=3), _calling_blocks_with(make_tiny_vit(seed=3), lambda x: {"attn_mask": None})
    for model in (plain, masked):
        compress(model, [images], refit_cfg(reduction=0.5, calib_samples=16))
    with torch.no_grad():
        torch.testing.assert_close(masked(images), plain(images), rtol=0, atol=0)


def test_reported_errors_of_refitted_layers_are_exact():
    """Every refitted layer's reported error equals eq. (5) pooled over the calibration images, computed by brute
    force on the dense inputs: tr(dW^T H_c dW) / tr(W^T H W) (centred numerator, where the bias absorbs the mean).
    fc2 keeps its statistics on its output side, exact only for weights in the range of W, which a refitted weight
    is not; its error comes from the refit's own pass."""
    dense = make_tiny_vit(seed=6)
    images = make_images(32, seed=7)
    model = copy.deepcopy(dense)
    report = compress(model, [images], refit_cfg(reduction=0.6, calib_samples=32, gram_precision="float64"))
    layers = get_adapter(dense).compressible_layers(dense)
    inputs = {}
    hooks = [layer.register_forward_hook(lambda m, i, o, n=name: inputs.__setitem__(n, i[0].detach()))
             for name, layer in layers.items()]
    with torch.no_grad():
        dense(images)
    for hook in hooks:
        hook.remove()
    checked = 0
    for entry in report.layers:
        new = model.get_submodule(entry.name)
        if not isinstance(new, FactorizedLinear):
            continue
        x = inputs[entry.name].reshape(-1, new.in_features).double()
        W = layers[entry.name].weight.detach().double().T
        delta = W - new.dense_weight().detach().double()
        centred = x - x.mean(0)
        expected = float((centred @ delta).pow(2).sum() / (x @ W).pow(2).sum())
        assert entry.output_error == pytest.approx(expected, rel=1e-6), entry.name
        checked += 1
    assert checked == len(layers) and any(name.endswith("fc2") for name in layers)


def test_centred_pair_grams_in_float32_products_survive_a_mean_far_above_the_spread():
    """Tokens whose mean is 300 times their spread (as an attention output of nearly equal tokens): the centred H_c and
    K from float32 products, accumulated over three batches, match the float64 centring of the same tokens to
    1e-5 of their size, and H_c stays positive semi-definite; the means are exact. (Centring by sum x x^T - N mu
    mu^T on the raw tokens left H_c indefinite here, and the refit amplified the rounding by 1e9.)"""
    from lowrank_vit.core.refit import _accumulate_pair, _pair_grams

    g = torch.Generator().manual_seed(0)
    offset = 300.0 * torch.randn(12, generator=g)
    batches = [(offset + torch.randn(2, 40, 12, generator=g), 0.5 * offset + torch.randn(2, 40, 12, generator=g))
               for _ in range(3)]
    sums = {"gram": torch.zeros(12, 12, dtype=torch.float64), "cross": torch.zeros(12, 12, dtype=torch.float64),
            "sum_c": torch.zeros(12, dtype=torch.float64), "sum_d": torch.zeros(12, dtype=torch.float64), "rows": 0}
    for x_c, x_d in batches:
        _accumulate_pair(x_c, x_d, sums, True, torch.float32, False)
    pair = _pair_grams(sums, 6, True)
    c = torch.cat([x.reshape(-1, 12) for x, _ in batches]).double()
    d = torch.cat([x.reshape(-1, 12) for _, x in batches]).double()
    c0, d0 = c - c.mean(0), d - d.mean(0)
    torch.testing.assert_close(pair.mean_c, c.mean(0), rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(pair.mean_d, d.mean(0), rtol=1e-12, atol=1e-9)
    for got, truth in ((pair.gram, c0.T @ c0 / 6), (pair.cross, c0.T @ d0 / 6)):
        assert float((got - truth).norm() / truth.norm()) < 1e-5
    assert float(torch.linalg.eigvalsh(pair.gram).min()) > 0


def test_the_refit_in_float32_products_matches_float64_on_a_model_with_near_constant_inputs():
    """A tiny ViT with random affine parameters compressed by 80%: its second block's attention output is nearly the
    same for every token. The refit with float32 Gram products gives every layer the weight float64 products give
    (to 1e-3 of its norm), and so the same KL to the dense model (was: a 1e9-fold weight and a KL of 0.02 where the
    float64 refit has 1e-8)."""
    from tests.helpers import randomize_affine_

    dense = randomize_affine_(make_tiny_vit(seed=3), seed=1, scale=1.0)
    images = make_images(48, seed=4)
    models = {}
    for precision in ("float32", "float64"):
        models[precision] = copy.deepcopy(dense)
        compress(models[precision], [images[:24], images[24:]],
                 refit_cfg(reduction=0.8, calib_samples=48, gram_precision=precision))
    layers = {p: {n: m.dense_weight().detach() for n, m in model.named_modules() if isinstance(m, FactorizedLinear)}
              for p, model in models.items()}
    assert len(layers["float64"]) == 8
    for name, truth in layers["float64"].items():
        assert float((layers["float32"][name] - truth).norm() / truth.norm()) < 1e-3, name


def test_micro_batches_regroup_every_image_in_order_and_no_more_than_asked():
    """The refit's micro-batches (the pipeline cuts calibration batches of any size to 32 or 64): every image once,
    in order, at most ``size`` at a time, whatever the batches' sizes (the last one a non-contiguous view)."""
    from lowrank_vit.core.refit import micro_batches

    images = [torch.randn(7, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.randn(5, 1, 4, 4).expand(5, 3, 4, 4)]
    for size in (1, 3, 4, 32):
        parts = list(micro_batches(images, size))
        assert all(0 < part.shape[0] <= size for part in parts), size
        assert torch.equal(torch.cat(parts), torch.cat(images)), size
    assert [part.shape[0] for part in micro_batches(images, 3)] == [3, 3, 1, 2, 3, 2]


def test_the_calls_are_recorded_on_the_first_two_images_across_batches():
    """``block_calls`` compares the call on one image with the call on two: where the first batch holds one image,
    the second comes from the next batch (and a single image is all there is when nothing follows)."""
    from lowrank_vit.core.refit import _two_images

    first, second = torch.randn(1, 3, 4, 4), torch.randn(3, 3, 4, 4)
    assert torch.equal(_two_images([first, second]), torch.cat([first, second[:1]]))
    assert torch.equal(_two_images([second, first]), second[:2])
    assert torch.equal(_two_images([first]), first)


def test_a_block_follows_the_previous_only_as_the_next_child_of_one_sequential():
    """Which blocks' inputs are the previous block's outputs (the streams advance by one block) and which are
    recomputed from the images: the next index in the same ``nn.Sequential`` only."""
    from lowrank_vit.core.refit import _follows

    model = nn.Module()
    model.blocks = nn.Sequential(nn.Identity(), nn.Identity(), nn.Identity())
    model.other = nn.Sequential(nn.Identity(), nn.Identity())
    model.listed = nn.ModuleList([nn.Identity(), nn.Identity()])
    assert _follows(model, "blocks.0", "blocks.1") and _follows(model, "blocks.1", "blocks.2")
    assert not _follows(model, None, "blocks.0") and not _follows(model, "blocks.0", "blocks.2")
    assert not _follows(model, "blocks.2", "other.0") and not _follows(model, "blocks.1", "other.2")
    assert not _follows(model, "listed.0", "listed.1")  # a ModuleList is not called in order by itself
    top = nn.Sequential(nn.Identity(), nn.Identity())
    assert _follows(top, "0", "1") and not _follows(top, "1", "0")


def test_recorded_values_that_are_equal_but_not_one_object_or_not_alike():
    """``_same`` beyond the call records above: equal values that are not one object are the same, a tensor and a
    number are not (even where they compare equal), containers of tensors compare element by element, and a dict
    against a value that is not one is different rather than an error."""
    from lowrank_vit.core.refit import _same

    table = torch.arange(4.0)
    assert _same(float("2.5"), float("2.5")) and _same("rope" + str(1), "rope1")
    assert not _same(torch.tensor(3.0), 3.0) and not _same(3.0, torch.tensor(3.0))
    assert _same([table, (table, 2)], [table.clone(), (table.clone(), 2)])
    assert not _same([table, (table, 2)], [table, (table + 1, 2)])
    assert not _same({"a": 1}, 5) and not _same(5, {"a": 1})


def test_the_refits_errors_name_what_is_missing():
    """The two refusals of the refit's statistics read as written: a dense-input error without the dense Gram, and a
    layer without the loss-aware gradient statistics."""
    from lowrank_vit.core.refit import dense_output_error

    pair = PairGrams(gram=torch.eye(3, dtype=torch.float64), cross=torch.eye(3, dtype=torch.float64), mean_c=None,
                     mean_d=None)
    with pytest.raises(ValueError, match=r"^dense_output_error needs PairGrams\.dense_gram$"):
        dense_output_error(pair, torch.ones(3, 2), torch.zeros(3, 2))
    stats = LayerStats(gram=torch.eye(3, dtype=torch.float64), num_images=4)
    with pytest.raises(ValueError, match=r"^the refit needs the layer's loss-aware gradient statistics \(G\), which "
                                         r"were freed or never collected: it runs with decomposition='loss_aware' "
                                         r"only$"):
        feedback_stats(stats, pair, torch.eye(3, dtype=torch.float64))


def _vit_block_and_input(init_values=None, seed=0):
    import timm

    torch.manual_seed(seed)
    kwargs = {} if init_values is None else {"init_values": init_values}
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=4, embed_dim=24,
                              depth=1, num_heads=2, num_classes=3, **kwargs).eval()
    block = model.blocks[0]
    if init_values is not None:  # a learned LayerScale is per channel, not the constant it starts at
        with torch.no_grad():
            block.ls2.gamma.copy_(torch.linspace(-0.5, 2.0, 24))
    return block, torch.randn(3, 17, 24)


def test_residual_gain_is_fc2s_layerscale_and_none_for_layers_the_block_reads_again():
    """The probe finds that a ViT block's output moves by exactly fc2's change times LayerScale's gamma (by the change
    itself without LayerScale); qkv, proj and fc1 do not write the output linearly (a softmax, a norm, an
    activation), nor does a post-norm block's fc2 (Swin V2 "cr": the MLP's output is normalized before the residual
    sum); a Swin block's fc2 does, its output reshaped to the token grid."""
    import timm

    from lowrank_vit.core.refit import residual_gain

    block, x = _vit_block_and_input(init_values=0.1)
    torch.testing.assert_close(residual_gain(block, block.mlp.fc2, x), block.ls2.gamma.detach(), rtol=1e-4,
                               atol=1e-5)
    for name in ("attn.qkv", "attn.proj", "mlp.fc1"):
        assert residual_gain(block, block.get_submodule(name), x) is None, name
    plain, x = _vit_block_and_input()
    torch.testing.assert_close(residual_gain(plain, plain.mlp.fc2, x), torch.ones(24), rtol=1e-4, atol=1e-5)
    torch.manual_seed(0)
    post_norm = timm.create_model("swinv2_cr_tiny_224", pretrained=False, img_size=16, window_size=4, embed_dim=16,
                                  depths=(1,), num_heads=(2,), num_classes=3).eval()
    block = post_norm.stages[0].blocks[0]
    assert residual_gain(block, block.mlp.fc2, torch.randn(2, 16, 4, 4).permute(0, 2, 3, 1)) is None
    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=32, patch_size=2,
                             window_size=4, embed_dim=16, depths=(2,), num_heads=(2,), num_classes=3).eval()
    for block in swin.layers[0].blocks:  # (the second shifts its windows)
        tokens = torch.randn(2, 16, 16, 16)
        assert residual_gain(block, block.attn.proj, tokens) is None
        torch.testing.assert_close(residual_gain(block, block.mlp.fc2, tokens), torch.ones(16), rtol=1e-4,
                                   atol=1e-5)


def test_the_anchor_change_carries_the_compressed_block_onto_the_dense_one():
    """With fc2's output moved by E (anchor_change) on top of the compressed block's own output, the compressed
    block's output is the dense block's, though the two blocks differ before fc2 and in their inputs."""
    from lowrank_vit.core.refit import _run_through, anchor_change, residual_gain

    dense, x_d = _vit_block_and_input(init_values=0.1)
    compressed = copy.deepcopy(dense)
    with torch.no_grad():
        for p in compressed.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x_c = x_d + 0.1 * torch.randn_like(x_d)
    gain = residual_gain(compressed, compressed.mlp.fc2, x_c)
    with torch.no_grad():
        _, out_d, y_d = _run_through(dense, dense.mlp.fc2, x_d)
        _, out_c, y_c = _run_through(compressed, compressed.mlp.fc2, x_c)
        change = anchor_change(gain, y_d, y_c, out_d, out_c).reshape(out_d.shape)
        target = out_d + change  # what fc2 should output: the dense layer's output plus E
        _, _, moved = _run_through(compressed, compressed.mlp.fc2, x_c, lambda out: target - out)
    torch.testing.assert_close(moved, y_d, rtol=1e-4, atol=1e-4)
    # a channel whose gain is zero cannot move the output: its E is zero, not a division by zero
    gain = gain.clone()
    gain[3] = 0
    assert torch.isfinite(anchor_change(gain, y_d, y_c, out_d, out_c)).all()
    assert float(anchor_change(gain, y_d, y_c, out_d, out_c)[:, 3].abs().max()) == 0


def test_the_anchored_weight_is_the_least_squares_fit_to_the_dense_outputs_plus_e():
    """anchored_weight: W* = argmin ||X_c W* - (X W + E)||^2 (vanishing damping), against lstsq on the tokens; with
    centred statistics the refitted bias makes the layer exact at the mean token, E's mean included; without E it
    is S W."""
    from lowrank_vit.core.refit import anchored_weight

    g = torch.Generator().manual_seed(4)
    x_d = torch.randn(300, 7, generator=g, dtype=torch.float64) + 0.7
    x_c = x_d + 0.3 * torch.randn(300, 7, generator=g, dtype=torch.float64)
    W = torch.randn(7, 5, generator=g, dtype=torch.float64)
    E = torch.randn(300, 5, generator=g, dtype=torch.float64) + x_c[:, :5] ** 2 + 0.4
    plain = PairGrams(x_c.T @ x_c, x_c.T @ x_d, None, None)
    torch.testing.assert_close(anchored_weight(plain, W, 1e-12), feedback_transform(plain, 1e-12) @ W)
    pair = PairGrams(x_c.T @ x_c, x_c.T @ x_d, None, None, anchor_cross=x_c.T @ E)
    expected = torch.linalg.lstsq(x_c, x_d @ W + E).solution
    torch.testing.assert_close(anchored_weight(pair, W, 1e-12), expected, rtol=1e-7, atol=1e-8)
    mc, md, me = x_c.mean(0), x_d.mean(0), E.mean(0)
    centred = PairGrams((x_c - mc).T @ (x_c - mc), (x_c - mc).T @ (x_d - md), mc, md,
                        anchor_cross=(x_c - mc).T @ (E - me), anchor_mean=me)
    fitted = anchored_weight(centred, W, 1e-12)
    bias = torch.randn(5, generator=g, dtype=torch.float64)
    b = refit_bias(bias, W, fitted, centred)
    ones = torch.ones(300, 1, dtype=torch.float64)
    solution = torch.linalg.lstsq(torch.cat([x_c, ones], 1), x_d @ W + bias + E).solution
    torch.testing.assert_close(fitted, solution[:7], rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(b, solution[7], rtol=1e-7, atol=1e-8)


def test_refit_target_block_brings_the_block_output_closer_to_the_dense_one():
    """One block with LayerScale, every layer compressed at -70%, no damping in the refit: with fc2 anchored to the
    dense block's output, the block's output ends closer to the dense block's, in the metric fc2's anchored objective
    minimizes (fc2's G with its gain divided out), than with fc2 refitted to its own outputs; the rank-r optimum of
    that objective cannot do worse than another rank-r weight. No other layer differs."""
    import timm

    from lowrank_vit.core.loss_aware import collect_loss_statistics

    torch.manual_seed(2)
    dense = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=4, embed_dim=24,
                              depth=1, num_heads=2, num_classes=3, init_values=0.1).eval()
    randomize_affine_(dense, seed=2)
    with torch.no_grad():
        dense.blocks[0].ls2.gamma.copy_(torch.linspace(0.05, 0.5, 24))
    images = make_images(64, channels=3, size=16, seed=5)
    outputs, models = {}, {}
    for target in ("layer", "block", None):
        model = copy.deepcopy(dense)
        if target is not None:
            compress(model, [images], refit_cfg(reduction=0.7, calib_samples=64, refit_damping=0.0, damping=1e-8,
                                                gram_precision="float64", settings={"refit_target": target}))
        box = {}
        handle = model.blocks[0].register_forward_hook(lambda m, i, o, box=box: box.__setitem__("y", o))
        with torch.no_grad():
            model(images)
        handle.remove()
        outputs[target], models[target] = box["y"], model
    probe = copy.deepcopy(dense)
    stats = collect_loss_statistics(probe, get_adapter(probe).compressible_layers(probe), [images], 64,
                                    progress=False, center=True, gram_space="auto", gram_precision="float64")
    G = stats["blocks.0.mlp.fc2"].grad_gram
    gain = dense.blocks[0].ls2.gamma.detach().double()

    def error(y):
        d = (y - outputs[None]).reshape(-1, 24).double() / gain
        return float(torch.einsum("ti,ij,tj->", d, G, d))

    assert error(outputs["block"]) < error(outputs["layer"])
    for name, module in models["layer"].named_modules():
        if isinstance(module, FactorizedLinear) and name != "blocks.0.mlp.fc2":
            torch.testing.assert_close(module.dense_weight(), models["block"].get_submodule(name).dense_weight())



@pytest.mark.parametrize("key", ["deit3_layerscale", "swin_v2_cr"])
def test_the_dense_pass_keeps_the_outputs_of_the_layers_the_probe_accepts_and_no_others(key, monkeypatch):
    """With refit_target="block" every layer is asked for its anchor, but only the layers that write their block's
    output (fc2 here; none in a post-norm Swin V2 "cr" block) need their dense outputs: the dense block's recording
    pass keeps exactly those, so that the anchored walk holds no more than one more tensor of the block's width."""
    import timm

    from lowrank_vit.core import refit as refit_module

    if key == "swin_v2_cr":
        dense = timm.create_model("swinv2_cr_tiny_224", pretrained=False, img_size=16, window_size=4, embed_dim=16,
                                  depths=(2,), num_heads=(2,), num_classes=3).eval()
        randomize_affine_(dense, seed=1)  # (its post-norms start at zero: no layer would receive a gradient)
        images, expected = make_images(8, channels=3, size=16, seed=1), []
    else:
        name, kwargs, channels, size = MODELS[key]
        dense = timm_with_our_models().create_model(name, pretrained=False, **kwargs).eval()
        images = make_images(8, channels=channels, size=size, seed=1)
        expected = [f"blocks.{i}.mlp.fc2" for i in range(len(dense.blocks))]
    kept: list[str] = []
    original = refit_module._run_recording

    def spy(block, x, layers, outputs=()):
        kept.extend(outputs)
        return original(block, x, layers, outputs)

    monkeypatch.setattr(refit_module, "_run_recording", spy)
    report = compress(dense, [images], refit_cfg(reduction=0.3, calib_samples=8, settings={"refit_target": "block"}))
    assert report.stage_seconds["refit"] > 0
    assert sorted(set(kept)) == sorted(expected)
