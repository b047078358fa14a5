"""compress() end to end on timm models built with pretrained=False: targets, what is touched, the report."""

from __future__ import annotations

import json

import pytest
import timm
import torch

from lowrank_vit import CompressionConfig, FactorizedLinear, compress, count_params, get_adapter
from lowrank_vit.config import RECIPES

from conftest import make_images, make_tiny_vit

SMALL_VIT = dict(img_size=32, patch_size=4, in_chans=3, embed_dim=64, depth=4, num_heads=2, num_classes=10)


def small_vit(seed: int = 0):
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **SMALL_VIT).eval()


def cfg(**kwargs) -> CompressionConfig:
    return CompressionConfig(**{"progress": False, **kwargs})


@pytest.fixture(scope="module")
def small_images():
    return make_images(48, channels=3, size=32, seed=1)


@pytest.mark.parametrize("decomposition", ["plain", "mean", "whitened"])
@pytest.mark.parametrize("allocation", ["uniform", "greedy"])
@pytest.mark.parametrize("compensation", ["none", "lowrank", "diagonal", "sparse", "structured"])
def test_every_combination_lands_within_0_1_percent(decomposition, allocation, compensation, small_images):
    model = small_vit()
    before = count_params(model)
    report = compress(model, [small_images], cfg(reduction=0.5, decomposition=decomposition, allocation=allocation,
                                                 compensation=compensation))
    assert report.params_before == before
    assert report.params_after == count_params(model)
    assert abs(report.params_after - 0.5 * before) <= 0.001 * 0.5 * before
    out = model(small_images[:4])
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("target", [60_000, 120_000])
def test_absolute_target(target, small_images):
    model = small_vit()
    report = compress(model, [small_images], cfg(target_params=target))
    assert abs(count_params(model) - target) <= 0.001 * target
    assert report.target_params == target


def test_only_block_linears_are_replaced(small_images):
    model = small_vit()
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    expected = set(get_adapter(model).compressible_layers(model))
    assert len(expected) == 4 * 4
    report = compress(model, [small_images], cfg(reduction=0.5, bias_correction=False))  # (else biases move)
    factored = {n for n, m in model.named_modules() if isinstance(m, FactorizedLinear)}
    assert factored == {lr.name for lr in report.layers if lr.rank is not None} and factored <= expected
    state = model.state_dict()
    for name, value in reference.items():
        layer = name.rsplit(".", 1)[0]
        if layer in factored:
            if name.endswith(".bias"):
                assert torch.equal(state[name], value)  # biases are kept as they are
            continue
        assert torch.equal(state[name], value), name  # patch embedding, norms, tokens, head, dense layers


def test_report_contents_and_json(small_images):
    model = small_vit()
    report = compress(model, [small_images], cfg(reduction=0.6))
    data = json.loads(report.to_json())
    assert data["params_before"] == report.params_before and data["params_after"] == report.params_after
    assert data["config"]["reduction"] == 0.6 and len(data["layers"]) == 16
    assert set(data["stage_seconds"]) == {"calibration", "decomposition", "allocation", "compensation"}
    for lr in report.layers:
        assert 0.0 <= lr.energy_loss <= 1.0
        if lr.rank is not None:
            assert lr.factored_params == lr.rank * (lr.in_features + lr.out_features) + lr.z_params
            assert lr.factored_params < lr.dense_params
            # The closed-form Z can only lower the calibration error of U V^T (it may choose Z = 0).
            assert lr.output_error <= lr.output_error_lowrank + 1e-9
    total_weights = sum(lr.factored_params for lr in report.layers)
    untouched = report.params_before - sum(lr.dense_params for lr in report.layers)
    assert untouched + total_weights == report.params_after
    assert "params" in report.summary()


def test_whitened_has_lower_output_error_than_plain(small_images):
    errors = {}
    for decomposition in ("plain", "whitened"):
        model = small_vit()
        report = compress(model, [small_images], cfg(reduction=0.5, decomposition=decomposition, allocation="uniform",
                                                     compensation="none"))
        errors[decomposition] = sum(lr.output_error for lr in report.layers)
    assert errors["whitened"] < errors["plain"]


def test_sgd_solver_end_to_end(small_images):
    model = small_vit()
    report = compress(model, [small_images], cfg(reduction=0.5, solver="sgd", sgd_iterations=30, sgd_batch_size=16,
                                                 **RECIPES["paper"]))
    assert report.sgd_loss and all(len(v) == 30 for v in report.sgd_loss.values())
    assert abs(report.params_after - report.target_params) <= 0.001 * report.target_params
    assert torch.isfinite(model(small_images[:2])).all()


