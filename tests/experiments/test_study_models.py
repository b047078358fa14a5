"""Tests of experiments/study_models.py."""

from __future__ import annotations

import json

import pytest

from experiments.ssm_models import MODELS as SSM_RECIPES
from experiments.study_models import MODELS as STUDY_RECIPES
from tests.helpers import MODELS_DIR, cifar10_dir

COMMITTED_SSM = ("cifar_vssm4", "cifar_vssm2_deep")  # the state-space stand-ins (experiments/ssm_models.py)


@pytest.mark.parametrize("name", sorted(STUDY_RECIPES) + sorted(COMMITTED_SSM))
def test_committed_cifar_models_match_their_recipes(name: str):
    """Every CIFAR-10 model of the study (and each committed state-space stand-in) has committed weights, made by
    the recipe now in experiments/study_models.py (ssm_models.py) and loading strictly into the architecture that
    recipe builds."""
    pytest.importorskip("timm")
    from safetensors.torch import load_file

    from lowrank_vit.nn.adapters import timm_with_our_models

    timm = timm_with_our_models()
    recipe = {**STUDY_RECIPES, **SSM_RECIPES}[name]
    record = json.loads((MODELS_DIR / name / "model.json").read_text())
    assert record["fingerprint"] == recipe.fingerprint(record["data"])
    model = timm.create_model(recipe.timm_name, pretrained=False, **recipe.model_kwargs)
    model.load_state_dict(load_file(str(MODELS_DIR / name / "model.safetensors")), strict=True)
    assert record["params"] == sum(p.numel() for p in model.parameters())
    assert record["data"].startswith("sha256:")  # what the images are, not where they lay on the training machine


def test_committed_cifar_models_name_the_local_cifar10():
    """The committed records' data identity is the development copy's content (run where that copy exists)."""
    from experiments.cifar10 import data_identity

    local = cifar10_dir()
    if local is None:
        pytest.skip("no local CIFAR-10 (LOWRANK_VIT_CIFAR10)")
    identity = data_identity(str(local))
    for name in STUDY_RECIPES:
        assert json.loads((MODELS_DIR / name / "model.json").read_text())["data"] == identity, name
