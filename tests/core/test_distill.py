"""Tests of lowrank_vit/core/distill.py: the augmentation, the distillation loop and its check."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch.nn import functional as F

from lowrank_vit.core.distill import (
    AUGMENTATIONS,
    _mean_loss,
    capturing_outputs,
    distill_on_calibration,
    mix_augment,
    relative_feature_error,
    shift_augment,
)


def _mirrored_shifted(image: torch.Tensor, mirrored: bool, dy: int, dx: int, shift: int) -> torch.Tensor:
    """The image mirrored (or not) and shifted by (dy, dx) - shift with reflected borders, index by index."""
    def reflect(i: int, size: int) -> int:
        return -i if i < 0 else 2 * (size - 1) - i if i >= size else i

    source = image.flip(-1) if mirrored else image
    _, height, width = image.shape
    out = torch.empty_like(image)
    for h in range(height):
        for w in range(width):
            out[:, h, w] = source[:, reflect(h + dy - shift, height), reflect(w + dx - shift, width)]
    return out


def test_mix_augment_mirrors_shifts_and_mixes_images_of_the_batch():
    """One image cannot mix with another, so it comes back as one of its mirrored and shifted copies (built index by
    index here), both mirrored and not over a few draws; images of constant colour come back as convex mixtures of
    the batch's colours, one per image; a generator seeded alike repeats the batch."""
    image = torch.arange(2 * 7 * 9, dtype=torch.float32).reshape(1, 2, 7, 9)
    shift = 2
    seen_mirrored = set()
    for seed in range(12):
        out = mix_augment(image, torch.Generator().manual_seed(seed), shift=shift)[0]
        matches = [(m, dy, dx) for m in (False, True) for dy in range(2 * shift + 1) for dx in range(2 * shift + 1)
                   if torch.allclose(out, _mirrored_shifted(image[0], m, dy, dx, shift))]
        assert matches, seed
        seen_mirrored.update(m for m, _, _ in matches)
    assert seen_mirrored == {False, True}

    colours = torch.tensor([0.0, 1.0, 5.0, -3.0, 2.0, 7.0])
    flat = colours[:, None, None, None].expand(6, 3, 8, 8).contiguous()
    mixed = mix_augment(flat, torch.Generator().manual_seed(0))
    per_image = mixed.flatten(1)
    assert torch.allclose(per_image, per_image[:, :1].expand_as(per_image))
    assert (per_image[:, 0] >= colours.min()).all() and (per_image[:, 0] <= colours.max()).all()
    assert not torch.allclose(per_image[:, 0], colours)  # mixed, not passed through
    again = mix_augment(flat, torch.Generator().manual_seed(0))
    assert torch.equal(mixed, again)
    assert not torch.equal(mixed, mix_augment(flat, torch.Generator().manual_seed(1)))


def test_mix_augment_caps_the_shift_for_small_images_and_refuses_other_shapes():
    """An image of 3 x 3 pixels cannot be padded by 4 with reflection: the shift is capped (at 2), and the result is
    still one of its mirrored, shifted copies; a batch that is not (N, C, H, W) is refused."""
    image = torch.arange(9, dtype=torch.float32).reshape(1, 1, 3, 3)
    out = mix_augment(image, torch.Generator().manual_seed(3))[0]
    assert any(torch.allclose(out, _mirrored_shifted(image[0], m, dy, dx, 2))
               for m in (False, True) for dy in range(5) for dx in range(5))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        mix_augment(torch.zeros(2, 3, 8), torch.Generator())


