"""Tests of lowrank_vit/methods/decompositions.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lowrank_vit import compress, count_params
from lowrank_vit.config import (
    DECOMPOSITIONS,
    CompressionConfig,
)
from lowrank_vit.core.calibration import LayerStats
from lowrank_vit.core.common import check_number, settings_of
from lowrank_vit.core.decompose import (
    Decomposition,
    plain_svd,
    whitened_svd,
    whitening,
)
from lowrank_vit.methods.decompositions import METHODS, Method, Plain, get_method, register_method, svd_llm_update
from lowrank_vit.pipeline import plan_compression
from tests.helpers import (
    ARCHS,
    CLASSIC_METHODS,
    GRADIENT_PASS,
    _spy_on_statistics,
    assert_round_trip,
    loss_aware_cfg,
    make,
    make_images,
    make_tiny_vit,
    method_cfg,
    random_spd_from,
)

FORWARD_ONLY = [name for name in DECOMPOSITIONS if not get_method(name).gradient_pass]


def test_the_registries_hold_both_kinds_of_method():
    """The rule below is tested on every registered method; it needs methods of both kinds to mean anything."""
    assert "loss_aware" in GRADIENT_PASS and {"whitened", "plain", "asvd", "fwsvd", "comcat"} <= set(FORWARD_ONLY)


@pytest.mark.parametrize("value", [0, -0.5, 1.5, True, "half"])
def test_grad_fraction_is_checked(value):
    with pytest.raises(ValueError, match="grad_fraction"):
        loss_aware_cfg(grad_fraction=value, reduction=0.5)
    with pytest.raises(ValueError, match=r"^setting 'grad_fraction'=0.5 belongs to decomposition 'loss_aware' or "
                                          r"decomposition 'kfac', not to decomposition='whitened'"):
        CompressionConfig(decomposition="whitened", grad_fraction=0.5, reduction=0.5)


def test_grad_fraction_reaches_the_statistics(monkeypatch):
    """compress(grad_fraction=0.5) runs the backward on the first half of the calibration images."""
    seen = _spy_on_statistics(monkeypatch)
    compress(
        make_tiny_vit(seed=1),
        [make_images(8, seed=2)],
        loss_aware_cfg(reduction=0.5, calib_samples=7, grad_fraction=0.5),
    )
    assert seen["grad_images"] == 4


@pytest.mark.parametrize("value", ["float16", "bf16", None])
def test_loss_pass_dtype_is_checked(value):
    with pytest.raises(ValueError, match="loss_pass_dtype"):
        loss_aware_cfg(loss_pass_dtype=value, reduction=0.5)
    with pytest.raises(
        ValueError,
        match=r"^setting 'loss_pass_dtype'='bfloat16' belongs to decomposition "
        r"'loss_aware' or decomposition 'kfac', not to decomposition='whitened'",
    ):
        CompressionConfig(decomposition="whitened", loss_pass_dtype="bfloat16", reduction=0.5)


def test_registry_matches_the_config_choices():
    assert tuple(METHODS) == DECOMPOSITIONS
    with pytest.raises(ValueError, match="unknown decomposition 'nope'; registered: plain"):
        get_method("nope")
    with pytest.raises(ValueError, match="registered twice"):
        register_method(type("Again", (Method,), {"name": "plain"}))


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("compensation", ["none", "lowrank"])
def test_every_method_conforms(name, compensation, tmp_path):
    images = make_images(32, seed=3)
    labels = torch.arange(32) % 10
    batches = [(images[:16], labels[:16]), (images[16:], labels[16:])]  # FWSVD and given labels need them
    config = CompressionConfig(
        reduction=0.5,
        decomposition=name,
        allocation="marginal" if name == "loss_aware" else "greedy",
        compensation=compensation,
        calib_samples=32,
        progress=False,
    )
    plan = plan_compression(make_tiny_vit(), batches, config)
    model = make_tiny_vit()
    before = count_params(model)
    report = compress(model, batches, config)
    assert plan.ranks == report.ranks and plan.params_after == report.params_after == count_params(model)
    assert abs(report.params_after - 0.5 * before) <= max(0.001 * 0.5 * before, 64)  # a 32-wide model's rank step
    assert all(layer.output_error >= 0 for layer in report.layers if layer.output_error == layer.output_error)
    assert (report.layers[0].predicted_loss is not None) == get_method(name).loss_units
    assert_round_trip(model, tmp_path / name, images[:4])


# ------------------------------------------------------------------------ a method with its own settings, from here
@dataclasses.dataclass(frozen=True)
class ShrinkSettings:
    shrink_power: float = 1.0
    """The singular values the allocation sees are raised to this power (1: plain SVD's)."""

    def __post_init__(self) -> None:
        check_number("shrink_power", self.shrink_power, "> 0")


class ShrinkSVD(Plain):
    """Plain SVD whose allocation sees the singular values raised to a power (the factors absorb the change, so
    W_hat(r) is plain SVD's): its setting changes the ranks alone."""

    name = "toy-shrink"
    settings = ShrinkSettings
    seen: list[float] = []

    def spectrum(self, weight, stats, extra, cfg):
        return self.decompose(weight, stats, extra, cfg)[0].singular_values

    def decompose(self, weight, stats, extra, cfg):
        power = settings_of(cfg, ShrinkSettings).shrink_power
        ShrinkSVD.seen.append(power)
        plain, white = super().decompose(weight, stats, extra, cfg)
        values = plain.singular_values
        shown = values**power
        return Decomposition(plain.left * (values / shown.clamp_min(1e-30)), plain.right, shown), white


@pytest.fixture
def toy_method():
    register_method(ShrinkSVD)
    ShrinkSVD.seen.clear()
    yield ShrinkSVD.name
    del METHODS[ShrinkSVD.name]


def test_a_method_registered_from_one_file_declares_validates_and_reads_its_settings(toy_method):
    config = CompressionConfig(
        reduction=0.5,
        decomposition=toy_method,
        allocation="marginal",
        shrink_power=3.0,
        calib_samples=16,
        progress=False,
    )
    assert config.settings == {"shrink_power": 3.0}
    with pytest.raises(ValueError, match=r"^shrink_power must be a finite number > 0, got -1"):
        dataclasses.replace(config, settings={"shrink_power": -1})
    with pytest.raises(ValueError, match=r"^setting 'shrink_power'=3.0 belongs to decomposition 'toy-shrink', not to "):
        dataclasses.replace(config, decomposition="plain")
    images = make_images(16, seed=2)
    ranks = {
        power: compress(make_tiny_vit(), [images], dataclasses.replace(config, settings={"shrink_power": power})).ranks
        for power in (1.0, 3.0)
    }
    assert set(ShrinkSVD.seen) == {1.0, 3.0}
    plain = compress(make_tiny_vit(), [images], dataclasses.replace(config, decomposition="plain", settings={}))
    assert ranks[1.0] == plain.ranks and ranks[3.0] != plain.ranks  # the setting reached the allocation


@pytest.mark.usefixtures("one_thread_module")
def test_asvd_alpha_zero_compresses_like_plain(labelled, method_images):
    models, reports = {}, {}
    for name, config in (
        ("asvd", method_cfg(decomposition="asvd", asvd_alpha=0.0)),
        ("plain", method_cfg(decomposition="plain")),
    ):
        models[name] = make("vit")
        reports[name] = compress(models[name], labelled, config)
    assert reports["asvd"].ranks == reports["plain"].ranks
    with torch.no_grad():
        assert torch.equal(models["asvd"](method_images[:4]), models["plain"](method_images[:4]))


@pytest.mark.usefixtures("one_thread_module")
def test_fwsvd_uniform_fisher_compresses_like_plain(labelled, method_images, monkeypatch):
    def uniform_fisher(model, layers, *args, **kwargs):
        return {name: torch.full((layer.in_features,), 2.5, dtype=torch.float64) for name, layer in layers.items()}

    monkeypatch.setattr("lowrank_vit.methods.decompositions.row_fisher", uniform_fisher)
    models, reports = {}, {}
    for name in ("fwsvd", "plain"):
        models[name] = make("vit")
        reports[name] = compress(models[name], labelled, method_cfg(decomposition=name))
    assert reports["fwsvd"].ranks == reports["plain"].ranks
    with torch.no_grad():
        assert torch.equal(models["fwsvd"](method_images[:4]), models["plain"](method_images[:4]))


@pytest.mark.usefixtures("one_thread_module")
@pytest.mark.parametrize("method", CLASSIC_METHODS)
@pytest.mark.parametrize("arch", list(ARCHS))
def test_target_within_0_1_percent(method, arch, labelled, method_images):
    model = make(arch)
    before = count_params(model)
    report = compress(model, labelled, method_cfg(decomposition=method, reduction=0.4))
    assert report.params_after == count_params(model)
    assert abs(count_params(model) - 0.6 * before) <= 0.001 * 0.6 * before
    with torch.no_grad():
        assert torch.isfinite(model(method_images[:2])).all()


@pytest.mark.usefixtures("one_thread_module")
def test_asvd_alpha_is_validated():
    with pytest.raises(ValueError, match="asvd_alpha"):
        CompressionConfig(reduction=0.5, decomposition="asvd", asvd_alpha=-0.5)
    assert CompressionConfig(reduction=0.5, decomposition="asvd").resolved_settings() == {"asvd_alpha": 0.5}
    assert CompressionConfig(reduction=0.5, decomposition="comcat").resolved_settings() == {}
    with pytest.raises(ValueError, match=r"^setting 'asvd_alpha'=0.7 belongs to decomposition 'asvd', not to "):
        CompressionConfig(reduction=0.5, decomposition="comcat", asvd_alpha=0.7)  # would be silently ignored


@pytest.mark.usefixtures("one_thread_module")
def test_the_tiny_helper_vit_works_with_every_method():
    """The 27k-parameter helper model (make_tiny_vit) (one image size, one channel): every method runs end to end."""
    method_images = make_images(16)
    data = [(method_images, torch.arange(16) % 10)]
    for method in CLASSIC_METHODS:
        model = make_tiny_vit()
        report = compress(model, data, method_cfg(decomposition=method, reduction=0.3))
        assert report.params_after == count_params(model)


def sym_power(S: torch.Tensor, power: float) -> torch.Tensor:
    evals, evecs = torch.linalg.eigh(S)
    return (evecs * evals.pow(power)) @ evecs.T


def w_hat(decomposition, rank: int) -> torch.Tensor:
    U, V = decomposition.factors(rank)
    return U @ V.T


@pytest.mark.parametrize("seed, n, k, m", [(0, 40, 6, 9), (1, 60, 10, 4), (2, 25, 8, 8)])
def test_svd_llm_update_is_the_least_squares_output_factor(seed, n, k, m):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, k, generator=g, dtype=torch.float64) @ torch.randn(k, k, generator=g, dtype=torch.float64)
    W = torch.randn(k, m, generator=g, dtype=torch.float64)
    decomposition = plain_svd(W)
    for scale in (1.0, 1 / n):  # any positive scale of the Gram
        for r in range(1, min(k, m) + 1):
            result = svd_llm_update(W, decomposition, scale * X.T @ X, r)
            Ur = decomposition.factors(r)[0]
            expected = Ur @ torch.linalg.lstsq(X @ Ur, X @ W).solution
            torch.testing.assert_close(w_hat(result, r), expected, rtol=1e-8, atol=1e-8)


