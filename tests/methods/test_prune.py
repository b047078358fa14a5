"""Tests of lowrank_vit/methods/prune.py."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from lowrank_vit.methods.prune import (
    PruningConfig,
    hold_pruned,
    measure_sparsity,
    prunable_layers,
    prune_count,
    prune_model,
    pruning_masks,
    smallest_mask,
)
from tests.helpers import make_tiny_vit, make_vssm, vssm_images

# A hand-built model of one block whose two prunable layers hold known weights. In forward order (the adapter reads
# the token mixer before the MLP):
#   attn.proj  [[0.5, -0.1, 0.3], [-0.2, 0.1, 0.9]]   |w| row-major: 0.5 0.1 0.3 0.2 0.1 0.9   (a tie at 0.1)
#   mlp.fc1    [[-0.05, 2.0], [0.1, -0.3]]             |w| row-major: 0.05 2.0 0.1 0.3          (0.1 again)
PROJ = [[0.5, -0.1, 0.3], [-0.2, 0.1, 0.9]]
FC1 = [[-0.05, 2.0], [0.1, -0.3]]


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.Module()
        self.attn.proj = nn.Linear(3, 2)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(2, 2)
        self.norm = nn.LayerNorm(2)  # not a block linear: never pruned
        with torch.no_grad():
            self.attn.proj.weight.copy_(torch.tensor(PROJ))
            self.mlp.fc1.weight.copy_(torch.tensor(FC1))


def hand_model() -> nn.Module:
    model = nn.Module()
    model.block = _Block()
    return model


def zero_positions(model: nn.Module) -> dict[str, list[int]]:
    """Row-major positions of the zero weights of each prunable layer."""
    return {name: torch.nonzero(layer.weight.flatten() == 0).flatten().tolist()
            for name, layer in prunable_layers(model).items()}


def test_the_prunable_layers_are_the_adapters_block_linears_in_forward_order():
    assert list(prunable_layers(hand_model())) == ["block.attn.proj", "block.mlp.fc1"]


@pytest.mark.parametrize("sparsity, proj, fc1", [
    # counts by hand: round(6 s) and round(4 s), halves up
    (0.1, [1], []),              # 0.6 -> 1 of proj: of the two 0.1s, the first; 0.4 -> 0 of fc1
    (0.25, [1, 4], [0]),         # 1.5 -> 2: both 0.1s; 1.0 -> 1: the 0.05
    (0.5, [1, 3, 4], [0, 2]),    # 3: 0.1, 0.1, 0.2; 2: 0.05, 0.1
    (0.75, [0, 1, 2, 3, 4], [0, 2, 3]),  # 4.5 -> 5: all but the 0.9; 3: all but the 2.0
])
def test_layer_scope_zeroes_the_exact_count_of_smallest_weights_in_each_layer(sparsity, proj, fc1):
    model = hand_model()
    report = prune_model(model, sparsity=sparsity, scope="layer")
    assert zero_positions(model) == {"block.attn.proj": proj, "block.mlp.fc1": fc1}
    assert report.zeroed == len(proj) + len(fc1) == report.zeros
    assert report.layers["block.attn.proj"].sparsity == len(proj) / 6
    assert report.sparsity == (len(proj) + len(fc1)) / 10


@pytest.mark.parametrize("sparsity, proj, fc1", [
    # one ranking over all ten weights, proj's before fc1's among equals:
    # 0.05 (fc1 0) < 0.1 (proj 1) = 0.1 (proj 4) = 0.1 (fc1 2) < 0.2 (proj 3) < 0.3 (proj 2) = 0.3 (fc1 3) < ...
    (0.1, [], [0]),
    (0.3, [1, 4], [0]),            # the 0.05 and two of the three 0.1s: fc1's, the last in forward order, is left
    (0.4, [1, 4], [0, 2]),
    (0.5, [1, 3, 4], [0, 2]),
    (0.6, [1, 2, 3, 4], [0, 2]),   # of the two 0.3s, proj's (earlier in forward order)
])
def test_global_scope_zeroes_the_exact_count_with_ties_taken_in_forward_order(sparsity, proj, fc1):
    model = hand_model()
    report = prune_model(model, sparsity=sparsity, scope="global")
    assert zero_positions(model) == {"block.attn.proj": proj, "block.mlp.fc1": fc1}
    assert report.zeros == round(10 * sparsity)


def test_the_rest_of_the_model_is_untouched_and_kept_weights_keep_their_values():
    model = hand_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prune_model(model, sparsity=0.5)
    after = model.state_dict()
    for name, tensor in before.items():
        if name.endswith("weight") and "norm" not in name:
            kept = after[name] != 0
            assert torch.equal(after[name][kept], tensor[kept])
        else:  # biases and the norm
            assert torch.equal(after[name], tensor), name


def test_the_smallest_magnitudes_are_the_ones_zeroed_in_a_real_model():
    """On a vision state-space model with random weights, layer by layer: in every layer each zeroed weight was no
    larger in magnitude than any kept one, and the count is the rounded fraction."""
    model = make_vssm()
    before = {name: layer.weight.detach().clone() for name, layer in prunable_layers(model).items()}
    prune_model(model, sparsity=0.4, scope="layer")
    for name, layer in prunable_layers(model).items():
        zeroed = layer.weight == 0
        assert int(zeroed.sum()) == math.floor(0.4 * layer.weight.numel() + 0.5), name
        assert before[name].abs()[zeroed].max() <= before[name].abs()[~zeroed].min(), name


def test_the_default_global_scope_zeroes_the_smallest_magnitudes_of_all_layers_together():
    """One threshold: every zeroed weight of any layer was no larger than every kept weight of any layer, and the
    layers end up unequally sparse (their scales differ: torch's default initialization depends on the width)."""
    assert PruningConfig().scope == "global" and PruningConfig().sparsity == 0.4
    model = make_vssm()
    before = torch.cat([layer.weight.detach().abs().flatten() for layer in prunable_layers(model).values()])
    report = prune_model(model)
    after = torch.cat([layer.weight.detach().flatten() for layer in prunable_layers(model).values()])
    assert int((after == 0).sum()) == math.floor(0.4 * after.numel() + 0.5) == report.zeros
    assert before[after == 0].max() <= before[after != 0].min()
    assert len({round(layer.sparsity, 2) for layer in report.layers.values()}) > 1


def test_sparsity_zero_changes_nothing():
    model = make_vssm()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = prune_model(model, sparsity=0.0, scope="global")
    assert report.zeroed == 0 and report.zeros == 0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_pruning_again_at_the_same_sparsity_zeroes_nothing_more():
    """The zeros are the smallest magnitudes there are: a second pass chooses them again."""
    model = make_vssm()
    first = prune_model(model, sparsity=0.4)
    again = prune_model(model, sparsity=0.4)
    assert first.zeroed > 0 and again.zeroed == 0 and again.zeros == first.zeros


@pytest.mark.parametrize("kwargs, message", [
    (dict(sparsity=1.0), r"sparsity must lie in \[0, 1\), got 1.0"),
    (dict(sparsity=-0.1), r"sparsity must lie in \[0, 1\)"),
    (dict(sparsity=float("nan")), r"sparsity must lie in \[0, 1\)"),
    (dict(sparsity="0.4"), r"sparsity must lie in \[0, 1\), got '0.4'"),
    (dict(sparsity=True), r"sparsity must lie in \[0, 1\), got True"),
    (dict(scope="block"), r"scope must be one of 'global', 'layer', got 'block'"),
])
def test_bad_configs_are_refused_with_what_was_expected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PruningConfig(**kwargs)
    with pytest.raises(ValueError, match=message):  # the same checks through the function's overrides
        prune_model(hand_model(), **kwargs)


def test_bad_input_to_the_small_functions_is_refused():
    with pytest.raises(ValueError, match="non-negative integer"):
        prune_count(-1, 0.5)
    with pytest.raises(ValueError, match="1-D"):
        smallest_mask(torch.ones(2, 2), 1)
    with pytest.raises(ValueError, match=r"count must be an integer in \[0, 3\]"):
        smallest_mask(torch.ones(3), 4)
    with pytest.raises(ValueError, match="NaN"):
        smallest_mask(torch.tensor([1.0, float("nan")]), 1)
    model = hand_model()
    with torch.no_grad():
        model.block.mlp.fc1.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        prune_model(model, sparsity=0.5)


def test_a_model_without_block_linears_is_refused_with_why():
    with pytest.raises(ValueError, match="Sequential has no block nn.Linear layer to prune"):
        prune_model(nn.Sequential(nn.Linear(4, 4)), sparsity=0.4)
    from lowrank_vit import compress
    from lowrank_vit.config import recipe

    model = make_tiny_vit()
    compress(model, [torch.randn(8, 1, 28, 28)], recipe("vanilla", reduction=0.5, progress=False, calib_samples=8))
    with pytest.raises(ValueError, match="factorized by a low-rank method; prune before, not after"):
        prune_model(model, sparsity=0.4)


@pytest.mark.parametrize("total, sparsity, count", [(10, 0.25, 3), (10, 0.24, 2), (6, 0.75, 5), (0, 0.5, 0),
                                                     (7, 0.0, 0), (1, 0.99, 1)])
def test_prune_count_is_the_nearest_integer_halves_up(total, sparsity, count):
    assert prune_count(total, sparsity) == count


def test_smallest_mask_takes_the_earliest_of_equal_values():
    mask = smallest_mask(torch.tensor([3.0, 1.0, 1.0, 0.0, 1.0]), 3)
    assert mask.tolist() == [False, True, True, True, False]


def test_pruning_masks_of_the_global_scope_span_tensors_in_the_order_given():
    masks = pruning_masks({"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([1.0, 0.5])}, 0.5, "global")
    assert masks["a"].tolist() == [True, False] and masks["b"].tolist() == [False, True]


def test_a_pruned_vssm_round_trips_through_the_checkpoint_with_its_sparsity(tmp_path):
    import timm

    import lowrank_vit.nn.vssm  # noqa: F401  (registers vssm_micro)
    from lowrank_vit.io.surgery import load_compressed, read_plan, save_compressed

    torch.manual_seed(0)
    model = timm.create_model("vssm_micro", pretrained=False, img_size=32, num_classes=10).eval()
    report = prune_model(model, sparsity=0.4)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        logits = model(x)
    save_compressed(model, tmp_path / "m", metadata={"pruning": report.to_dict()})
    loaded = load_compressed(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(loaded(x), logits)
    assert measure_sparsity(loaded).to_dict()["layers"] == report.to_dict()["layers"]
    recorded = read_plan(tmp_path / "m")["metadata"]["pruning"]
    assert recorded["sparsity"] == pytest.approx(0.4, abs=1e-3) and recorded["zeros"] == report.zeros
    json.dumps(recorded)  # the report is JSON as it is


def test_a_pruned_model_after_vmeanba_round_trips_with_its_scans_and_zeros(tmp_path):
    from lowrank_vit.io.surgery import load_compressed, save_compressed
    from lowrank_vit.methods.vmeanba import apply_vmeanba, scan_blocks

    model, x = make_vssm(), vssm_images()
    chosen = apply_vmeanba(model, x, num_blocks=1, timing=False, progress=False).chosen
    report = prune_model(model, sparsity=0.4)
    with torch.no_grad():
        logits = model(x)
    save_compressed(model, tmp_path / "m", metadata={"pruning": report.to_dict()})
    loaded = load_compressed(tmp_path / "m")
    assert [name for name, op in scan_blocks(loaded).items() if op.mean_scan] == chosen
    assert measure_sparsity(loaded).zeros == report.zeros
    with torch.no_grad():
        assert torch.equal(loaded(x), logits)


def test_a_timm_vit_prunes_too():
    model = make_tiny_vit()
    head, embed = model.head.weight.clone(), model.patch_embed.proj.weight.clone()
    report = prune_model(model, sparsity=0.4, scope="global")
    assert len(report.layers) == 8  # qkv, proj, fc1, fc2 in each of two blocks
    assert report.zeros == math.floor(0.4 * report.weights + 0.5)
    assert torch.equal(model.head.weight, head) and torch.equal(model.patch_embed.proj.weight, embed)
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(2, 1, 28, 28))).all()


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_held_zeros_stay_zero_while_training_and_would_regrow_without(optimizer):
    """Training every weight (what a fine-tune with train_factors does) regrows pruned weights; with the hooks of
    hold_pruned the zeros survive SGD with momentum and AdamW with weight decay."""
    x, y = vssm_images(8), torch.arange(8) % 5

    def train(model: nn.Module) -> None:
        opt = (torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9) if optimizer == "sgd"
               else torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1))
        model.train()
        for _ in range(3):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

    free = make_vssm()
    zeros = prune_model(free, sparsity=0.4).zeros
    train(free)
    assert measure_sparsity(free).zeros < zeros  # the check below can fail

    held = make_vssm()
    prune_model(held, sparsity=0.4)
    with hold_pruned(held):
        train(held)
    assert measure_sparsity(held).zeros == zeros
    train(held)  # the hooks are off once the block is left
    assert measure_sparsity(held).zeros < zeros
