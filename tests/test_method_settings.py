"""Each registered decomposition, allocation and Z solver owns its typed settings (issue 42): CompressionConfig holds
what every method shares. Checked against configs the flat version wrote (tests/fixtures/flat_configs_v1.json, made
by that version's code), and by a method registered from this file alone with a settings class of its own."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from lowrank_vit import compress
from lowrank_vit.config import CompressionConfig, recipe
from lowrank_vit.core.common import check_number, settings_of
from lowrank_vit.core.decompose import Decomposition
from lowrank_vit.methods.decompositions import METHODS, Plain, register_method

from conftest import make_images, make_tiny_vit

FLAT = json.loads((Path(__file__).parent / "fixtures" / "flat_configs_v1.json").read_text())["configs"]
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
    # fields added since (the output's likelihood and part) take their defaults
    defaults = {f.name: f.default for f in dataclasses.fields(CompressionConfig)}
    assert {key: getattr(config, key) for key in SHARED} == {key: old.get(key, defaults[key]) for key in SHARED}
    assert set(SHARED) - set(old) <= {"likelihood", "output_key"}
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
                                         r"refit_damping\)$"):
        CompressionConfig(reduction=0.5, gamma=60)
    with pytest.raises(ValueError, match=r"^setting 'sgd_lr'=0.01 belongs to solver 'sgd', not to "):
        recipe("paper", reduction=0.5, settings={"sgd_lr": 0.01})
    with pytest.raises(ValueError, match=r"^setting 'nope'=1 belongs to no registered decomposition, allocation or "
                                         r"solver, not to "):
        CompressionConfig(reduction=0.5, settings={"nope": 1})


def test_the_report_records_the_settings_the_compression_ran_with():
    images = make_images(16, seed=1)
    report = compress(make_tiny_vit(), [images], recipe("paper", reduction=0.5, compensation="none",
                                                        calib_samples=16, greedy_iterations=50, progress=False))
    assert report.config["settings"] == {"gamma": 80.0, "greedy_iterations": 50}
    assert CompressionConfig.from_dict(report.config).settings == {"greedy_iterations": 50}


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
        shown = values ** power
        return Decomposition(plain.left * (values / shown.clamp_min(1e-30)), plain.right, shown), white


@pytest.fixture
def toy_method():
    register_method(ShrinkSVD)
    ShrinkSVD.seen.clear()
    yield ShrinkSVD.name
    del METHODS[ShrinkSVD.name]


def test_a_method_registered_from_one_file_declares_validates_and_reads_its_settings(toy_method):
    config = CompressionConfig(reduction=0.5, decomposition=toy_method, allocation="marginal", shrink_power=3.0,
                               calib_samples=16, progress=False)
    assert config.settings == {"shrink_power": 3.0}
    with pytest.raises(ValueError, match=r"^shrink_power must be a finite number > 0, got -1"):
        dataclasses.replace(config, settings={"shrink_power": -1})
    with pytest.raises(ValueError, match=r"^setting 'shrink_power'=3.0 belongs to decomposition 'toy-shrink', not to "):
        dataclasses.replace(config, decomposition="plain")
    images = make_images(16, seed=2)
    ranks = {power: compress(make_tiny_vit(), [images], dataclasses.replace(config, settings={"shrink_power": power}))
             .ranks for power in (1.0, 3.0)}
    assert set(ShrinkSVD.seen) == {1.0, 3.0}
    plain = compress(make_tiny_vit(), [images], dataclasses.replace(config, decomposition="plain", settings={}))
    assert ranks[1.0] == plain.ranks and ranks[3.0] != plain.ranks  # the setting reached the allocation


def test_a_setting_set_on_the_command_line_reaches_the_row_and_a_bad_one_is_one_line():
    from lowrank_vit.repro.overrides import check_overrides
    from lowrank_vit.repro.registry import get_experiment

    row = get_experiment("table2/deit_s/ours-50").full
    check_overrides(["compression.gamma=60", "compression.settings.gamma=60"])
    assert row.override(["compression.gamma=60"]).compression.settings == {"gamma": 60}
    with pytest.raises(ValueError, match=r"^bad override 'compression.gamma=fast': .* expected a number"):
        check_overrides(["compression.gamma=fast"])
    with pytest.raises(ValueError, match=r"^setting 'grad_fraction'=0.5 belongs to decomposition 'loss_aware' or "
                                         r"decomposition 'kfac', not to decomposition='whitened'"):
        row.override(["compression.grad_fraction=0.5"])