def kfac_reference(W, H, G, a, b, rank):
    k, m = W.shape
    Hs = (1 - a) * H + a * float(torch.diagonal(H).mean()) * torch.eye(k, dtype=torch.float64)
    Gs = (1 - b) * G + b * float(torch.diagonal(G).mean()) * torch.eye(m, dtype=torch.float64)
    P, s, Rh = torch.linalg.svd(sym_power(Hs, 0.5) @ W @ sym_power(Gs, 0.5))
    best = sym_power(Hs, -0.5) @ (P[:, :rank] * s[:rank]) @ Rh[:rank] @ sym_power(Gs, -0.5)
    return s, best


@pytest.mark.parametrize("k, m", [(6, 9), (9, 5)])  # both sides of the narrow-side computation
@pytest.mark.parametrize("a, b, loss_scale", [(None, None, 1.0), (0.3, 0.2, 1.0), (0.0, 0.5, 2.5)])
def test_kfac_is_the_two_sided_minimizer_on_shrunk_grams(k, m, a, b, loss_scale):
    g = torch.Generator().manual_seed(k * 10 + m)
    H, G = random_spd_from(k, g), random_spd_from(m, g)
    W = torch.randn(k, m, generator=g, dtype=torch.float64)
    settings = {} if a is None else {"input_shrinkage": a, "grad_shrinkage": b}
    a, b = (0.1, 0.7) if a is None else (a, b)  # KFAC-SVD's published defaults for vision
    cfg = CompressionConfig(reduction=0.5, decomposition="kfac", allocation="lems", settings=settings)
    stats = LayerStats(gram=H / loss_scale, num_images=1, grad_gram=G, loss_scale=loss_scale, tokens=1.0)
    method = get_method("kfac")
    decomposition, _ = method.decompose(W, stats, None, cfg)
    p = min(k, m)
    s_ref, _ = kfac_reference(W, H, G, a, b, 1)
    torch.testing.assert_close(decomposition.singular_values[:p], s_ref[:p], rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(method.spectrum(W, stats, None, cfg)[:p], s_ref[:p], rtol=1e-8, atol=1e-10)
    for r in range(1, p + 1):
        torch.testing.assert_close(w_hat(decomposition, r), kfac_reference(W, H, G, a, b, r)[1], rtol=1e-7, atol=1e-9)


def flar_stats(X: torch.Tensor, loss_scale: float) -> LayerStats:
    return LayerStats(
        gram=X.T @ X / loss_scale,
        num_images=4,
        loss_scale=loss_scale,
        fourth_moment=float(X.norm(dim=1).pow(4).sum()),
        rows=X.shape[0],
    )


@pytest.mark.parametrize("seed", range(3))
def test_flar_without_shrinkage_is_the_undamped_whitened_svd(seed):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(50, 7, generator=g, dtype=torch.float64) @ torch.randn(7, 7, generator=g, dtype=torch.float64)
    W = torch.randn(7, 11, generator=g, dtype=torch.float64)
    stats = flar_stats(X, 3.0)
    cfg = CompressionConfig(reduction=0.5, decomposition="flar", allocation="flar", settings={"shrinkage": "none"})
    decomposition, _ = get_method("flar").decompose(W, stats, None, cfg)
    reference = whitened_svd(W, whitening(stats.gram, 0.0))
    s = decomposition.singular_values
    torch.testing.assert_close(s / s[0], reference.singular_values / reference.singular_values[0])
    # in the units of the raw token Gram summed over the calibration's own tokens (the 50 rows), as SVD-LLM's code sums
    # it, whatever scale the pooled Gram was kept in
    torch.testing.assert_close(s, reference.singular_values * 3.0**0.5)
    for r in range(1, 8):
        torch.testing.assert_close(w_hat(decomposition, r), w_hat(reference, r), rtol=1e-9, atol=1e-10)


def test_svd_llm_losses_in_units_of_loss_tokens_when_given():
    # SVD-LLM v2's loss_tokens: the same spectrum rescaled to a Gram summed over 200 tokens instead of the 50 seen
    g = torch.Generator().manual_seed(7)
    X = torch.randn(50, 7, generator=g, dtype=torch.float64)
    W = torch.randn(7, 11, generator=g, dtype=torch.float64)
    stats = flar_stats(X, 3.0)
    own = CompressionConfig(reduction=0.5, decomposition="svd_llm", allocation="svd_llm_v2")
    given = CompressionConfig(
        reduction=0.5, decomposition="svd_llm", allocation="svd_llm_v2", settings={"loss_tokens": 200}
    )
    s_own = get_method("svd_llm").decompose(W, stats, None, own)[0].singular_values
    s_given = get_method("svd_llm").decompose(W, stats, None, given)[0].singular_values
    torch.testing.assert_close(s_given, s_own * (200 / 50) ** 0.5)
    torch.testing.assert_close(s_own.pow(2).sum(), (X @ W).pow(2).sum())  # the raw sum's units: ||X W||^2


@pytest.mark.parametrize("n", [5, 40])  # fewer tokens than features, and more
def test_flar_shrinks_the_raw_gram_by_sklearns_ledoit_wolf_intensity(n):
    from sklearn.covariance import ledoit_wolf_shrinkage

    g = torch.Generator().manual_seed(n)
    X = torch.randn(n, 8, generator=g, dtype=torch.float64) @ torch.randn(8, 8, generator=g, dtype=torch.float64)
    W = torch.randn(8, 6, generator=g, dtype=torch.float64)
    stats = flar_stats(X, 7.0)
    cfg = CompressionConfig(reduction=0.5, decomposition="flar", allocation="flar")
    decomposition, _ = get_method("flar").decompose(W, stats, None, cfg)
    a = ledoit_wolf_shrinkage(X.numpy(), assume_centered=True)
    assert 0 < a < 1
    S = X.T @ X
    shrunk = (1 - a) * S + a * float(torch.trace(S)) / 8 * torch.eye(8, dtype=torch.float64)
    reference = whitened_svd(W, whitening(shrunk, 0.0))
    torch.testing.assert_close(decomposition.singular_values, reference.singular_values, rtol=1e-8, atol=1e-10)
    for r in range(1, 7):
        torch.testing.assert_close(w_hat(decomposition, r), w_hat(reference, r), rtol=1e-8, atol=1e-10)