def test_shift_augment_mirrors_and_shifts_without_mixing_and_scales_with_the_image():
    """Images of constant colour pass through unmixed, each keeping its own colour (mix_augment would blend them);
    one image comes back as one of its mirrored and shifted copies; mix_augment is this draw followed by the mixing
    (the same generator draws first the mirror and the shifts); "shift" moves a 224-pixel image by up to 28 pixels,
    a 32-pixel one by up to 4 (an image of one bright column shows how far)."""
    colours = torch.tensor([0.0, 1.0, 5.0, -3.0, 2.0, 7.0])
    flat = colours[:, None, None, None].expand(6, 3, 8, 8).contiguous()
    assert torch.equal(shift_augment(flat, torch.Generator().manual_seed(0)), flat)

    image = torch.arange(2 * 7 * 9, dtype=torch.float32).reshape(1, 2, 7, 9)
    for seed in range(6):
        out = shift_augment(image, torch.Generator().manual_seed(seed), shift=2)[0]
        assert any(torch.equal(out, _mirrored_shifted(image[0], m, dy, dx, 2))
                   for m in (False, True) for dy in range(5) for dx in range(5)), seed

    batch = torch.randn(5, 3, 12, 12)
    shifted = shift_augment(batch, torch.Generator().manual_seed(4), shift=3)
    mixed = mix_augment(batch, torch.Generator().manual_seed(4), shift=3)
    assert not torch.equal(mixed, shifted)
    follow = torch.Generator().manual_seed(4)
    shift_augment(batch, follow, shift=3)
    lam = torch.rand(5, generator=follow)[:, None, None, None]
    assert torch.allclose(mixed, lam * shifted + (1 - lam) * shifted[torch.randperm(5, generator=follow)])

    for size, most in ((224, 28), (32, 4)):
        column = torch.zeros(64, 1, size, size)
        column[..., size // 2] = 1.0  # its mirror image is the column at size // 2 - 1
        out = AUGMENTATIONS["shift"](column, torch.Generator().manual_seed(1))
        moved = (out[:, 0, size // 2].argmax(-1) - size // 2).abs()
        assert moved.max() <= most + 1 and moved.max() >= most - 2, (size, moved.max())


def _kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return F.kl_div(F.log_softmax(student, 1), F.log_softmax(teacher, 1), log_target=True, reduction="batchmean")


def _logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x)


def _pair(seed: int = 0, noise: float = 0.05) -> tuple[torch.nn.Module, torch.nn.Module, torch.Tensor]:
    """A tiny dense ViT, a perturbed copy as the 'compressed' model (with dropout that eval mode must keep off), and
    40 images."""
    torch.manual_seed(seed)
    dense = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, embed_dim=24,
                              depth=2, num_heads=2, num_classes=5, drop_rate=0.9).eval()
    model = copy.deepcopy(dense)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(noise * torch.randn_like(p))
    return dense, model, torch.randn(40, 3, 16, 16)


def test_distillation_trains_toward_the_dense_model_and_keeps_what_helped():
    """The KL to the dense model on the calibration images, measured independently, falls and is the one reported
    (before and after); every parameter moved, the dense model did not; the flags and the mode are restored; dropout
    stayed off (eval mode) in every forward; and the run repeats exactly."""
    dense, model, x = _pair()
    dense_state = copy.deepcopy(dense.state_dict())
    model.train()
    model.head.weight.requires_grad_(False)
    start = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        truth_before = float(_kl(model.eval()(x), dense(x)))
    model.train()
    modes: list[bool] = []
    runs = []
    for _ in range(2):
        candidate = copy.deepcopy(model)
        candidate.load_state_dict(start)
        handle = candidate.register_forward_pre_hook(lambda module, args: modes.append(module.training))
        result = distill_on_calibration(dense, candidate, x, _logits, _kl, steps=12, lr=3e-3, batch_size=16,
                                        micro_batch=16, seed=5, progress=False)
        handle.remove()
        runs.append((candidate, result))
    (first, result), (second, _) = runs
    assert modes and not any(modes) and first.training
    assert [p.requires_grad for p in first.parameters()] == [p.requires_grad for p in model.parameters()]
    assert all(p.grad is None for p in first.parameters())
    with torch.no_grad():
        truth_after = float(_kl(first.eval()(x), dense(x)))
    assert result.kept and result.steps == 12
    assert result.loss_before == pytest.approx(truth_before, rel=1e-5)
    assert result.loss_after == pytest.approx(truth_after, rel=1e-5)
    assert truth_after < 0.7 * truth_before
    now = first.state_dict()
    assert all(not torch.equal(now[name], start[name]) for name in ("pos_embed", "blocks.1.mlp.fc2.weight",
                                                                   "head.weight"))
    assert all(torch.equal(value, dense.state_dict()[name]) for name, value in dense_state.items())
    assert all(torch.equal(now[name], second.state_dict()[name]) for name in now)


def test_a_distillation_that_does_not_lower_the_loss_is_undone_exactly():
    """A model already equal to the dense one has nothing to gain: Adam's steps can only move it away, so the loss
    after is higher and the weights come back bit for bit."""
    dense, _, x = _pair()
    model = copy.deepcopy(dense)
    result = distill_on_calibration(dense, model, x, _logits, _kl, steps=5, lr=1e-2, batch_size=8, seed=0,
                                    progress=False)
    assert not result.kept and result.loss_before == pytest.approx(0.0, abs=1e-9)
    assert result.loss_after > result.loss_before
    assert all(torch.equal(value, dense.state_dict()[name]) for name, value in model.state_dict().items())


@pytest.mark.parametrize("feature_weight", [0.0, 2.0])
def test_the_backward_in_micro_batches_takes_the_same_steps_as_one_batch(feature_weight):
    """Gradients accumulated over micro-batches of 5 (the last one short: 16 = 5 + 5 + 5 + 1) are those of the whole
    batch of 16, so the weights after a few steps agree, with the blocks' feature term too (a mean over images, not a
    ratio of batch sums); and the reported mean loss weighs the short micro-batch by its size (against the loss of
    all 40 images at once)."""
    dense, model, x = _pair(seed=1)
    whole, parts = copy.deepcopy(model), copy.deepcopy(model)
    common = dict(steps=4, lr=1e-3, batch_size=16, seed=2, progress=False, augment="none",
                  features=["blocks.0", "blocks.1"], feature_weight=feature_weight)
    distill_on_calibration(dense, whole, x, _logits, _kl, micro_batch=16, **common)
    distill_on_calibration(dense, parts, x, _logits, _kl, micro_batch=5, **common)
    width = model.embed_dim
    for (name, a), b in zip(whole.state_dict().items(), parts.state_dict().values(), strict=True):
        if name.endswith("attn.qkv.bias"):
            # the keys' bias shifts every logit of a query alike, which the softmax ignores: its gradient is zero
            # but for rounding, which Adam scales up to a full step, so it is compared only to be the same size
            torch.testing.assert_close(a[width: 2 * width], b[width: 2 * width], rtol=0, atol=1e-3)
            a, b = torch.cat([a[:width], a[2 * width:]]), torch.cat([b[:width], b[2 * width:]])
        assert torch.allclose(a, b, atol=1e-5), name
    assert not torch.allclose(whole.head.weight, model.head.weight)
    with torch.no_grad():
        everything = float(_kl(model(x), dense(x)))
    assert _mean_loss(dense, model, x, _logits, _kl, 7, torch.device("cpu")) == pytest.approx(everything, rel=1e-5)


def test_augmented_batches_feed_both_models_and_plain_ones_are_calibration_images():
    """With augment="mix" or "shift" the dense model's targets come from augmented images (none is a calibration
    image); with "none" every training image is one of them."""
    dense, model, x = _pair()
    rows = x.flatten(1)
    for augment, expected in (("mix", False), ("shift", False), ("none", True)):
        seen: list[torch.Tensor] = []
        handle = dense.register_forward_pre_hook(lambda module, args, seen=seen: seen.append(args[0].detach().clone()))
        distill_on_calibration(dense, copy.deepcopy(model), x, _logits, _kl, steps=3, lr=1e-4, batch_size=8,
                               micro_batch=8, augment=augment, progress=False)
        handle.remove()
        training = seen[5:8]  # after the loss before: 40 images in micro-batches of 8
        assert len(seen) == 5 + 3 + 5 and all(batch.shape[0] == 8 for batch in training)
        found = [bool(torch.isclose(batch.flatten(1)[:, None], rows[None]).all(-1).any(-1).all()) for batch in training]
        assert all(f == expected for f in found), augment


def test_the_relative_feature_error_is_each_modules_error_over_its_size_averaged():
    """Two modules of very different scales count alike, and so do the images of a batch: the error is computed here
    in float64 from the formula, module by module and image by image; the order of the names does not matter;
    different names are refused."""
    generator = torch.Generator().manual_seed(3)
    teacher = {"a": 100.0 * torch.randn(3, 5, 4, generator=generator),
               "b": 0.01 * torch.randn(3, 7, generator=generator)}
    student = {"b": teacher["b"] + 0.002 * torch.randn(3, 7, generator=generator), "a": teacher["a"] * 1.1}
    student["b"][1] *= 3.0  # one image far off: it weighs as one image of three, whatever its size
    truth = []
    for name in ("a", "b"):
        per_image = []
        for i in range(3):
            s, t = student[name][i].double().flatten().tolist(), teacher[name][i].double().flatten().tolist()
            per_image.append(sum((u - v) ** 2 for u, v in zip(s, t, strict=True)) / sum(v * v for v in t))
        truth.append(sum(per_image) / 3)
    assert truth[0] == pytest.approx(0.01, rel=1e-5)  # 10% of every value: 1% of the squared size
    assert float(relative_feature_error(student, teacher)) == pytest.approx(sum(truth) / 2, rel=1e-5)
    with pytest.raises(ValueError, match="differ"):
        relative_feature_error({"a": student["a"]}, teacher)


def _first_block_input(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The tokens a timm ViT's first block receives, computed step by step (patches, position, pre-norm)."""
    return model.norm_pre(model._pos_embed(model.patch_embed(x)))


def test_capturing_outputs_holds_each_named_blocks_output_and_removes_its_hooks():
    """The captured block outputs are those of the blocks run by hand on the same input; after the context no hook
    is left; a name that is not a submodule is refused before anything runs."""
    dense, _, x = _pair()
    with torch.no_grad(), capturing_outputs(dense, ["blocks.0", "blocks.1"]) as captured:
        dense(x[:4])
        first = dense.blocks[0](_first_block_input(dense, x[:4]))
        second = dense.blocks[1](first)
    assert torch.allclose(captured["blocks.0"], first) and torch.allclose(captured["blocks.1"], second)
    assert all(not module._forward_hooks for module in dense.modules())
    with pytest.raises(ValueError, match="no submodule named 'blocks.7'"):
        with capturing_outputs(dense, ["blocks.0", "blocks.7"]):
            pass


def test_the_feature_term_pulls_the_blocks_toward_the_dense_ones():
    """With the blocks' outputs matched too, the first block's relative error to the dense block on the calibration
    images, measured independently, ends below half its start and below half of where the output alone leaves it
    (from the same start, on the same batches); the check still reads the output's loss alone (the reported losses
    are the KL)."""
    dense, model, x = _pair(seed=2, noise=0.02)

    def first_block_error(candidate: torch.nn.Module) -> float:
        with torch.no_grad():
            ours, theirs = (m.blocks[0](_first_block_input(m, x)) for m in (candidate, dense))
        return float((ours - theirs).pow(2).sum() / theirs.pow(2).sum())

    start, errors, results = first_block_error(model), {}, {}
    for weight in (0.0, 3.0):
        candidate = copy.deepcopy(model)
        results[weight] = distill_on_calibration(dense, candidate, x, _logits, _kl, steps=20, lr=3e-3, batch_size=16,
                                                 micro_batch=16, seed=1, progress=False, features=["blocks.0"],
                                                 feature_weight=weight)
        errors[weight] = first_block_error(candidate)
    assert results[0.0].kept and results[3.0].kept
    assert errors[3.0] < 0.5 * start and errors[3.0] < 0.5 * errors[0.0]
    with torch.no_grad():
        assert results[3.0].loss_before == pytest.approx(float(_kl(model(x), dense(x))), rel=1e-5)


@pytest.mark.parametrize("bad", [dict(steps=0), dict(batch_size=0), dict(micro_batch=0), dict(lr=0.0),
                                 dict(augment="cutmix"), dict(feature_weight=-1.0, features=["blocks.0"]),
                                 dict(feature_weight=1.0), dict(feature_weight=float("nan"), features=["blocks.0"])])
def test_bad_settings_are_refused(bad):
    dense, model, x = _pair()
    settings = dict(steps=2, lr=1e-3, batch_size=4, progress=False) | bad
    with pytest.raises(ValueError):
        distill_on_calibration(dense, model, x, _logits, _kl, **settings)


def test_each_step_runs_at_the_warmup_then_cosine_rate():
    """The rate of every optimizer step, recorded at the step: a linear warm-up over the first twentieth of the
    steps (at least one) to the peak, then a half cosine down to 0, written out here for 40 steps at 2e-3 (warm-up
    2 steps); weight decay off. The smallest settings are accepted: one image per batch and per micro-batch."""
    import math

    dense, model, x = _pair(seed=2)
    seen: list[tuple[float, float]] = []
    step = torch.optim.AdamW.step

    def recording(self, *args, **kwargs):
        seen.extend((group["lr"], group["weight_decay"]) for group in self.param_groups)
        return step(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.optim.AdamW, "step", recording)
        distill_on_calibration(dense, model, x, _logits, _kl, steps=40, lr=2e-3, batch_size=1, micro_batch=1,
                               seed=1, progress=False)
    warmup = 2
    truth = [2e-3 * ((k + 1) / warmup if k < warmup else 0.5 * (1 + math.cos(math.pi * (k - warmup) / (40 - warmup))))
             for k in range(40)]
    assert [rate for rate, _ in seen] == pytest.approx(truth, rel=1e-9, abs=1e-15)
    assert {decay for _, decay in seen} == {0.0}