def test_calibration_uses_calib_samples_and_accepts_labelled_batches(small_images):
    labels = torch.zeros(len(small_images), dtype=torch.long)
    batches = [(small_images[i: i + 8], labels[i: i + 8]) for i in range(0, 48, 8)]
    seen = []

    class Counting(list):
        def __iter__(self):
            for b in super().__iter__():
                seen.append(len(b[0]))
                yield b

    compress(small_vit(), Counting(batches), cfg(reduction=0.5, calib_samples=20))
    assert seen == [8, 8, 8]  # stops once 20 images were used; the third batch is cut to 4


def test_hooks_are_removed_and_mode_restored(small_images):
    model = small_vit().train()
    compress(model, [small_images], cfg(reduction=0.5))
    assert model.training
    assert all(not m._forward_hooks for m in model.modules())


def test_deterministic(small_images):
    a, b = small_vit(), small_vit()
    compress(a, [small_images], cfg(reduction=0.5))
    compress(b, [small_images], cfg(reduction=0.5))
    x = small_images[:4]
    assert torch.equal(a(x), b(x))


def test_progress_bars_show(small_images, capsys):
    compress(small_vit(), [small_images], CompressionConfig(reduction=0.5))
    err = capsys.readouterr().err
    assert "calibration" in err and "decomposition" in err


def test_factorized_forward_and_repr():
    layer = FactorizedLinear(8, 6, 3)
    torch.nn.init.normal_(layer.U)
    torch.nn.init.normal_(layer.V)
    torch.nn.init.normal_(layer.bias)
    x = torch.randn(2, 5, 8)
    assert torch.allclose(layer(x), (x @ layer.U) @ layer.V.T + layer.bias, atol=1e-6)
    assert "rank=3" in repr(layer)


@pytest.mark.parametrize("name,kwargs,channels,size", [
    ("vit_tiny_patch16_224", dict(img_size=28, patch_size=7, in_chans=1, embed_dim=32, depth=2, num_heads=2,
                                  num_classes=10), 1, 28),
    ("deit_tiny_distilled_patch16_224", dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=2,
                                             num_classes=10), 3, 32),
    ("swin_tiny_patch4_window7_224", dict(img_size=32, patch_size=2, window_size=4, embed_dim=32, depths=(2, 2),
                                          num_heads=(2, 4), num_classes=10), 3, 32),
])
def test_custom_small_models(name, kwargs, channels, size):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    images = make_images(8, channels=channels, size=size)
    report = compress(model, [images], cfg(reduction=0.4))
    assert report.params_after <= report.params_before * 0.6 * 1.001
    # the documented 0.1% (measured: ViT 0.054%, distilled DeiT 0.074%, Swin 0.005% below the target)
    assert abs(report.params_after - report.target_params) <= 0.001 * report.target_params
    assert torch.isfinite(model(images)).all()


@pytest.mark.parametrize("name", ["deit_tiny_patch16_224",
                                  pytest.param("swin_tiny_patch4_window7_224", marks=pytest.mark.slow)])
