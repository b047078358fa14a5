"""Tests of lowrank_vit/stages/finetune_config.py."""

from __future__ import annotations

import pytest

from lowrank_vit.core.common import warmup_cosine
from lowrank_vit.stages.finetune_config import FinetuneConfig


@pytest.mark.usefixtures("offline")
def test_float16_autocast_off_a_gpu_is_refused_with_what_to_use():
    from lowrank_vit.stages.finetune_config import check_precision_on

    with pytest.raises(ValueError) as info:
        check_precision_on("16-mixed", "cpu")
    assert str(info.value) == ("finetune precision 16-mixed needs a GPU (float16 autocast is CUDA's); use bf16-mixed "
                               "or 32-true on a CPU")


@pytest.mark.usefixtures("offline")
@pytest.mark.parametrize("steps", [2.5, 0, True])
def test_a_step_count_that_is_not_a_positive_integer_is_refused(steps):
    from lowrank_vit.stages.finetune_config import FinetuneConfig

    with pytest.raises(ValueError) as info:
        FinetuneConfig(epochs=1, max_steps=steps)
    assert str(info.value) == f"max_steps must be a positive integer or None, got {steps!r}"


@pytest.mark.usefixtures("offline")
@pytest.mark.parametrize("field", ["train_tokens", "train_factors"])
def test_a_fine_tune_switch_that_is_not_a_boolean_is_refused_by_name(field):
    from lowrank_vit.stages.finetune_config import FinetuneConfig

    with pytest.raises(ValueError) as info:
        FinetuneConfig(**{field: "yes"})
    assert str(info.value) == f"{field} must be true or false, got 'yes'"


@pytest.mark.usefixtures("offline")
@pytest.mark.parametrize("value", [1.5, "3", -1])
def test_warmup_steps_that_are_not_a_count_are_refused(value):
    from lowrank_vit.stages.finetune_config import FinetuneConfig

    with pytest.raises(ValueError) as info:
        FinetuneConfig(warmup_steps=value)
    assert str(info.value) == f"warmup_steps must be a non-negative integer, got {value!r}"


@pytest.mark.usefixtures('one_thread')
def test_finetune_config_validation():
    assert FinetuneConfig().epochs == 20 and FinetuneConfig().lr == 1e-4
    for bad in (dict(epochs=0), dict(lr=0.0), dict(lr=float("nan")), dict(min_lr=1.0, lr=1e-4),
                dict(weight_decay=-1.0), dict(label_smoothing=1.0), dict(warmup_steps=-1), dict(batch_size=True),
                dict(checkpoint_every_n_steps=0)):
        with pytest.raises(ValueError):
            FinetuneConfig(**bad)
    with pytest.raises(ValueError, match="unknown"):
        FinetuneConfig.from_dict({"epochs": 1, "learning_rate": 1.0})
    assert FinetuneConfig.from_dict(FinetuneConfig(epochs=3).to_dict()) == FinetuneConfig(epochs=3)


@pytest.mark.usefixtures('one_thread')
def test_warmup_cosine_schedule():
    assert warmup_cosine(0, 100, 0, 0.0) == pytest.approx(1.0)
    assert warmup_cosine(50, 100, 0, 0.0) == pytest.approx(0.5)
    assert warmup_cosine(100, 100, 0, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(0, 100, 10, 0.0) == pytest.approx(0.1)
    assert warmup_cosine(10, 100, 10, 0.0) == pytest.approx(1.0)


@pytest.mark.parametrize(("step", "total", "warmup"), [(101, 100, 0), (150, 100, 0), (200, 100, 10), (1000, 100, 10)])
def test_the_learning_rate_stays_at_its_floor_past_the_last_step(step, total, warmup):
    """Steps past ``total`` (more steps run than the schedule was laid out for) keep the floor: the cosine does not
    climb back."""
    assert warmup_cosine(step, total, warmup, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(step, total, warmup) == pytest.approx(0.0, abs=1e-12)
