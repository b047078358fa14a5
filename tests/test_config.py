"""Config: checks of the project as a whole."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch

from lowrank_vit.config import (
    DECOMPOSITIONS,
    CompressionConfig,
    float32_matmul_is_ieee,
    recipe,
    resolve_gram_precision,
)
from tests.helpers import (
    FIXTURES,
    GRADIENT_PASS,
    PEER_RECIPES,
    refit_cfg,
)


@pytest.mark.usefixtures("one_thread_module")
@pytest.mark.parametrize("reduction", [0, 1, -0.1, 1.5, 0.0, 1.0, float("nan")])
def test_config_reduction_out_of_range(reduction):
    with pytest.raises(ValueError, match=r"reduction must lie strictly between 0 and 1"):
        CompressionConfig(reduction=reduction, progress=False)


@pytest.mark.usefixtures("one_thread_module")
@pytest.mark.parametrize("reduction", ["0.5", True, [0.5]])
def test_config_reduction_not_a_number(reduction):
    with pytest.raises(ValueError, match=r"reduction must be a number"):
        CompressionConfig(reduction=reduction, progress=False)


@pytest.mark.usefixtures("one_thread_module")
def test_config_both_reduction_and_target():
    with pytest.raises(ValueError, match=r"exactly one of reduction .* target_params .* target_speedup"):
        CompressionConfig(reduction=0.3, target_params=10_000, progress=False)


@pytest.mark.usefixtures("one_thread_module")
def test_config_neither_reduction_nor_target():
    with pytest.raises(ValueError, match=r"exactly one of reduction .* target_params .* target_speedup"):
        CompressionConfig(progress=False)


@pytest.mark.usefixtures("one_thread_module")
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("decomposition", "svd"),
        ("decomposition", "Whitened"),
        ("allocation", "random"),
        ("compensation", "dense"),
        ("compensation", None),
        ("solver", "adam"),
        ("distill_augment", "cutmix"),
        ("refit_target", "output"),
    ],
)
def test_config_unknown_choice(field, value):
    with pytest.raises(ValueError, match=rf"{field}={value!r} is not one of"):
        CompressionConfig(reduction=0.3, progress=False, **{field: value})


@pytest.mark.usefixtures("one_thread_module")
@pytest.mark.parametrize("target", [1000.5, 1e6, "20000", True])
def test_config_target_params_not_integer(target):
    with pytest.raises(ValueError, match=r"target_params must be an integer"):
        CompressionConfig(target_params=target, progress=False)


@pytest.mark.usefixtures("one_thread_module")
@pytest.mark.parametrize("target", [0, -5])
def test_config_target_params_not_positive(target):
    with pytest.raises(ValueError, match=r"target_params must be positive"):
        CompressionConfig(target_params=target, progress=False)


_NUMBERS = {  # field: (its rule, values just inside it, values outside it)
    "gamma": ("be a finite number > 0", [1e-9, 80], [0, -1.0]),
    "sgd_lr": ("be a finite number > 0", [1e-9], [0.0, -1e-3]),
    "damping": ("be a finite number >= 0", [0, 1e-4], [-1e-9]),
    "refit_damping": ("be a finite number >= 0", [0.0, 1e-2], [-1e-9]),
    "asvd_alpha": ("be a finite number >= 0", [0, 2.0], [-0.5]),
    "z_fraction": ("lie in [0, 0.5)", [0.0, 0.499], [0.5, -0.01]),
    "grad_fraction": ("lie in (0, 1]", [1e-3, 1], [0.0, 1.01]),
    "distill_lr": ("be a finite number > 0", [1e-9, 5e-5], [0.0, -1e-4]),
    "distill_features": ("be a finite number >= 0", [0.0, 10], [-1e-9]),
}


_ANY_NUMBER_FIELD_REFUSES = [float("nan"), float("inf"), -float("inf"), True, "0.1", None]


_LOSS_AWARE = {"decomposition": "loss_aware", "allocation": "marginal", "compensation": "none"}


_OWNERS = {  # the choice whose own settings hold the field (the others are the config's shared fields)
    "gamma": {"allocation": "greedy"}, "asvd_alpha": {"decomposition": "asvd"},
    "sgd_lr": {"decomposition": "whitened", "compensation": "lowrank", "solver": "sgd"},
    "grad_fraction": _LOSS_AWARE, "refit_damping": _LOSS_AWARE, "z_fraction": {"compensation": "none"},
}


def _config_for(field: str, value) -> CompressionConfig:
    # each field with the choice it belongs to (z_fraction 0 needs no Z): the companions, not what is tested
    return CompressionConfig(reduction=0.3, progress=False, **_OWNERS.get(field, {}), **{field: value})


def _value(config: CompressionConfig, field: str):
    return config.resolved_settings()[field] if field in config.resolved_settings() else getattr(config, field)


@pytest.mark.usefixtures("one_thread_module")
@pytest.mark.parametrize("field", sorted(_NUMBERS))
def test_config_numbers_refuse_what_their_rule_excludes_and_keep_its_edges(field):
    """Every real-valued field, table-driven: its edge values pass; values past them, NaN, infinities, bools,
    strings and None get one ValueError that names the field and the rule (not a TypeError from a comparison)."""
    rule, inside, outside = _NUMBERS[field]
    for value in inside:
        assert _value(_config_for(field, value), field) == value
    for value in [*outside, *_ANY_NUMBER_FIELD_REFUSES]:
        with pytest.raises(ValueError, match=rf"^{field} must {re.escape(rule)}, got "):
            _config_for(field, value)


@pytest.mark.usefixtures("one_thread_module")
def test_config_z_kind_needs_a_z_budget_and_recipes_are_named():
    from lowrank_vit.config import recipe

    with pytest.raises(ValueError, match=r"compensation='lowrank' needs z_fraction > 0"):
        CompressionConfig(reduction=0.3, progress=False, compensation="lowrank", z_fraction=0.0)
    with pytest.raises(ValueError, match=r"unknown recipe 'magic'; known: loss-aware, "):
        recipe("magic", reduction=0.3)


@pytest.mark.usefixtures("one_thread_module")
@pytest.mark.parametrize("field", ["calib_samples", "rank_multiple", "distill_batch_size", "distill_micro_batch"])
@pytest.mark.parametrize("value", [0, -1, 1.5, True])
def test_config_counts_not_positive_integer(field, value):
    with pytest.raises(ValueError, match=rf"{field} must be a positive integer"):
        CompressionConfig(reduction=0.3, progress=False, **{field: value})


@pytest.mark.usefixtures("one_thread_module")
def test_distill_steps_is_a_count_from_zero_and_needs_a_named_likelihood():
    """0 turns the stage off; a negative, fractional or boolean number of steps is refused, and so is the stage with
    a likelihood given as a callable (no distillation loss is known for it)."""
    assert CompressionConfig(reduction=0.3, progress=False, distill_steps=0).distill_steps == 0
    assert CompressionConfig(reduction=0.3, progress=False, distill_steps=3).distill_steps == 3
    for value in (-1, 1.5, True, "8"):
        with pytest.raises(ValueError, match=r"^distill_steps must be an integer >= 0"):
            CompressionConfig(reduction=0.3, progress=False, distill_steps=value)
    with pytest.raises(ValueError, match=r"^distill_steps needs a named likelihood"):
        CompressionConfig(reduction=0.3, progress=False, distill_steps=4, likelihood=lambda out, gen: out.sum())
    CompressionConfig(reduction=0.3, progress=False, distill_steps=0, likelihood=lambda out, gen: out.sum())


@pytest.mark.usefixtures("one_thread_module")
def test_config_unknown_field_via_from_dict():
    with pytest.raises(ValueError, match=r"unknown CompressionConfig field\(s\): bogus"):
        CompressionConfig.from_dict({"reduction": 0.3, "bogus": 1})


def _auto(decomposition: str) -> CompressionConfig:
    labels = {"fisher_labels": "sampled"} if decomposition == "loss_aware" else {}
    return CompressionConfig(reduction=0.5, decomposition=decomposition, allocation="uniform", **labels)


@pytest.mark.parametrize("decomposition", DECOMPOSITIONS)
def test_auto_is_float32_on_cuda_for_every_method(decomposition):
    assert _auto(decomposition).gram_precision is None  # "auto" stays in the config until the device is known
    assert resolve_gram_precision(_auto(decomposition), "cuda", float32_exact=True) == "float32"


@pytest.mark.parametrize("decomposition", DECOMPOSITIONS)
def test_auto_on_the_cpu_keeps_the_earlier_rule(decomposition):
    """float32 for the gradient-pass method, float64 for the others, as the config resolved it before."""
    expected = "float32" if decomposition in GRADIENT_PASS else "float64"
    assert resolve_gram_precision(_auto(decomposition), "cpu", float32_exact=True) == expected


@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
@pytest.mark.parametrize("decomposition", DECOMPOSITIONS)
def test_auto_never_picks_reduced_float32_products(decomposition, device_type):
    """TF32 (CUDA) or bfloat16 (CPU) float32 matmuls are not what the precision comparison measured."""
    assert resolve_gram_precision(_auto(decomposition), device_type, float32_exact=False) == "float64"


@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
@pytest.mark.parametrize("precision", ["float32", "float64"])
@pytest.mark.parametrize("name", ["paper", "loss-aware", "vanilla"])
def test_an_explicit_precision_is_always_respected(name, precision, device_type, exact):
    cfg = recipe(name, reduction=0.5, gram_precision=precision)
    assert cfg.gram_precision == precision
    assert resolve_gram_precision(cfg, device_type, float32_exact=exact) == precision


def test_float32_matmul_is_ieee_reads_torch_settings():
    """The default reads torch's matmul setting: "high" makes CUDA's float32 products TF32, so "auto" is float64."""
    before = torch.get_float32_matmul_precision()
    assert before == "highest"  # torch's default, which every other test runs with
    try:
        assert float32_matmul_is_ieee("cuda") and float32_matmul_is_ieee("cpu")
        assert resolve_gram_precision(recipe("paper", reduction=0.5), "cuda") == "float32"
        torch.set_float32_matmul_precision("high")
        assert not float32_matmul_is_ieee("cuda")
        assert resolve_gram_precision(recipe("paper", reduction=0.5), "cuda") == "float64"
        torch.set_float32_matmul_precision("medium")
        assert not float32_matmul_is_ieee("cpu")
        assert resolve_gram_precision(recipe("loss-aware", reduction=0.5), "cpu") == "float64"
    finally:
        torch.set_float32_matmul_precision(before)
    assert float32_matmul_is_ieee("cuda") and float32_matmul_is_ieee("cpu")


def test_configs_of_earlier_versions_load_unchanged():
    """Earlier versions wrote the resolved value: it is an explicit choice now, kept as it was; a config written
    without the field reads as "auto"; a bad value is still an error."""
    for written in ("float64", "float32"):
        data = {**recipe("paper", reduction=0.5).to_dict(), "gram_precision": written}
        assert CompressionConfig.from_dict(data).gram_precision == written
    data = recipe("paper", reduction=0.5).to_dict()
    del data["gram_precision"]
    assert CompressionConfig.from_dict(data).gram_precision is None
    auto = recipe("paper", reduction=0.5)
    assert CompressionConfig.from_dict(auto.to_dict()) == auto
    with pytest.raises(ValueError, match="gram_precision"):
        CompressionConfig(reduction=0.5, gram_precision="bfloat16")


@pytest.mark.parametrize("fields, match", [
    (dict(target_speedup=1.5), "needs a latency_table"),
    (dict(target_speedup=1.5, latency_table="t.json", allocation="greedy"), "'marginal'"),
    (dict(target_speedup=1.0, latency_table="t.json"), r"target_speedup must be a finite number > 1"),
    (dict(target_speedup=1.5, reduction=0.5, latency_table="t.json"), "exactly one of"),
    (dict(reduction=0.5, latency_table="t.json", compensation="sparse"), "not timed"),
    (dict(reduction=0.5, latency_table=3), "path of a table"),
    (dict(reduction=0.5, latency_table="t.json", latency_limit="yes"), "latency_limit"),
])
def test_latency_configuration_errors(fields, match):
    with pytest.raises(ValueError, match=match):
        CompressionConfig(**fields)


def test_sgd_solver_is_refused():
    with pytest.raises(ValueError, match="solver='closed_form'"):
        CompressionConfig(reduction=0.5, decomposition="loss_aware", compensation="lowrank", solver="sgd")


def test_bias_correction_needs_the_loss_aware_statistics():
    with pytest.raises(ValueError, match="bias_correction needs decomposition='loss_aware'"):
        CompressionConfig(reduction=0.5, decomposition="whitened", allocation="greedy", bias_correction=True)


FLAT = json.loads((FIXTURES / "flat_configs_v1.json").read_text())["configs"]


SHARED = {f.name for f in dataclasses.fields(CompressionConfig)} - {"settings"}


MOVED = ("asvd_alpha", "fisher_labels", "grad_fraction", "loss_pass_dtype", "refit_damping", "gamma",
         "greedy_iterations", "sgd_lr", "sgd_iterations", "sgd_batch_size", "sgd_tokens_per_image")


# which choice reads each moved field (written out, not read from the registries the code uses)
READ_BY = {"asvd_alpha": ("decomposition", {"asvd"}), "fisher_labels": ("decomposition", {"loss_aware"}),
           "refit_damping": ("decomposition", {"loss_aware"}),
           "grad_fraction": ("decomposition", {"loss_aware", "kfac"}),
           "loss_pass_dtype": ("decomposition", {"loss_aware", "kfac"}),
           "gamma": ("allocation", {"greedy"}), "greedy_iterations": ("allocation", {"greedy"}),
           **{name: ("solver", {"sgd"}) for name in ("sgd_lr", "sgd_iterations", "sgd_batch_size",
                                                      "sgd_tokens_per_image")}}


@pytest.mark.parametrize("name", sorted(FLAT))
def test_a_flat_config_of_the_earlier_version_loads_with_the_same_effective_values(name):
    """Every shared field as written; every moved field that its method reads, with the value written (the tuned
    ones included); the fields of methods not chosen, which had no effect, gone."""
    old = FLAT[name]
    config = CompressionConfig.from_dict(old)
    # fields added since (the output's likelihood and part, the block reconstruction) take their defaults
    defaults = {f.name: f.default for f in dataclasses.fields(CompressionConfig)}
    assert {key: getattr(config, key) for key in SHARED} == {key: old.get(key, defaults[key]) for key in SHARED}
    assert set(SHARED) - set(old) <= {"likelihood", "output_key", "block_reconstruction", "block_steps", "block_lr",
                                      "block_batch_size", "block_metric", "distill_steps", "distill_lr",
                                      "distill_batch_size", "distill_augment", "distill_micro_batch",
                                      "distill_features"}
    resolved = config.resolved_settings()
    for key in MOVED:
        kind, readers = READ_BY[key]
        assert (key in resolved) == (old[kind] in readers), key
        if key in resolved:
            assert resolved[key] == old[key], key
    for key, value in old["settings"].items():  # the peers' settings, already nested then
        assert resolved[key] == value
    assert not set(config.to_dict()) & set(MOVED)


def test_the_tuned_flat_configs_keep_their_non_default_values_in_settings():
    assert CompressionConfig.from_dict(FLAT["paper-sgd-tuned"]).settings == {
        "gamma": 60.0, "greedy_iterations": 300, "sgd_lr": 5e-4, "sgd_iterations": 100, "sgd_batch_size": 16,
        "sgd_tokens_per_image": 8}
    assert CompressionConfig.from_dict(FLAT["loss-aware-tuned"]).settings == {
        "grad_fraction": 0.25, "loss_pass_dtype": "bfloat16", "fisher_labels": "given", "refit_damping": 1e-3}
    assert CompressionConfig.from_dict(FLAT["kfac-tuned"]).settings == {"grad_fraction": 0.5, "grad_shrinkage": 0.3}


def test_every_spelling_of_a_setting_gives_one_config_and_defaults_say_nothing():
    nested = CompressionConfig(reduction=0.5, allocation="greedy", decomposition="whitened", settings={"gamma": 60.0})
    assert CompressionConfig(reduction=0.5, allocation="greedy", decomposition="whitened", gamma=60.0) == nested
    assert recipe("paper", reduction=0.5, compensation="none", gamma=60.0) == \
        dataclasses.replace(nested, compensation="none")
    assert CompressionConfig.from_dict({**nested.to_dict(), "gamma": 60.0}) == nested
    assert recipe("paper", reduction=0.5, gamma=80.0).settings == {}  # the default: nothing to say
    assert recipe("paper", reduction=0.5).resolved_settings() == {"gamma": 80.0, "greedy_iterations": 500}


def test_a_setting_of_a_method_not_chosen_is_refused_naming_its_owner():
    with pytest.raises(ValueError, match=r"^setting 'gamma'=60 belongs to allocation 'greedy', not to "
                                         r"decomposition='loss_aware', allocation='marginal', solver='closed_form' "
                                         r"\(their settings: grad_fraction, loss_pass_dtype, fisher_labels, "
                                         r"refit_damping, refit_target\)$"):
        CompressionConfig(reduction=0.5, gamma=60)
    with pytest.raises(ValueError, match=r"^setting 'sgd_lr'=0.01 belongs to solver 'sgd', not to "):
        recipe("paper", reduction=0.5, settings={"sgd_lr": 0.01})
    with pytest.raises(ValueError, match=r"^setting 'nope'=1 belongs to no registered decomposition, allocation or "
                                         r"solver, not to "):
        CompressionConfig(reduction=0.5, settings={"nope": 1})


@pytest.mark.parametrize("name", PEER_RECIPES)
def test_peer_recipes_build(name):
    cfg = recipe(name, reduction=0.5)
    assert (cfg.decomposition, cfg.allocation) == {
        "flar-svd": ("flar", "flar"), "svd-llm": ("svd_llm", "uniform"), "svd-llm-update": ("svd_llm", "uniform"),
        "svd-llm-v2": ("svd_llm", "svd_llm_v2"), "kfac-lems": ("kfac", "lems")}[name]
    # SVD-LLM's published pipeline is its whitened truncation alone; the sequential update is its own recipe
    assert cfg.refit == (name == "svd-llm-update")


@pytest.mark.parametrize("name, settings, word", [
    ("kfac-lems", {"nope": 1}, "nope"),
    ("kfac-lems", {"grad_shrinkage": 1.5}, "grad_shrinkage"),
    ("kfac-lems", {"input_shrinkage": -0.1}, "input_shrinkage"),
    ("kfac-lems", {"clip_low": 2.0}, "clip_low"),
    ("kfac-lems", {"clip_high": 0.5}, "clip_high must be at least 1"),
    ("kfac-lems", {"rank_ceiling": 0.05}, "rank_ceiling must lie in \\(rank_floor"),
    ("flar-svd", {"threshold": float("nan")}, "threshold"),
    ("svd-llm-v2", {"loss_tokens": 0}, "loss_tokens"),
    ("kfac-lems", {"rank_floor": 0}, "rank_floor"),
    ("kfac-lems", {"rank_step": 0}, "rank_step"),
    ("flar-svd", {"rank_step": 0}, "rank_step"),
    ("flar-svd", {"shrinkage": "x"}, "shrinkage"),
    ("flar-svd", {"threshold": -1.0}, "threshold"),
    ("flar-svd", {"grad_shrinkage": 0.5}, "grad_shrinkage"),  # KFAC's setting, not FLAR's
    ("svd-llm", {"shrinkage": "none"}, "shrinkage"),
])
def test_bad_settings_raise_naming_the_setting(name, settings, word):
    with pytest.raises(ValueError, match=word):
        recipe(name, reduction=0.5, settings=settings)


def test_settings_of_the_chosen_methods_are_accepted():
    cfg = recipe("kfac-lems", reduction=0.5, settings={"grad_shrinkage": 0.3, "rank_floor": 0.2})
    assert cfg.settings == {"grad_shrinkage": 0.3, "rank_floor": 0.2}
    recipe("flar-svd", reduction=0.5, settings={"shrinkage": "none", "rank_step": 4})


@pytest.mark.parametrize("allocation", ["lems", "flar"])
def test_probing_allocations_reject_whole_module_decompositions(allocation):
    with pytest.raises(ValueError, match="comcat"):
        CompressionConfig(reduction=0.5, decomposition="comcat", allocation=allocation)


@pytest.mark.parametrize("settings, message", [
    (dict(decomposition="whitened", allocation="greedy"),
     "refit needs a decomposition with a refit \\('loss_aware', 'svd_llm'\\)"),
    (dict(compensation="diagonal"), "use compensation='none'"),
    (dict(refit="yes"), "refit must be true or false"),
    (dict(refit_damping=-1.0), "refit_damping must be a finite number >= 0"),
])
def test_configuration_errors(settings, message):
    with pytest.raises(ValueError, match=message):
        refit_cfg(reduction=0.5, **settings)


def test_recipe_is_registered():
    from lowrank_vit.config import RECIPES, recipe

    assert RECIPES["loss-aware-refit"]["refit"] is True
    assert recipe("loss-aware-refit", reduction=0.5).refit is True