def test_full_size_timm_models(name):
    """The paper's architecture families at 224 px with random weights, compressed end to end by the default:
    targets hit within 0.1% (few images: speed). DeiT-S/B, ViT-B/L and Swin-B are the same timm classes at larger
    widths (the same code path, minutes more here); `make check-plans` checks their counts for every row."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    images = make_images(2, channels=3, size=224)
    before = count_params(model)
    report = compress(model, [images], cfg(reduction=0.5, calib_samples=2))
    assert abs(count_params(model) - 0.5 * before) <= 0.001 * 0.5 * before
    assert len(report.layers) == 4 * sum(1 for m in model.modules() if hasattr(m, "attn") and hasattr(m, "mlp"))
    assert torch.isfinite(model(images[:1])).all()


def test_tiny_model_helper_matches_conftest():
    assert count_params(make_tiny_vit()) < 40_000


def test_float32_gram_products_match_float64(small_images):
    """float32 per-batch products summed in float64: the same compression to a few parts per million."""
    reports = {}
    for precision in ("float64", "float32"):
        model = small_vit()
        reports[precision] = compress(model, [small_images[i: i + 8] for i in range(0, 48, 8)],
                                      cfg(reduction=0.5, gram_precision=precision))
    exact, fast = reports["float64"], reports["float32"]
    assert exact.ranks == fast.ranks
    for a, b in zip(exact.layers, fast.layers, strict=True):
        assert b.output_error == pytest.approx(a.output_error, rel=1e-3, abs=1e-7)


@pytest.mark.parametrize("compensation", ["none", "lowrank", "diagonal", "sparse", "structured"])
@pytest.mark.parametrize("allocation", ["uniform", "greedy"])
def test_plan_matches_compress(compensation, allocation, small_images):
    """plan_compression (singular values only) allocates exactly as compress does, and the skeleton counts match."""
    from lowrank_vit.pipeline import apply_plan_skeleton_, plan_compression

    config = cfg(reduction=0.5, compensation=compensation, allocation=allocation)
    plan = plan_compression(small_vit(), [small_images], config)
    model = small_vit()
    report = compress(model, [small_images], config)
    assert plan.ranks == report.ranks
    assert plan.params_after == report.params_after
    skeleton = apply_plan_skeleton_(small_vit(), plan)
    assert count_params(skeleton) == report.params_after


@pytest.mark.slow
def test_rank_multiple_on_a_full_size_model():
    """DeiT-S at -50% with ranks in multiples of 8 (the paper's recipe: with its low-rank Z): every U V^T rank,
    low-rank Z rank and folded r + q aligned, and the target still met within 0.1%."""
    from lowrank_vit import LowRankZ, fold_lowrank_z_

    torch.manual_seed(0)
    model = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
    images = make_images(2, channels=3, size=224)
    before = count_params(model)
    report = compress(model, [images], cfg(reduction=0.5, calib_samples=2, rank_multiple=8, **RECIPES["paper"]))
    assert abs(count_params(model) - 0.5 * before) <= 0.001 * 0.5 * before
    factorized = [m for m in model.modules() if isinstance(m, FactorizedLinear)]
    assert len(factorized) == 48
    for layer in factorized:
        assert layer.rank % 8 == 0 and isinstance(layer.z, LowRankZ) and layer.z.rank % 8 == 0
    assert sorted(report.ranks.values()) == sorted(layer.rank for layer in factorized)
    fold_lowrank_z_(model)
    assert all(m.rank % 8 == 0 and m.z is None for m in model.modules() if isinstance(m, FactorizedLinear))


@pytest.mark.parametrize("decomposition", ["whitened", "comcat"])  # comcat: per-head units are aligned too
@pytest.mark.parametrize("allocation", ["uniform", "greedy"])
def test_plan_matches_compress_with_rank_multiple(allocation, decomposition, small_images):
    from lowrank_vit.pipeline import plan_compression

    config = cfg(reduction=0.5, allocation=allocation, decomposition=decomposition, rank_multiple=4)
    plan = plan_compression(small_vit(), [small_images], config)
    report = compress(small_vit(), [small_images], config)
    assert plan.ranks == report.ranks and plan.params_after == report.params_after
    assert all(r % 4 == 0 for r in report.ranks.values() if r is not None)
    # Unspent: less than one 4-rank step of the smallest layer (64 x 64 proj: 4 * 128 parameters), which on this
    # tiny model is 0.5% of it; the full-size test above holds it to 0.1%.
    assert 0 <= report.target_params - report.params_after < 4 * 128


@pytest.mark.slow
def test_sgd_solver_reaches_the_closed_form_error(small_images):
    """compress(solver="sgd") fits the same Z as the closed form up to optimization error: on every layer its
    output error is within 15% of the closed form's (the optimum, so never below it) and strictly below the
    low-rank-only error. A wrong target (e.g. the residual's sign flipped) makes Z add error instead."""
    reports = {}
    sgd_settings = {"sgd_iterations": 300, "sgd_lr": 1e-2, "sgd_batch_size": 16}  # the SGD solver's own
    for solver in ("closed_form", "sgd"):
        reports[solver] = compress(small_vit(), [small_images], cfg(
            reduction=0.5, solver=solver, **(sgd_settings if solver == "sgd" else {}), **RECIPES["paper"]))
    pairs = list(zip(reports["closed_form"].layers, reports["sgd"].layers, strict=True))
    assert len(pairs) == 16 and all(exact.rank is not None for exact, _ in pairs)
    for exact, sgd in pairs:
        assert (sgd.name, sgd.rank, sgd.z_params) == (exact.name, exact.rank, exact.z_params)
        assert sgd.output_error_lowrank == pytest.approx(exact.output_error_lowrank, rel=1e-6)  # same U V^T
        assert sgd.output_error < sgd.output_error_lowrank, sgd.name
        # measured here: 1.02-1.11x the closed form's error after 300 steps at lr 1e-2
        assert exact.output_error * (1 - 1e-3) <= sgd.output_error <= 1.15 * exact.output_error, sgd.name


@pytest.mark.parametrize("decomposition, compensation, timed", [
    ("whitened", "lowrank", {"svd_tail_z", "report_errors", "swap"}),  # Z: the next singular triplets
    ("plain", "diagonal", {"whitening", "closed_form_z", "report_errors", "swap"}),  # Z fitted on H
    ("loss_aware", "none", {"report_errors", "swap"}),
])
def test_substage_seconds_time_what_ran(small_images, decomposition, compensation, timed):
    """The benchmarks read the sub-stage timers from the report instead of wrapping the pipeline's functions."""
    report = compress(small_vit(), [small_images], cfg(reduction=0.5, decomposition=decomposition,
                                                       compensation=compensation,
                                                       allocation="marginal" if decomposition == "loss_aware"
                                                       else "greedy"))
    assert set(report.substage_seconds) == timed and all(v >= 0 for v in report.substage_seconds.values())
    assert json.loads(report.to_json())["substage_seconds"] == report.substage_seconds
